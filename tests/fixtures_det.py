"""Session fixtures for the MMDetection tests: a generated shapes data set and trained detectors."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "detection" / "configs" / "shapes"
VIT_CFG = str(CONFIGS / "mask-rcnn_sformer-vit-tiny_shapes.py")
CNN_CFG = str(CONFIGS / "mask-rcnn_sfn-resnet-tiny_shapes.py")
RETINA_CFG = str(CONFIGS / "retinanet_sformer-vit-tiny_shapes.py")
EPOCHS = {"vit": 28, "cnn": 16}


def _have_mmdet() -> bool:
    try:
        import mmcv.ops  # noqa: F401
        import mmdet  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class TrainedDetector:
    name: str
    config: str
    cfg: object
    checkpoint: str
    work_dir: str


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    if not _have_mmdet():
        pytest.skip("needs mmdet and mmcv with ops (pip install 'sj-sfn[det]')")
    from sj_sfn.mmdet.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, {"train": 48, "val": 48}, image_size=96, seed=0)
    return str(root)


def _train(name: str, config: str, root: str, tmp_path_factory) -> TrainedDetector:
    import torch

    from sj_sfn.mmdet import tools

    torch.manual_seed(0)
    work = str(tmp_path_factory.mktemp(f"det-{name}"))
    cfg = tools.load_config(config, data_root=root, work_dir=work)
    epochs = EPOCHS[name]
    cfg.train_cfg.max_epochs = epochs
    cfg.param_scheduler[1].end = epochs
    cfg.default_hooks.checkpoint.interval = epochs
    cfg.randomness = dict(seed=0)
    tools.train(cfg, validate=False)
    ckpt = os.path.join(work, f"epoch_{epochs}.pth")
    assert os.path.isfile(ckpt), os.listdir(work)
    return TrainedDetector(name, config, cfg, ckpt, work)


@pytest.fixture(scope="session")
def vit_detector(shapes_root, tmp_path_factory) -> TrainedDetector:
    """Mask R-CNN + tiny SFormerViT trained as the ANN on the shapes set."""
    return _train("vit", VIT_CFG, shapes_root, tmp_path_factory)


@pytest.fixture(scope="session")
def cnn_detector(shapes_root, tmp_path_factory) -> TrainedDetector:
    """Mask R-CNN + tiny timm ResNet (SFNTimmBackbone) trained as the ANN on the shapes set."""
    return _train("cnn", CNN_CFG, shapes_root, tmp_path_factory)
