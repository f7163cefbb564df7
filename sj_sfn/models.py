"""timm registry entry points for SFormer models: ``timm.create_model('sformer_<arch>', ...)``.

Each ``sformer_<arch>`` builds timm's ``<arch>`` with random weights and rewrites it onto the
SFormer path with *uncalibrated* SFN sites in place, so a converted checkpoint (the
``state_dict`` of :func:`sj_sfn.sformer.convert`'s result) loads into it::

    import sj_sfn.models  # registers the entry points; downloads nothing
    snn = timm.create_model('sformer_vit_base_patch16_224', checkpoint_path='converted.pth')

There are no pretrained SFormer weights to download: convert a local ANN checkpoint with
:func:`sj_sfn.sformer.convert`, save ``snn.state_dict()``, and pass that file as
``checkpoint_path``. Extra keyword arguments (``num_classes``, ``img_size``, ...) go to the
timm architecture and must match the converted model; ``spike_head=False`` matches a model
converted with ``spike_head=False``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

try:
    import timm
    from timm.models import register_model
except ImportError as e:  # pragma: no cover - optional extra
    raise ImportError("sj_sfn.models needs timm: pip install 'sj-sfn[timm]'") from e

from .sformer import prepare

__all__ = ["SFORMER_ARCHS", "create_sformer"]

#: the timm architectures that have an ``sformer_`` entry point
SFORMER_ARCHS = (
    "test_vit",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_dinov2",
    "eva02_tiny_patch14_224",
    "eva02_small_patch14_224",
    "eva02_base_patch14_224",
)


def create_sformer(arch: str, pretrained: bool = False, spike_head: bool = True, **kwargs: Any) -> nn.Module:
    """timm's ``arch`` (random weights) with uncalibrated SFN sites, ready for ``load_state_dict``."""
    if pretrained:
        raise ValueError(
            f"sformer_{arch} has no downloadable weights: convert a local checkpoint with "
            f"sj_sfn.sformer.convert(timm.create_model('{arch}', checkpoint_path=...), loader), save its "
            f"state_dict, then timm.create_model('sformer_{arch}', checkpoint_path='converted.pth')"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return prepare(model, spike_head=spike_head, inplace=True)


def _entry_point(arch: str):
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_sformer(arch, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = f"sformer_{arch}"
    fn.__module__ = __name__
    fn.__doc__ = f"SFormer (one-timestep SFN) {arch}: uncalibrated sites; load a converted checkpoint."
    return fn


for _arch in SFORMER_ARCHS:
    _fn = register_model(_entry_point(_arch))
    globals()[_fn.__name__] = _fn
del _arch, _fn
