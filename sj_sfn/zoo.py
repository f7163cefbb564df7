"""Tiny models for the bundled data sets, a minimal train loop, and the model factory of the command line.

They exist so that tests, the demo and the benchmarks can train a real model on real data
in seconds on a CPU; ImageNet-scale work uses timm models and local checkpoints instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .evaluation import accuracy, count_correct
from .utils import UserError

__all__ = ["digits_cnn", "digits_vit", "small_resnet", "fit", "accuracy", "count_correct", "build_model"]


def digits_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> nn.Sequential:
    """A 3-conv CNN with BatchNorm and ReLU for 8×8 (or larger) images."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def digits_vit(num_classes: int = 10, img_size: int = 8, patch_size: int = 2, in_chans: int = 1,
               embed_dim: int = 32, depth: int = 2, num_heads: int = 4, **kwargs) -> nn.Module:
    """A timm ``VisionTransformer`` small enough to train on digits in seconds."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover
        raise ImportError("digits_vit needs timm: pip install 'sj-sfn[timm]'") from e
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=2.0, **kwargs)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def small_resnet(num_classes: int = 10, in_chans: int = 1, width: int = 16) -> nn.Sequential:
    """A ResNet-10-style network (4 basic blocks) for 28×28 images."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_chans, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        _BasicBlock(w, w, 1), _BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def fit(model: nn.Module, loader, epochs: int = 10, lr: float = 3e-3, weight_decay: float = 1e-4,
        progress: bool = True, seed: int = 0) -> nn.Module:
    """Train with AdamW + cosine schedule and cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(total=steps, desc="training", disable=not progress, leave=False)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def build_model(spec: str, num_classes: int, in_chans: int = 3, img_size: int | None = None) -> nn.Module:
    """``timm`` name (or ``timm:NAME``), ``torchvision:NAME`` or ``zoo:NAME`` → an untrained ``nn.Module``.

    An unknown name is a :class:`~sj_sfn.utils.UserError` that says where names come from.
    """
    if spec.startswith("zoo:"):
        name = spec[4:]
        fns = {"digits_cnn": digits_cnn, "small_resnet": small_resnet, "digits_vit": digits_vit}
        if name not in fns:
            raise UserError(f"unknown model {spec!r}: zoo models are {', '.join('zoo:' + k for k in fns)}")
        kw: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
        if name == "digits_vit" and img_size is not None:
            kw.update(img_size=img_size, patch_size=2 if img_size <= 8 else 4)
        return fns[name](**kw)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise UserError(f"unknown model {spec!r}: not in torchvision.models.list_models()")
        if in_chans != 3:
            raise UserError(f"{spec} takes 3-channel images; this data set has {in_chans}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        import timm
    except ImportError as e:
        raise UserError(f"model {spec!r} needs timm: pip install 'sj-sfn[timm]'") from e
    name = spec[5:] if spec.startswith("timm:") else spec
    if not timm.is_model(name):
        raise UserError(f"unknown model {spec!r}: not a timm model name (see timm.list_models()), nor torchvision:NAME or zoo:NAME")
    kw = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kw)
        except TypeError:
            pass
    return timm.create_model(name, **kw)
