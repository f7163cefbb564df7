"""The ANN/SNN trunk switch shared by the MMDetection backbones whose trunk runs as the ANN (training) or as its T=1 SFN conversion.

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

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ...checks import check_max_spikes, check_positive_float, check_quantile
from ...io import load
from ..calib import calibration_loader, check_calib

__all__ = ["RUN_AS", "SNNNotCalibratedError", "SpikingTrunkMixin", "load_pretrained"]

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
    # the package's one set of checks (sj_sfn.checks); the stored values keep their config types
    check_positive_float(cfg.setdefault("lam", 0.25), f"{owner}: snn.lam (λ)")
    check_max_spikes(cfg.setdefault("max_spikes", 32), f"{owner}: snn.max_spikes (N)")
    check_quantile(cfg.setdefault("p", 0.99), f"{owner}: snn.p")
    if cfg.get("calib") is not None:
        cfg["calib"] = check_calib(cfg["calib"], f"{owner}: snn.calib")
    kw = cfg.setdefault("convert_kwargs", {})
    if not isinstance(kw, dict):
        raise TypeError(f"{owner}: snn.convert_kwargs must be a dict")
    return cfg


def load_pretrained(path: str, what: str) -> dict[str, torch.Tensor]:
    """The state_dict in a local pretrained checkpoint (under ``state_dict``/``model``/``module`` when nested)."""
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
