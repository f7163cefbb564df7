"""FX conversion recipes for SpikingJelly's ``ann2snn.Converter`` (CNNs, ReLU family) and their graph passes."""

from .inputs import TraceMismatchError, calibration_loader, check_model
from .matching import ActivationMatch, match_relu_family, unsupported_activation
from .passes import InPlaceError, adapt_step_mode, functionalize_inplace, fuse_conv_bn
from .recipes import MTNRecipe, SFNRecipe

__all__ = ["SFNRecipe", "MTNRecipe", "fuse_conv_bn", "adapt_step_mode", "functionalize_inplace", "InPlaceError",
           "TraceMismatchError", "calibration_loader", "check_model", "ActivationMatch", "match_relu_family",
           "unsupported_activation"]
