"""Shared pytest setup: fixtures modules, thread count, GPU skipping."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

_here = pathlib.Path(__file__).parent
sys.path.insert(0, str(_here))

# Every tests/fixtures_*.py module is a plugin of session-scoped fixtures (trained models, data).
pytest_plugins = sorted(p.stem for p in _here.glob("fixtures_*.py"))

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh generator per test, seeded at random (``rng.initial_seed()`` reproduces a failure)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
