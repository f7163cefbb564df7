"""sj-sfn: one-timestep ANN-to-SNN conversion for SpikingJelly (MTN, SFN, SFormer)."""

from . import functional
from .neuron import MTNode, SFNode, _register_with_spikingjelly, set_lambda, sfn_nodes
from .version import __version__

_register_with_spikingjelly()

__all__ = ["MTNode", "SFNode", "functional", "set_lambda", "sfn_nodes", "__version__"]
