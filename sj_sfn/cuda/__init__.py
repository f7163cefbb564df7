"""CUDA kernels of the MTN/SFN forward (CuPy, compiled with NVRTC on first use).

Importing this package does not import CuPy; :mod:`sj_sfn.cuda.kernels` imports it only
when a kernel is compiled or launched.
"""

from .kernels import (
    KERNEL_DTYPES,
    NVRTC_OPTIONS,
    SOURCE_FILE,
    CompileError,
    Variant,
    all_variants,
    compile_ptx,
    cupy_status,
    fire,
    kernel_unsupported,
    source,
)

__all__ = [
    "KERNEL_DTYPES",
    "NVRTC_OPTIONS",
    "SOURCE_FILE",
    "CompileError",
    "Variant",
    "all_variants",
    "compile_ptx",
    "cupy_status",
    "fire",
    "kernel_unsupported",
    "source",
]
