"""``SFNTimmBackbone`` (any timm ``features_only`` CNN) and ``SFNResNet``: the trunk runs as the ANN or its SFN conversion."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ...conversion import convert
from .base import SpikingTrunkMixin, load_pretrained

__all__ = ["SFNTimmBackbone", "SFNResNet"]


@MODELS.register_module()
class SFNTimmBackbone(SpikingTrunkMixin, BaseModule):
    """Any timm CNN in ``features_only`` mode as an mmdet backbone; its trunk converts with ``sj_sfn.convert``.

    :param model_name: timm model (``resnet50``, ``resnet18``, ``resnet10t``, ``mobilenetv2_100``, ...)
    :param out_indices: feature levels to return (``(1, 2, 3, 4)`` = strides 4..32 for ResNets)
    :param pretrained: local checkpoint of the classification model, loaded into the trunk by ``init_weights``
    :param norm_eval: keep BatchNorm layers in eval mode while training (usual with pretrained weights)
    :param frozen_stages: as mmdet's ResNet: ``-1`` trains everything, ``0`` freezes the stem, ``k``
        the stem and the first ``k`` stages (timm's feature levels: level 0 is the stem's output).
        Frozen parameters get no gradient and their BatchNorms stay in eval mode.
    :param timm_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``channels``, ``layers``)
    :param snn: ``None`` (ANN only) or ``dict(lam, max_spikes, p, calib, convert_kwargs)`` for ``sj_sfn.convert``
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        out_indices: tuple[int, ...] = (1, 2, 3, 4),
        pretrained: str | None = None,
        norm_eval: bool = False,
        frozen_stages: int = -1,
        timm_kwargs: dict | None = None,
        snn: dict | None = None,
        init_cfg: dict | None = None,
    ):
        import timm

        super().__init__(init_cfg=init_cfg)
        self.trunk = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **(timm_kwargs or {}))
        self.out_channels = list(self.trunk.feature_info.channels())
        self.out_strides = list(self.trunk.feature_info.reduction())
        self.pretrained = pretrained
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self._frozen = self._freeze_stages(frozen_stages)
        self._setup_snn(snn)

    def _freeze_stages(self, stages: int) -> list[nn.Module]:
        """Stop the gradient of every trunk parameter up to the end of feature level ``stages``; return those modules."""
        levels = [info["module"] for info in self.trunk.feature_info.info]
        if isinstance(stages, bool) or not isinstance(stages, int) or not -1 <= stages < len(levels):
            raise ValueError(f"{type(self).__name__}: frozen_stages must be an int in [-1, {len(levels) - 1}], got {stages!r}")
        if stages < 0:
            return []
        names = [n for n, _ in self.trunk.named_modules()]
        last = next((m for m in (levels[stages], levels[stages].replace(".", "_")) if m in names), None)
        if last is None:  # pragma: no cover - timm names its feature modules after real submodules
            raise ValueError(f"{type(self).__name__}: cannot find the trunk module {levels[stages]!r} to freeze up to")
        frozen, seen = [], False
        for name, module in self.trunk.named_modules():  # pre-order: the forward order of timm's stages
            inside = name == last or name.startswith(last + ".")
            if seen and not inside:
                break
            seen = seen or inside
            if not name or last.startswith(name + "."):  # the trunk, or a container that also holds later stages
                continue
            frozen.append(module)
        for module in frozen:
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
        return frozen

    def _dummy_inputs(self) -> torch.Tensor:
        s = max(64, 2 * max(self.out_strides))
        return torch.randn(2, 3, s, s, device=next(self.trunk.parameters()).device)

    def _convert(self, trunk: nn.Module, loader: Iterable) -> nn.Module:
        c = self.snn_cfg
        return convert(trunk, loader, lam=c["lam"], max_spikes=c["max_spikes"], p=c["p"], progress=False, **c["convert_kwargs"])

    def load_pretrained(self, path: str) -> None:
        """Load a local classification checkpoint into the trunk (classifier weights dropped)."""
        own = self.trunk.state_dict()
        sd = {k: v for k, v in load_pretrained(path, type(self).__name__).items() if k in own}
        if not sd:
            raise ValueError(f"{type(self).__name__}: no tensor of {path} matches the trunk's names")
        missing, _ = self.trunk.load_state_dict(sd, strict=False)
        if missing:
            warnings.warn(f"{type(self).__name__}: {len(missing)} trunk tensors not in {path}: {missing[:5]}...", stacklevel=2)
        self._mark_stale()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self._frozen:
                m.eval()
        if mode and self.norm_eval:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.run_trunk(x))


@MODELS.register_module()
class SFNResNet(SFNTimmBackbone):
    """A timm ResNet (``resnet{depth}``) as an SFN-convertible mmdet backbone; see :class:`SFNTimmBackbone`."""

    def __init__(self, depth: int = 50, **kwargs: Any):
        if depth not in (10, 14, 18, 26, 34, 50, 101, 152):
            raise ValueError(f"SFNResNet: unsupported depth {depth}")
        name = "resnet10t" if depth == 10 else "resnet14t" if depth == 14 else f"resnet{depth}"
        super().__init__(model_name=name, **kwargs)
