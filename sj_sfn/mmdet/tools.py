"""Train, convert and evaluate MMDetection detectors with SFN backbones (what ``detection/*.py`` call).

    cfg = load_config('detection/configs/shapes/mask-rcnn_sformer-vit-tiny_shapes.py', data_root=root)
    train(cfg, work_dir)                                           # mmengine Runner, ANN backbone
    model = build_detector(cfg, 'work/epoch_12.pth')
    convert_detector(model, calib_loader_from_cfg(cfg, 'train'), lam=0.25)
    save_checkpoint(model, 'work/snn.pth')                        # loads straight into the SNN form
    evaluate(model, cfg, 'val', run_as='snn')                     # {'bbox_mAP': ..., 'segm_mAP': ...}
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..io import CheckpointError, save, unrestricted_torch_load
from .backbones import RUN_AS, SpikingTrunkMixin
from .calib import CalibrationLoader, calibration_loader

__all__ = [
    "load_config",
    "set_epochs",
    "train",
    "build_detector",
    "spiking_backbone",
    "run_as",
    "calib_from_cfg",
    "calib_loader_from_cfg",
    "convert_detector",
    "save_checkpoint",
    "evaluate",
    "backbone_energy",
    "tune_detector_lambda",
    "metric_names",
    "check_metric",
]

_SPLITS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


def _ensure_env() -> None:
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)


def load_config(path: str, data_root: str | None = None, cfg_options: dict | None = None, work_dir: str | None = None):
    """Read an mmdet config; ``data_root`` replaces the data root of every data loader (and the evaluators' ann files)."""
    from mmengine.config import Config

    _ensure_env()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path!r} not found")
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if data_root is not None:
        root = os.path.join(os.path.abspath(data_root), "")
        for key in _SPLITS.values():
            dl = cfg.get(key)
            if dl is None:
                continue
            ds = dl["dataset"]
            ds = ds.get("dataset", ds)  # RepeatDataset / ClassBalancedDataset wrappers
            ds["data_root"] = root
            ev_key = key.replace("dataloader", "evaluator")
            ev = cfg.get(ev_key)
            if ev is not None and ds.get("ann_file"):
                for e in ev if isinstance(ev, list) else [ev]:
                    if "ann_file" in e:
                        e["ann_file"] = os.path.join(root, ds["ann_file"])
        calib = ((cfg.model.get("backbone") or {}).get("snn") or {}).get("calib")
        if calib and calib.get("dataset") is not None:
            calib["dataset"]["data_root"] = root
    _fill_calib_defaults(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    return cfg


def _test_pipeline(cfg, required: bool = False) -> list[dict] | None:
    """The config's test pipeline without annotation loading (calibration images have none)."""
    dl = cfg.get("test_dataloader")
    pipe = None
    if dl is not None:
        ds = dl["dataset"]
        pipe = ds.get("dataset", ds).get("pipeline")
    if pipe is None:
        if required:
            raise ValueError("the config has no test_dataloader.dataset.pipeline to preprocess calibration images with")
        return None
    return [t for t in copy.deepcopy(pipe) if t["type"] != "LoadAnnotations"]


def _fill_calib_defaults(cfg) -> None:
    """``snn.calib`` without its own ``pipeline`` (for ``img_dir``) or ``preprocessor`` takes the config's test
    pipeline and the detector's ``data_preprocessor``, so self-calibration sees what the backbone will see."""
    calib = ((cfg.model.get("backbone") or {}).get("snn") or {}).get("calib")
    if not calib:
        return
    if calib.get("img_dir") is not None and calib.get("pipeline") is None:
        pipe = _test_pipeline(cfg)
        if pipe is not None:
            calib["pipeline"] = pipe
    if calib.get("preprocessor") is None and cfg.model.get("data_preprocessor") is not None:
        calib["preprocessor"] = copy.deepcopy(cfg.model.data_preprocessor)


def set_epochs(cfg, epochs: int) -> None:
    """Train for ``epochs``: ``train_cfg.max_epochs``, and every epoch-based schedule that ran to the old
    length stretched to the new one (``end``, and ``milestones`` scaled by ``epochs/old``); a checkpoint or
    validation interval beyond the old length (save the last only, never validate) follows the new one."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    old = int(cfg.train_cfg.max_epochs)
    cfg.train_cfg.max_epochs = epochs
    if cfg.train_cfg.get("val_interval", 1) > old:  # "never during training" stays never
        cfg.train_cfg.val_interval = epochs + 1
    schedulers = cfg.get("param_scheduler") or []
    for s in [schedulers] if isinstance(schedulers, dict) else schedulers:
        if not s.get("by_epoch", True):
            continue  # iteration-based (warm-up) schedules keep their length
        if s.get("end") is not None and s["end"] >= old:
            s["end"] = epochs
        if s.get("milestones"):
            s["milestones"] = sorted({max(1, min(epochs, round(m * epochs / old))) for m in s["milestones"]})
        if s.get("T_max") is not None and s.get("T_max") >= old:
            s["T_max"] = epochs
    ck = (cfg.get("default_hooks") or {}).get("checkpoint")
    if ck is not None and ck.get("interval", 1) >= old:
        ck["interval"] = epochs


def train(cfg, work_dir: str | None = None, validate: bool = True, quiet: bool = True):
    """Train with mmengine's ``Runner`` (the backbone runs as the ANN); returns the runner (``runner.model``).

    ``validate=False`` drops the validation loop (mmengine otherwise validates after the last
    epoch, which runs the SNN backbone when ``snn`` is configured).
    """
    from mmengine.runner import Runner

    _ensure_env()
    cfg = copy.deepcopy(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    if not validate:
        cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    if cfg.get("work_dir") is None:
        raise ValueError("train needs a work_dir (where checkpoints and logs go)")
    if quiet:
        cfg.log_level = "WARNING"
    runner = Runner.from_cfg(cfg)
    with unrestricted_torch_load():  # resume / load_from read mmengine checkpoints (numpy and meta objects)
        runner.train()
    return runner


def build_detector(cfg, checkpoint: str | None = None, device: str = "cpu") -> nn.Module:
    """``mmdet.apis.init_detector`` on a copy of ``cfg`` (a converted checkpoint fills the SNN trunk too)."""
    from mmdet.apis import init_detector

    _ensure_env()
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found")
    if checkpoint is not None:
        _check_readable(checkpoint)
    with _quiet(), unrestricted_torch_load():  # an mmengine checkpoint holds numpy and meta objects besides tensors
        model = init_detector(copy.deepcopy(cfg), checkpoint, device=device)
    return model


def spiking_backbone(model: nn.Module) -> SpikingTrunkMixin:
    """The SFN-convertible backbone of a detector (``model.backbone``), or a TypeError."""
    bb = getattr(model, "backbone", None)
    if not isinstance(bb, SpikingTrunkMixin):
        raise TypeError(
            f"the detector's backbone is {type(bb).__name__}, not an sj_sfn backbone (SFormerViT, SFNTimmBackbone, SFNResNet)"
        )
    return bb


def _check_readable(path: str) -> None:
    """A checkpoint that is not a torch file (text, random bytes, truncated) is one clear error, not an unpickler's."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    legacy = head[:1] == b"\x80"  # torch's pre-1.6 format: a pickle (protocol byte 0x80)
    if not head or not (zipfile.is_zipfile(path) or legacy):
        raise CheckpointError(f"cannot read {path}: not a torch checkpoint or corrupt")


@contextlib.contextmanager
def run_as(model: nn.Module, mode: str):
    """Context manager: run the detector's backbone as ``'ann'``, ``'snn'`` or ``'auto'``."""
    if mode not in RUN_AS:
        raise ValueError(f"run_as must be one of {RUN_AS}, got {mode!r}")
    bb = spiking_backbone(model)
    old = bb.run_as
    bb.set_run_as(mode)
    try:
        yield model
    finally:
        bb.run_as = old


def calib_from_cfg(cfg, split: str = "train", num_images: int = 32, batch_size: int = 2) -> dict[str, Any]:
    """A calibration source (``snn.calib`` dict) from the config: ``split``'s images through the TEST pipeline."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    dl = cfg.get(_SPLITS[split])
    if dl is None:
        raise ValueError(f"the config has no {_SPLITS[split]}")
    ds = copy.deepcopy(dl["dataset"])
    ds = ds.get("dataset", ds)
    ds = dict(ds)
    ds["pipeline"] = _test_pipeline(cfg, required=True)
    ds["test_mode"] = True
    ds.pop("filter_cfg", None)
    return dict(dataset=ds, num_images=num_images, batch_size=batch_size)


def calib_loader_from_cfg(cfg, split: str = "train", num_images: int = 32, batch_size: int = 2,
                          model: nn.Module | None = None, img_dir: str | None = None) -> CalibrationLoader:
    """Backbone inputs for calibration: images of ``split`` (or of ``img_dir``) through the test pipeline and the
    detector's ``data_preprocessor`` (``model.data_preprocessor`` when given, else the config's)."""
    if img_dir is not None:
        calib = dict(img_dir=img_dir, pipeline=_test_pipeline(cfg, required=True), num_images=num_images, batch_size=batch_size)
    else:
        calib = calib_from_cfg(cfg, split, num_images, batch_size)
    pre = model.data_preprocessor if model is not None else copy.deepcopy(cfg.model.get("data_preprocessor"))
    with _quiet():
        return calibration_loader(calib, pre)


def convert_detector(model: nn.Module, loader: Iterable | None = None, lam: float | None = None) -> nn.Module:
    """Convert the detector's backbone trunk to SFN (``loader`` of backbone inputs, or the config's ``snn.calib``)."""
    bb = spiking_backbone(model)
    if bb.snn_cfg is None:
        raise ValueError("the backbone was built with snn=None: set model.backbone.snn=dict(lam=..., max_spikes=...) to convert it")
    bb.convert_trunk(loader, lam=lam)
    return model


def save_checkpoint(model: nn.Module, path: str, meta: dict | None = None) -> str:
    """Write ``model``'s state (ANN and SNN trunks) as an mmengine checkpoint that ``init_detector`` loads."""
    from mmengine.runner.checkpoint import weights_to_cpu

    full_meta = dict(meta or {})
    ds_meta = getattr(model, "dataset_meta", None)
    if ds_meta is not None:
        full_meta.setdefault("dataset_meta", copy.deepcopy(ds_meta))
    bb = getattr(model, "backbone", None)
    if isinstance(bb, SpikingTrunkMixin) and bb.snn_cfg is not None:
        full_meta.setdefault("sj_sfn", {"lam": bb.snn_cfg["lam"], "max_spikes": bb.snn_cfg["max_spikes"], "p": bb.snn_cfg["p"],
                                        "calibrated": bool(bb.snn_calibrated)})
    return save({"meta": full_meta, "state_dict": weights_to_cpu(model.state_dict())}, path, "checkpoint")


@contextlib.contextmanager
def _quiet():
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _dataloader(cfg, split: str, batch_size: int = 1):
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    dl = copy.deepcopy(cfg.get(_SPLITS[split]))
    if dl is None:
        raise ValueError(f"the config has no {_SPLITS[split]}")
    dl["batch_size"] = batch_size
    dl["num_workers"] = 0
    dl["persistent_workers"] = False
    with DefaultScope.overwrite_default_scope("mmdet"):
        return Runner.build_dataloader(dl)


@torch.no_grad()
def evaluate(model: nn.Module, cfg, split: str = "val", run_as_mode: str | None = None, quiet: bool = True) -> dict[str, float]:
    """COCO metrics of ``model`` on ``split`` with the config's evaluator, plus ``seconds_per_image`` (forward only).

    ``run_as_mode``: ``'ann'``/``'snn'`` force the backbone's form; ``None`` leaves it (eval → SNN when configured).
    """
    from mmengine.evaluator import Evaluator
    from mmengine.registry import DefaultScope

    _ensure_env()
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    loader = _dataloader(cfg, split)
    ev_cfg = copy.deepcopy(cfg.get(split + "_evaluator"))
    with DefaultScope.overwrite_default_scope("mmdet"):
        evaluator = Evaluator(ev_cfg)
    evaluator.dataset_meta = loader.dataset.metainfo
    model.eval()
    ctx = run_as(model, run_as_mode) if run_as_mode is not None else contextlib.nullcontext()
    seconds, images = 0.0, 0
    with ctx:
        for batch in loader:
            t0 = time.perf_counter()
            outs = model.test_step(batch)
            seconds += time.perf_counter() - t0
            images += len(outs)
            evaluator.process(data_samples=outs, data_batch=batch)
    with _quiet() if quiet else contextlib.nullcontext():
        metrics = evaluator.evaluate(len(loader.dataset))
    out = {k.split("/")[-1]: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    # CocoMetric returns nothing when the detector predicted nothing at all: that is AP 0
    kinds = ev_cfg.get("metric", "bbox") if isinstance(ev_cfg, dict) else "bbox"
    for kind in [kinds] if isinstance(kinds, str) else kinds:
        for suffix in ("mAP", "mAP_50", "mAP_75"):
            out.setdefault(f"{kind}_{suffix}", 0.0)
    out["seconds_per_image"] = seconds / max(images, 1)
    return out


def backbone_energy(model: nn.Module, loader: Iterable, num_batches: int | None = None):
    """``sj_sfn.energy.measure_energy`` of the backbone trunk: SNN trunk vs ANN trunk on backbone inputs."""
    from sj_sfn.energy import measure_energy

    bb = spiking_backbone(model)
    if bb.snn_cfg is None or not bool(bb.snn_calibrated):
        raise ValueError("the backbone has no calibrated SNN trunk: convert it first")
    return measure_energy(bb.snn_trunk, loader, ann=bb.trunk, num_batches=num_batches)


def metric_names(cfg, split: str = "val") -> list[str]:
    """The COCO metric keys ``evaluate`` returns for the config's ``split`` evaluator (``bbox_mAP``, ``segm_mAP_50``, ...)."""
    ev = cfg.get(_SPLITS[split].replace("dataloader", "evaluator"))
    kinds: list[str] = []
    for e in ev if isinstance(ev, list) else [ev] if ev is not None else []:
        m = e.get("metric", "bbox")
        kinds += [m] if isinstance(m, str) else list(m)
    return [f"{k}_mAP{s}" for k in kinds for s in ("", "_50", "_75", "_s", "_m", "_l")]


def check_metric(cfg, metric: str, split: str = "val") -> None:
    """Raise a ``ValueError`` naming the valid keys when ``split``'s evaluator does not report ``metric``."""
    names = metric_names(cfg, split)
    if metric not in names:
        raise ValueError(f"metric {metric!r} is not one the {split} evaluator reports: {', '.join(names)}")


def tune_detector_lambda(model: nn.Module, cfg, energy_loader: Iterable, split: str = "val", metric: str = "bbox_mAP",
                         trials: int = 12, bounds: tuple[float, float] = (0.05, 1.0), objective: str = "accuracy",
                         beta: float = 10.0, seed: int = 0, progress: bool = False):
    """λ by Bayesian optimisation (``sj_sfn.tune.tune_lambda``) with COCO ``metric`` (×100) on ``split`` as the score.

    Each trial rescales the SNN trunk's thresholds (no recalibration) and evaluates the whole
    detector; ``energy_loader`` (backbone inputs of ``split``) gives the backbone energy ratio.
    Returns the ``TuneResult``; the best λ is applied to the model.
    """
    from sj_sfn.tune import tune_lambda

    bb = spiking_backbone(model)
    if split == "test":
        raise ValueError("tune λ on a validation split, never on the test split")
    check_metric(cfg, metric, split)
    if not bb.is_snn_ready:  # convert first: a conversion inside a trial would replace the trunk being tuned
        bb.convert_trunk()
    snn = bb.snn_trunk

    def coco_metric(_snn: nn.Module, _loader: Iterable) -> float:
        if bb.snn_trunk is not snn:
            raise RuntimeError("the detector's SNN trunk was re-converted during tuning: λ trials would not reach it")
        return 100.0 * evaluate(model, cfg, split, run_as_mode="snn")[metric]

    result = tune_lambda(bb.snn_trunk, energy_loader, metric=coco_metric, objective=objective, beta=beta, trials=trials,
                         bounds=bounds, seed=seed, ann=bb.trunk, progress=progress)
    result.apply(bb.snn_trunk)
    bb.snn_cfg["lam"] = float(result.best_lam)
    return result
