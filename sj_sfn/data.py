"""Data that works offline: scikit-learn's digits, Debian's Fashion-MNIST, ImageFolder trees.

The bundled sets load as float tensors in ``[0, 1]`` with shape ``[N, C, H, W]``; ImageFolder
trees go through timm's evaluation transform of the model (or ImageNet's). Splits are
deterministic for a given seed; the validation split (used to tune λ) is always cut from the
training data, disjoint from the test split. :func:`load_data` gives the calibration /
validation / test loaders of a data set named as on the command line.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from .distributed import shard_loader, world_size
from .utils import UserError

__all__ = [
    "FASHION_MNIST_ROOT",
    "BUNDLED_DATA",
    "DataError",
    "load_digits",
    "load_fashion_mnist",
    "Splits",
    "split_tensors",
    "make_splits",
    "Data",
    "data_info",
    "data_config",
    "image_transform",
    "image_folder",
    "subset",
    "load_data",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
BUNDLED_DATA = ("digits", "fashion-mnist", "fashion_mnist", "fmnist")  # data sets that ship with packages


class DataError(UserError):
    """A data set that cannot be used as named: not found, no images, empty splits, unknown classes."""


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: ``x`` ``[1797, 1, 8, 8]`` in [0, 1], ``y`` ``[1797]``."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - dependency of the data extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'sj-sfn[data]'") from e
    d = _load()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target, dtype=torch.long)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

    ``split`` is ``'train'`` (60,000) or ``'test'`` (10,000); ``x`` is ``[N, 1, 28, 28]`` in [0, 1].
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    img_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(img_path) and os.path.exists(lbl_path)):
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: install it with "
            "'apt-get update && apt-get install -y dataset-fashion-mnist' (Debian, 31 MB)"
        )
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


@dataclass
class Splits:
    """Train / validation (for λ tuning) / test tensors and loaders built from them."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int

    def loader(self, split: str, batch_size: int = 128, shuffle: bool | None = None, seed: int = 0) -> DataLoader:
        ds = getattr(self, split)
        if len(ds) == 0:
            raise ValueError(f"the {split} split is empty")
        shuffle = (split == "train") if shuffle is None else shuffle
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


def split_tensors(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Shuffle once with ``seed`` and cut into disjoint train / val / test parts."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to < 1")
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    num_classes = int(y.max().item()) + 1
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test]), num_classes)


def make_splits(name: str, seed: int = 0, train_limit: int | None = None, val_fraction: float = 0.1) -> Splits:
    """Named data sets: ``'digits'`` (70/10/20 split) or ``'fashion-mnist'``.

    For Fashion-MNIST the official test set is the test split and the validation split is cut
    from the training set; ``train_limit`` keeps the first ``n`` training images (after shuffling).
    """
    if name == "digits":
        x, y = load_digits()
        return split_tensors(x, y, val_fraction=val_fraction, test_fraction=0.2, seed=seed)
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        x, y = load_fashion_mnist("train")
        xt, yt = load_fashion_mnist("test")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(len(x) * val_fraction))
        val, train = perm[:n_val], perm[n_val:]
        if train_limit is not None:
            train = train[:train_limit]
            val = val[: max(1, min(len(val), train_limit // 5))]
        return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(xt, yt), 10)
    raise ValueError(f"unknown data set {name!r}: use 'digits', 'fashion-mnist' or an ImageFolder path")


@dataclass
class Data:
    """Loaders of one data set: calibration and tuning splits come from training data."""

    name: str
    calib: Any
    val: Any
    test: Any
    num_classes: int
    in_chans: int
    img_size: int
    note: str
    train_root: str | None = None  # ImageFolder of the training images (folders only)
    train_indices: list[int] | None = None  # its images outside the validation and test splits


def subset(ds, n: int | None, seed: int = 0):
    """``ds``, or ``n`` of its items drawn with ``seed`` when it holds more."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


def data_config(model, spec: str) -> dict | None:
    """timm's evaluation data config of ``model`` (input size, interpolation, crop, mean/std), or ``None``.

    ``None`` for ``torchvision:``/``zoo:`` models and when timm cannot resolve one; the converted
    file records it so that ``eval`` and ``tune`` preprocess exactly as ``convert`` did.
    """
    if model is None or spec.startswith(("torchvision:", "zoo:")):
        return None
    try:
        from timm.data import resolve_data_config

        return {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_data_config({}, model=model).items()}
    except Exception:  # noqa: BLE001 - no config: the ImageNet eval transform is used
        return None


def image_transform(config: dict | None, img_size: int | None):
    """timm's evaluation transform for ``config``, else ImageNet's (resize to 256/224·size, centre crop, normalise)."""
    from torchvision import transforms as T

    if config is not None:
        from timm.data import create_transform

        return create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    size = img_size or 224
    return T.Compose([
        T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def image_folder(path: str, transform, classes: dict[str, int] | None = None):
    """An ``ImageFolder``; with ``classes`` (``train/``'s class-to-index map) its labels follow that map."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"no images found under {path}: an ImageFolder tree needs one sub-folder of images per class") from e
    if len(ds) == 0:
        raise DataError(f"no images found under {path}")
    if classes is not None and ds.class_to_idx != classes:
        unknown = sorted(set(ds.class_to_idx) - set(classes))
        if unknown:
            raise DataError(f"{path} has classes that the training folder lacks: {', '.join(unknown[:5])}")
        # a test folder without some classes: relabel with the training folder's indices
        remap = {i: classes[c] for c, i in ds.class_to_idx.items()}
        ds.samples = [(f, remap[t]) for f, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
        ds.imgs = ds.samples
        ds.class_to_idx = {c: classes[c] for c in ds.classes}
    return ds


def data_info(data: str) -> tuple[int, int, int | None]:
    """``(num_classes, in_chans, img_size)`` of a ``--data`` value without loading images."""
    if data == "digits":
        return 10, 1, 8
    if data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return 10, 1, 28
    if not os.path.exists(data):
        raise DataError(f"data not found: {data!r} is neither 'digits', 'fashion-mnist' nor an existing folder")
    if not os.path.isdir(data):
        raise DataError(f"--data {data} is a file; give an ImageFolder directory")
    root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise DataError(f"no class folders under {root}: an ImageFolder tree needs one sub-folder of images per class")
    return len(classes), 3, None


def load_data(
    data: str, batch_size: int = 64, calib_samples: int | None = None, val_samples: int | None = None,
    test_samples: int | None = None, model=None, spec: str = "", img_size: int | None = None, workers: int = 0,
    seed: int = 0, distributed: bool = False, config: dict | None = None,
) -> Data:
    """Calibration / validation (λ tuning) / test loaders for ``--data``.

    ``digits``: the 70/10/20 split of :func:`sj_sfn.data.make_splits`; ``fashion-mnist``: the
    validation split is cut from the official training set, the test split is the official test
    set; a folder with ``train/`` and ``val/``: calibration and validation from ``train/``
    (disjoint), ``val/`` is the test split (ImageNet's convention); a single folder is split
    80/10/10. Under ``torchrun`` (``distributed=True``) each process gets its share of batches.
    Images are preprocessed with ``config`` (a :func:`data_config`), else ``model``'s timm data
    config, else the ImageNet evaluation transform at ``img_size``.
    """
    train_root = train_indices = None
    if isinstance(batch_size, int) and batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    num_classes, in_chans, size = data_info(data)
    if data in BUNDLED_DATA:
        try:
            sp = make_splits("digits" if data == "digits" else "fashion-mnist", seed=seed)
        except FileNotFoundError as e:
            raise DataError(str(e)) from e
        calib, val, test = subset(sp.train, calib_samples, seed), subset(sp.val, val_samples, seed), subset(sp.test, test_samples, seed)
        note = f"{data}: calibration = training split, validation (λ) = held-out part of training data, test = test split"
    else:
        transform = image_transform(config if config is not None else data_config(model, spec), img_size)
        train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            whole = image_folder(train_dir, transform)
            pool = list(range(len(whole)))
            test = subset(image_folder(val_dir, transform, whole.class_to_idx), test_samples, seed)
            note = f"{data}: calibration and validation (λ) from train/ (disjoint), test = val/"
            train_root = train_dir
        else:
            whole = image_folder(data, transform)
            perm = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed)).tolist()
            n_test = max(1, len(whole) // 10)
            test = subset(Subset(whole, perm[:n_test]), test_samples, seed)
            pool = perm[n_test:]
            note = f"{data}: one folder split 90/10 into training (calibration, validation) and test"
            train_root = data
        n_val = min(val_samples or 1000, max(1, len(pool) // 5))
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        val_idx = [pool[i] for i in perm[:n_val]]
        rest = [pool[i] for i in perm[n_val:]] or val_idx[:1]
        val = Subset(whole, val_idx)
        calib = Subset(whole, rest[: calib_samples or 1024])
        train_indices = rest
        size = img_size or size
    if len(calib) == 0 or len(val) == 0 or len(test) == 0:
        raise DataError(f"--data {data}: a split is empty (calibration {len(calib)}, validation {len(val)}, test {len(test)})")

    def mk(ds, split: str):
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
        if distributed:
            if len(loader) < world_size():
                raise DataError(f"--data {data}: the {split} split has {len(loader)} batches of {batch_size} for "
                                f"{world_size()} processes (each needs one); lower --batch-size or use more samples")
            loader = shard_loader(loader)
        return loader

    # every split is sharded by batches: calibration statistics, λ-trial metrics (rank 0 runs Ax and
    # broadcasts each λ) and test metrics are all-reduced, so the numbers equal one process's
    return Data(data, mk(calib, "calibration"), mk(val, "validation"), mk(test, "test"), num_classes, in_chans, size or 224, note, train_root, train_indices)
