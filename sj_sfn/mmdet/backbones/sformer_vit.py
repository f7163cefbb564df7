"""``SFormerViT``: a timm ViT trunk with a ViTDet simple feature pyramid; the trunk runs as the ANN or its SFormer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from .base import SpikingTrunkMixin, load_pretrained

__all__ = ["SFormerViT"]


def _layer_norm_2d(c: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(c)


@MODELS.register_module()
class SFormerViT(SpikingTrunkMixin, BaseModule):
    """ViTDet-style backbone: a timm ViT trunk and a simple feature pyramid (one map per stride).

    The trunk's patch tokens form a map at stride ``patch``; stride ``s`` is reached with
    ``log2(patch/s)`` transposed convolutions (LayerNorm2d + GELU between them, channels halved
    each time) when ``s < patch``, identity when ``s = patch``, max-pooling by ``s/patch`` when
    ``s > patch``. Only the trunk is converted to SFN.

    :param model_name: timm ViT family entry (``vit_base_patch16_224``, ``vit_small_patch16_224``, EVA, ...)
    :param img_size: nominal input size (position embeddings are resampled to the actual size)
    :param patch_size, embed_dim, depth, num_heads, mlp_ratio: override the architecture (``None`` = the model's)
    :param out_strides: strides of the returned maps (powers of two times ``patch_size``)
    :param drop_path_rate: stochastic depth of the trunk
    :param pretrained: local ViT checkpoint (timm/MAE/DeiT layout) loaded into the trunk by ``init_weights``
    :param timm_kwargs: extra keyword arguments for ``timm.create_model``
    :param snn: ``None`` (ANN only) or ``dict(lam, max_spikes, p, calib, convert_kwargs)`` for ``sj_sfn.sformer.convert``
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        img_size: int | tuple[int, int] = 1024,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        out_strides: tuple[int, ...] = (4, 8, 16, 32),
        drop_path_rate: float = 0.0,
        pretrained: str | None = None,
        timm_kwargs: dict | None = None,
        snn: dict | None = None,
        init_cfg: dict | None = None,
    ):
        import timm

        super().__init__(init_cfg=init_cfg)
        kw: dict[str, Any] = dict(img_size=img_size, num_classes=0, global_pool="", dynamic_img_size=True, drop_path_rate=drop_path_rate)
        for k, v in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
            if v is not None:
                kw[k] = v
        kw.update(timm_kwargs or {})
        trunk = timm.create_model(model_name, pretrained=False, **kw)
        if not hasattr(trunk, "patch_embed") or not hasattr(trunk, "blocks"):
            raise TypeError(f"SFormerViT needs a timm ViT-like model (patch_embed + blocks), {model_name!r} is {type(trunk).__name__}")
        self.trunk = trunk
        self.pretrained = pretrained
        pe = trunk.patch_embed
        ratio = pe.feat_ratio() if callable(getattr(pe, "feat_ratio", None)) else pe.patch_size
        # the trunk's stride: the patch size, times the stem's reduction for hybrid (conv stem) ViTs
        self.patch_size = int(ratio[0] if isinstance(ratio, (tuple, list)) else ratio)
        dim = int(trunk.embed_dim)
        self.out_strides = tuple(int(s) for s in out_strides)
        self.pyramid = nn.ModuleList()
        self.out_channels: list[int] = []
        for s in self.out_strides:
            ratio = self.patch_size / s
            k = round(math.log2(ratio)) if ratio > 0 else None
            if k is None or 2.0**k != ratio:
                raise ValueError(f"SFormerViT: out stride {s} is not a power-of-two multiple or fraction of patch size {self.patch_size}")
            layers: list[nn.Module] = []
            c = dim
            if k > 0:
                for i in range(k):
                    if c % 2:
                        raise ValueError(f"SFormerViT: embed_dim {dim} cannot be halved {k} times for stride {s}")
                    if i:
                        layers += [_layer_norm_2d(c), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(c, c // 2, 2, stride=2))
                    c //= 2
            elif k < 0:
                layers.append(nn.MaxPool2d(2 ** (-k), 2 ** (-k)))
            self.pyramid.append(nn.Sequential(*layers) if layers else nn.Identity())
            self.out_channels.append(c)
        self._setup_snn(snn)

    def _dummy_inputs(self) -> torch.Tensor:
        s = 2 * self.patch_size
        return torch.randn(1, 3, s, s, device=next(self.trunk.parameters()).device)

    def _snn_structure(self) -> nn.Module:
        from sj_sfn import sformer

        return sformer.prepare(self.trunk)

    def _convert(self, trunk: nn.Module, loader: Iterable) -> nn.Module:
        from sj_sfn import sformer

        c = self.snn_cfg
        return sformer.convert(trunk, loader, lam=c["lam"], max_spikes=c["max_spikes"], p=c["p"], progress=False, **c["convert_kwargs"])

    def load_pretrained(self, path: str) -> None:
        """Load a local ViT checkpoint into the ANN trunk (position embeddings resampled; heads dropped)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = checkpoint_filter_fn(load_pretrained(path, "SFormerViT"), self.trunk)
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.")) or k in self.trunk.state_dict()}
        missing, unexpected = self.trunk.load_state_dict(sd, strict=False)
        if missing:
            warnings.warn(f"SFormerViT: {len(missing)} trunk tensors not in {path}: {missing[:5]}...", stacklevel=2)
        self._mark_stale()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, _, h, w = x.shape
        tokens = self.run_trunk(x)
        pe = self.trunk.patch_embed
        gh, gw = pe.dynamic_feat_size((h, w)) if hasattr(pe, "dynamic_feat_size") else (h // self.patch_size, w // self.patch_size)
        npt = int(getattr(self.trunk, "num_prefix_tokens", 0))
        feat = tokens[:, npt:].transpose(1, 2).reshape(b, -1, gh, gw)
        return tuple(layer(feat) for layer in self.pyramid)
