"""Data that works offline: scikit-learn's digits, Debian's Fashion-MNIST, ImageFolder trees.

Every loader returns images as float tensors in ``[0, 1]`` with shape ``[N, C, H, W]``.
Splits are deterministic for a given seed; the validation split (used to tune λ) is always
disjoint from the test split.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "FASHION_MNIST_ROOT",
    "load_digits",
    "load_fashion_mnist",
    "Splits",
    "split_tensors",
    "make_splits",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


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
