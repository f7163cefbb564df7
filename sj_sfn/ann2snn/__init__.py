"""FX conversion recipes for SpikingJelly's ``ann2snn.Converter`` (CNNs, ReLU family)."""

from .matching import ActivationMatch, match_relu_family, unsupported_activation
from .recipes import MTNRecipe, SFNRecipe, adapt_step_mode, fuse_conv_bn

__all__ = ["SFNRecipe", "MTNRecipe", "fuse_conv_bn", "adapt_step_mode", "ActivationMatch", "match_relu_family",
           "unsupported_activation"]
