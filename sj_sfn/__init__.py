"""sj-sfn: one-timestep ANN-to-SNN conversion for SpikingJelly (MTN, SFN, SFormer)."""

from typing import TYPE_CHECKING

from . import energy, functional
from .conversion import convert
from .neuron import MTNode, MultiLevelNode, SFNode, register_with_spikingjelly, set_lambda, set_stateful, sfn_nodes
from .ops import implementation
from .report import report
from .version import __version__

if TYPE_CHECKING:
    from .ann2snn import MTNRecipe, SFNRecipe

register_with_spikingjelly()

_LAZY = {"SFNRecipe": "sj_sfn.ann2snn", "MTNRecipe": "sj_sfn.ann2snn"}
# Submodules with heavier or optional dependencies (timm, Ax, matplotlib) load on first access.
_LAZY_MODULES = ("sformer", "tune", "calibration", "data", "zoo", "models", "op_counter")


def __getattr__(name: str):
    """Lazy exports: the ``ann2snn`` recipes and the optional submodules load on first use."""
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"sj_sfn.{name}")
    else:
        raise AttributeError(f"module 'sj_sfn' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["MTNode", "SFNode", "SFNRecipe", "MTNRecipe", "convert", "energy", "functional", "implementation", "report", "set_lambda", "set_stateful", "sfn_nodes", "MultiLevelNode", "__version__"]
