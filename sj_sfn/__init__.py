"""sj-sfn: one-timestep ANN-to-SNN conversion for SpikingJelly (MTN, SFN, SFormer)."""

from typing import TYPE_CHECKING

from . import energy, functional
from .convert import convert
from .neuron import MTNode, SFNode, _register_with_spikingjelly, set_lambda, sfn_nodes
from .ops import implementation
from .version import __version__

if TYPE_CHECKING:
    from .ann2snn import MTNRecipe, SFNRecipe

_register_with_spikingjelly()

_LAZY = {"SFNRecipe": "sj_sfn.ann2snn", "MTNRecipe": "sj_sfn.ann2snn"}


def __getattr__(name: str):
    """Lazy exports: the SpikingJelly ``ann2snn`` recipes load on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sj_sfn' has no attribute {name!r}")


__all__ = ["MTNode", "SFNode", "SFNRecipe", "MTNRecipe", "convert", "energy", "functional", "implementation", "set_lambda", "sfn_nodes", "__version__"]
