"""The one-pass CPU fire kernel (C, built on first use, called through ctypes); see :mod:`sj_sfn.cpu.kernels`."""

from . import kernels
from .kernels import FirePlan, available, fire, status

__all__ = ["kernels", "FirePlan", "available", "fire", "status"]
