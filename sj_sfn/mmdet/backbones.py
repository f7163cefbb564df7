"""MMDetection backbones whose trunk runs as the ANN (training) or as its T=1 SFN conversion.

``SFormerViT`` (a timm ViT trunk + a ViTDet simple feature pyramid) and ``SFNTimmBackbone``
(any timm ``features_only`` CNN; ``SFNResNet`` for ResNets) share one switch, the ``snn``
argument::

    backbone=dict(type='SFormerViT', ..., snn=dict(lam=0.25, max_spikes=32, p=0.99,
                                                  calib=dict(img_dir='...', num_images=32)))

With ``snn=None`` the backbone is a plain ANN. With ``snn`` set the module holds two trunks:
``trunk`` (the ANN, trained) and ``snn_trunk`` (its SFN conversion, no gradients). In
training mode the ANN runs; in eval mode the SNN runs (``run_as='auto'``; ``'ann'``/``'snn'``
force one). The SNN is (re)calibrated from ``snn.calib`` the first time it runs after the
ANN has changed, or it comes calibrated from a converted checkpoint: its state (thresholds,
λ, N and the ``snn_calibrated`` flag) is part of the state_dict. A training step of the ANN
clears ``snn_calibrated``, so a checkpoint written after it never passes the previous SNN
trunk off as calibrated. Loading a calibrated checkpoint takes λ and N from its SFN sites
into ``snn_cfg`` (what a later recalibration uses). Evaluating an SNN that is neither
calibrated nor given a calibration source raises a :class:`SNNNotCalibratedError`.
The feature pyramid (ViT) and everything after the backbone stay floating point.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ..io import load
from .calib import calibration_loader, check_calib

__all__ = ["SFormerViT", "SFNTimmBackbone", "SFNResNet", "SNNNotCalibratedError", "SpikingTrunkMixin", "RUN_AS"]

RUN_AS = ("auto", "ann", "snn")
_SNN_KEYS = {"lam", "max_spikes", "p", "calib", "convert_kwargs"}


class SNNNotCalibratedError(RuntimeError):
    """The SNN trunk was asked to run but has no thresholds and no calibration source."""


def _check_snn(snn: Any, owner: str) -> dict[str, Any] | None:
    if snn is None:
        return None
    if not isinstance(snn, dict):
        raise TypeError(f"{owner}: snn must be None or a dict(lam=..., max_spikes=..., calib=...), got {type(snn).__name__}")
    cfg = dict(snn)
    unknown = set(cfg) - _SNN_KEYS
    if unknown:
        raise ValueError(f"{owner}: unknown snn keys {sorted(unknown)}; allowed: {sorted(_SNN_KEYS)}")
    lam = cfg.setdefault("lam", 0.25)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"{owner}: snn.lam (λ) must be a finite number > 0, got {lam!r}")
    n = cfg.setdefault("max_spikes", 32)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{owner}: snn.max_spikes (N) must be an integer >= 1, got {n!r}")
    p = cfg.setdefault("p", 0.99)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"{owner}: snn.p must be in (0, 1], got {p!r}")
    if cfg.get("calib") is not None:
        cfg["calib"] = check_calib(cfg["calib"], f"{owner}: snn.calib")
    kw = cfg.setdefault("convert_kwargs", {})
    if not isinstance(kw, dict):
        raise TypeError(f"{owner}: snn.convert_kwargs must be a dict")
    return cfg


def _load_local(path: str, what: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: pretrained checkpoint {path!r} not found (pretrained weights come from local files)")
    # a local file the config names; an mmengine checkpoint holds numpy and meta objects besides tensors
    sd = load(path, trusted=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


class SpikingTrunkMixin:
    """ANN/SNN trunk switching shared by the backbones (see the module docstring).

    Subclasses set ``self.trunk`` and call :meth:`_setup_snn`; they implement
    :meth:`_convert` (one call that converts a trunk with a calibration loader) and
    :meth:`_dummy_inputs` (a tiny input that builds the SNN structure before calibration).
    """

    trunk: nn.Module

    def _setup_snn(self, snn: dict | None) -> None:
        self.snn_cfg = _check_snn(snn, type(self).__name__)
        self.run_as = "auto"
        # _snn_stale: the ANN may have changed since the SNN trunk was last converted or loaded;
        # _snn_outdated: ... and that SNN trunk had been calibrated (for the error message).
        # Whenever _snn_stale is set, the snn_calibrated buffer is False (so is a checkpoint of it).
        self._snn_stale = False
        self._snn_outdated = False
        if self.snn_cfg is None:
            self.snn_trunk = None
            return
        self.register_buffer("snn_calibrated", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_post_hook(_sync_snn_cfg_after_load)
        # The SNN structure, uncalibrated: a checkpoint written by convert_trunk() loads straight into it.
        self.snn_trunk = self._snn_structure().requires_grad_(False)

    def init_weights(self) -> None:
        """mmengine's init_cfg first, then the local ``pretrained`` checkpoint (:meth:`load_pretrained`)."""
        if self.init_cfg is not None:
            super().init_weights()
        if self.pretrained:
            self.load_pretrained(self.pretrained)
        self._is_init = True

    # -- to be provided by subclasses ------------------------------------------------
    def load_pretrained(self, path: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _convert(self, trunk: nn.Module, loader: Iterable) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dummy_inputs(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _snn_structure(self) -> nn.Module:
        """The converted structure with placeholder thresholds (a conversion on one random batch)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._convert(self.trunk, [self._dummy_inputs()])

    # -- public ----------------------------------------------------------------------
    @property
    def is_snn_ready(self) -> bool:
        """Whether the SNN trunk holds thresholds calibrated on the current ANN weights."""
        return self.snn_cfg is not None and bool(self.snn_calibrated) and not self._snn_stale

    def snn_site_settings(self) -> dict[str, list]:
        """λ and N of every SFN site of the SNN trunk, in module order: ``{'lam': [...], 'max_spikes': [...]}``."""
        from sj_sfn import sfn_nodes

        if self.snn_cfg is None:
            raise ValueError(f"{type(self).__name__} was built with snn=None: there is no SNN trunk")
        nodes = [m for _, m in sfn_nodes(self.snn_trunk)]
        # λ is a float32 buffer: its shortest decimal form (0.6, not 0.6000000238) round-trips to the same threshold
        return {"lam": [float(str(m.lam.detach().cpu().numpy()[()])) for m in nodes], "max_spikes": [int(m.max_spikes) for m in nodes]}

    def _mark_stale(self) -> None:
        """The ANN trunk (may have) changed: the SNN trunk is no longer calibrated, in memory and in the state_dict."""
        if self.snn_cfg is None:
            return
        if not self._snn_stale:  # once per change, not every training step (bool() syncs a GPU)
            self._snn_outdated = self._snn_outdated or bool(self.snn_calibrated)
            self._snn_stale = True
        self.snn_calibrated.fill_(False)

    def set_run_as(self, mode: str) -> None:
        """``'auto'`` (train → ANN, eval → SNN), ``'ann'`` or ``'snn'``."""
        if mode not in RUN_AS:
            raise ValueError(f"run_as must be one of {RUN_AS}, got {mode!r}")
        if mode == "snn" and self.snn_cfg is None:
            raise ValueError(f"{type(self).__name__} was built with snn=None: there is no SNN trunk to run")
        self.run_as = mode

    @torch.no_grad()
    def convert_trunk(self, loader: Iterable | None = None, lam: float | None = None) -> nn.Module:
        """Convert the ANN trunk with ``loader`` (backbone inputs) or ``snn.calib``; returns the SNN trunk.

        ``lam`` overrides ``snn.lam``. The ANN trunk is left untouched.
        """
        if self.snn_cfg is None:
            raise ValueError(f"{type(self).__name__} was built with snn=None: set snn=dict(...) to convert its trunk")
        if lam is not None:
            self.snn_cfg["lam"] = _check_snn({"lam": lam}, type(self).__name__)["lam"]
        if loader is None:
            calib = self.snn_cfg.get("calib")
            if calib is None:
                raise SNNNotCalibratedError(
                    f"{type(self).__name__}: the SNN trunk needs calibration but the config gives no calibration source. "
                    "Add backbone.snn.calib=dict(img_dir='folder of images') or dict(dataset=dict(...)), "
                    "or load a converted checkpoint written by detection/convert.py."
                )
            loader = calibration_loader(calib)
        device = next(self.trunk.parameters()).device
        loader = _ToDevice(loader, device)
        self.snn_trunk = self._convert(self.trunk, loader).requires_grad_(False)
        self.snn_calibrated.fill_(True)
        self._snn_stale = self._snn_outdated = False
        return self.snn_trunk

    def set_lambda(self, lam: float) -> int:
        """Rescale every SFN threshold of the SNN trunk to ``λ = lam`` (no recalibration); returns the site count."""
        from sj_sfn import set_lambda

        if self.snn_cfg is None:
            raise ValueError(f"{type(self).__name__} was built with snn=None")
        self.snn_cfg["lam"] = float(lam)
        return set_lambda(self.snn_trunk, lam)

    def active_trunk(self) -> nn.Module:
        """The trunk the next forward uses (converting first when the SNN is due and a source is given)."""
        use_snn = self.snn_cfg is not None and (self.run_as == "snn" or (self.run_as == "auto" and not self.training))
        if not use_snn:
            if self.training and self.snn_cfg is not None:
                self._mark_stale()
            return self.trunk
        if not self.is_snn_ready:
            if self._snn_outdated and self.snn_cfg.get("calib") is None:
                raise SNNNotCalibratedError(
                    f"{type(self).__name__}: the ANN trunk changed (was trained) after the SNN was calibrated and the config gives "
                    "no calibration source (backbone.snn.calib) to recalibrate it; add one, or convert again with detection/convert.py"
                )
            self.convert_trunk()
        return self.snn_trunk

    def run_trunk(self, x: torch.Tensor):
        trunk = self.active_trunk()
        if trunk is self.snn_trunk:
            from spikingjelly.activation_based import functional as sjf

            sjf.reset_net(trunk)  # T = 1: every image starts from a zero membrane
            out = trunk(x)
            sjf.reset_net(trunk)
            return out
        return trunk(x)

    # -- state -----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        flag = prefix + "snn_calibrated"
        if self.snn_cfg is None:
            # a converted checkpoint also loads into an ANN-only config: its SNN part is ignored
            for k in [k for k in state_dict if k == flag or k.startswith(prefix + "snn_trunk.")]:
                del state_dict[k]
        elif flag not in state_dict:
            # an ANN checkpoint: keep the (uncalibrated) SNN structure as it is
            for k, v in self.snn_trunk.state_dict().items():
                state_dict.setdefault(prefix + "snn_trunk." + k, v)
            state_dict[flag] = torch.zeros((), dtype=torch.bool)
            self._snn_stale, self._snn_outdated = True, False
        else:
            # the checkpoint's flag is the truth: a trunk saved stale carries snn_calibrated=False
            self._snn_stale, self._snn_outdated = False, False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _sync_snn_cfg_after_load(module: SpikingTrunkMixin, incompatible_keys) -> None:
    """After a calibrated SNN trunk is loaded (children included), ``snn_cfg`` takes λ and N from its SFN sites.

    A converted checkpoint may run at another λ/N than the config (``convert.py --lam/--tune/--max-spikes``);
    a value shared by every site replaces the config's, so reports and a later recalibration use it.
    """
    if module.snn_cfg is None or module._snn_stale or not bool(module.snn_calibrated):
        return
    sites = module.snn_site_settings()
    for key, cast in (("lam", float), ("max_spikes", int)):
        values = set(sites[key])
        if len(values) == 1:
            module.snn_cfg[key] = cast(values.pop())


class _ToDevice:
    def __init__(self, loader: Iterable, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self):
        from sj_sfn.utils import batch_inputs

        for b in self.loader:
            yield batch_inputs(b).to(self.device)


def _cnn_convert():
    import sj_sfn

    fn = getattr(sj_sfn, "convert", None)
    if not callable(fn):
        from sj_sfn.conversion import convert as fn
    return fn


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

        sd = checkpoint_filter_fn(_load_local(path, "SFormerViT"), self.trunk)
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
        return _cnn_convert()(trunk, loader, lam=c["lam"], max_spikes=c["max_spikes"], p=c["p"], progress=False, **c["convert_kwargs"])

    def load_pretrained(self, path: str) -> None:
        """Load a local classification checkpoint into the trunk (classifier weights dropped)."""
        own = self.trunk.state_dict()
        sd = {k: v for k, v in _load_local(path, type(self).__name__).items() if k in own}
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
