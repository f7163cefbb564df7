"""MMDetection 3.x integration: SFN-convertible backbones (``SFormerViT``, ``SFNTimmBackbone``, ``SFNResNet``).

Import it from a config with ``custom_imports = dict(imports=['sj_sfn.mmdet'])``; it registers
the backbones in mmdet's ``MODELS`` registry. Needs the ``det`` extra
(``pip install 'sj-sfn[det]'``: mmengine, mmdet, and mmcv with its ops).
"""

from __future__ import annotations

try:
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
    from mmdet.registry import MODELS  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"sj_sfn.mmdet needs MMDetection 3.x ({e}); install the extra: pip install 'sj-sfn[det]' "
        "(mmcv with its C++ ops is also required: see scripts/install.sh)"
    ) from e

from .backbones import RUN_AS, SFNResNet, SFNTimmBackbone, SFormerViT, SNNNotCalibratedError, SpikingTrunkMixin
from .calib import calibration_loader, check_calib

__all__ = [
    "RUN_AS",
    "SFNResNet",
    "SFNTimmBackbone",
    "SFormerViT",
    "SNNNotCalibratedError",
    "SpikingTrunkMixin",
    "calibration_loader",
    "check_calib",
]
