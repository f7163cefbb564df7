"""Calibration images for a detector backbone, through the detector's own data pipeline.

A calibration source is a dict (the ``snn.calib`` entry of a backbone config, or the
``--calib-*`` options of ``detection/convert.py``)::

    calib = dict(
        img_dir='data/coco/val2017',          # a folder of images, or
        dataset=dict(type='CocoDataset', ...),  # any mmdet dataset config (its pipeline is used)
        pipeline=[...],                       # for img_dir: the test pipeline (default: resize to 1333x800)
        preprocessor=dict(type='DetDataPreprocessor', ...),  # default: mmdet's ImageNet mean/std, pad 32
        num_images=32, batch_size=2, seed=0)

:func:`calibration_loader` turns it into an iterable of backbone inputs: normalised, padded
image tensors ``[B, 3, H, W]`` exactly as the detector's ``data_preprocessor`` hands them
to the backbone. Annotations, if the pipeline loads any, are ignored.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DEFAULT_PREPROCESSOR", "DEFAULT_PIPELINE", "CalibrationLoader", "calibration_loader", "check_calib"]

DEFAULT_PREPROCESSOR: dict[str, Any] = dict(
    type="DetDataPreprocessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=32,
)
DEFAULT_PIPELINE: list[dict[str, Any]] = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_KEYS = {"img_dir", "dataset", "pipeline", "preprocessor", "num_images", "batch_size", "seed"}


def check_calib(calib: Any, where: str = "snn.calib") -> dict[str, Any]:
    """Validate a calibration-source dict; returns a normalised copy. Raises ValueError/TypeError/FileNotFoundError."""
    if not isinstance(calib, dict):
        raise TypeError(f"{where} must be a dict (img_dir=... or dataset=...), got {type(calib).__name__}")
    calib = dict(calib)
    unknown = set(calib) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    has_dir, has_ds = calib.get("img_dir") is not None, calib.get("dataset") is not None
    if has_dir == has_ds:
        raise ValueError(f"{where} needs exactly one calibration source: img_dir='folder of images' or dataset=dict(...)")
    if has_dir:
        d = os.fspath(calib["img_dir"])
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{where}.img_dir: no such folder {d!r}")
        calib["img_dir"] = d
    elif not isinstance(calib["dataset"], dict) or "type" not in calib["dataset"]:
        raise TypeError(f"{where}.dataset must be an mmdet dataset config dict with a 'type'")
    for key, default in (("num_images", 32), ("batch_size", 2)):
        v = calib.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {v!r}")
        calib[key] = v
    calib.setdefault("seed", 0)
    return calib


class _ImageFolder(torch.utils.data.Dataset):
    def __init__(self, files: list[str], pipeline: list[dict]):
        from mmengine.dataset import Compose

        self.files = files
        self.pipeline = Compose(copy.deepcopy(pipeline))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return self.pipeline({"img_path": self.files[i], "img_id": i})


class CalibrationLoader:
    """Iterable of backbone inputs: ``preprocessor(batch)['inputs']`` for each batch of ``loader``."""

    def __init__(self, loader: torch.utils.data.DataLoader, preprocessor: nn.Module):
        self.loader = loader
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.loader)

    @torch.no_grad()
    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            yield self.preprocessor(batch, False)["inputs"]


def calibration_loader(calib: dict[str, Any], preprocessor: nn.Module | dict | None = None) -> CalibrationLoader:
    """Build the calibration loader of a calibration-source dict (see the module docstring).

    :param calib: the source (``img_dir`` or ``dataset``, plus options)
    :param preprocessor: the detector's ``data_preprocessor`` module (or its config); overrides ``calib['preprocessor']``
    """
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    calib = check_calib(calib)
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        if calib.get("img_dir") is not None:
            d = calib["img_dir"]
            files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(_IMAGE_EXT))
            if not files:
                raise FileNotFoundError(f"snn.calib.img_dir {d!r} holds no images ({', '.join(_IMAGE_EXT)})")
            dataset = _ImageFolder(files, calib.get("pipeline") or DEFAULT_PIPELINE)
        else:
            ds_cfg = copy.deepcopy(calib["dataset"])
            if calib.get("pipeline") is not None:
                ds_cfg["pipeline"] = copy.deepcopy(calib["pipeline"])
            dataset = DATASETS.build(ds_cfg)
            if len(dataset) == 0:
                raise ValueError("snn.calib.dataset is empty: give it at least one image")
        if preprocessor is None:
            preprocessor = calib.get("preprocessor") or DEFAULT_PREPROCESSOR
        if isinstance(preprocessor, dict):
            preprocessor = MODELS.build(copy.deepcopy(preprocessor))
    g = torch.Generator().manual_seed(int(calib["seed"]))
    n = min(calib["num_images"], len(dataset))
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, idx), batch_size=calib["batch_size"], shuffle=False, collate_fn=pseudo_collate
    )
    return CalibrationLoader(loader, preprocessor)
