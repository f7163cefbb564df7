"""Small networks several test modules build: an inverted-residual stack with seeded He-initialised weights."""

from __future__ import annotations

import torch
import torch.nn as nn


class InvertedResidualNet(nn.Module):
    """A small MobileNet-like stack: 1×1 expansion (expensive inputs), ReLU6, depthwise (cheap), ReLU6, projection,
    three residual blocks, a global average pool and a linear head."""

    def __init__(self, c: int = 8, e: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, e, 1), nn.ReLU6(), nn.Conv2d(e, e, 3, padding=1, groups=e), nn.ReLU6(), nn.Conv2d(e, c, 1))
            for _ in range(3)
        )
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


def he_init_(net: nn.Module, g: torch.Generator) -> nn.Module:
    """Draw every conv/linear weight ``N(0, 2/fan_in)`` and bias ``N(0, 0.01)`` from ``g``, in module order."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net
