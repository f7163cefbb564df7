"""MMDetection backbones whose trunk runs as the ANN (training) or as its T=1 SFN conversion, one file per family.

- :mod:`.base`: ``SpikingTrunkMixin``, the ANN/SNN trunk switch every backbone shares (``snn`` config, calibration,
  checkpoint state) — see its module doc;
- :mod:`.sformer_vit`: ``SFormerViT`` (a timm ViT trunk with a ViTDet simple feature pyramid);
- :mod:`.timm_cnn`: ``SFNTimmBackbone`` (any timm ``features_only`` CNN) and ``SFNResNet``.

Each is registered in MMDetection's ``MODELS`` under its class name.
"""

from __future__ import annotations

from .base import RUN_AS, SNNNotCalibratedError, SpikingTrunkMixin
from .sformer_vit import SFormerViT
from .timm_cnn import SFNResNet, SFNTimmBackbone

__all__ = ["SFormerViT", "SFNTimmBackbone", "SFNResNet", "SNNNotCalibratedError", "SpikingTrunkMixin", "RUN_AS"]
