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
def rng(request) -> torch.Generator:
    """A fresh generator per test, seeded at random.

    A failing test's report names its seed; ``SJ_SFN_SEED=<seed> pytest <test>`` reruns it with that seed.
    """
    seed = int(os.environ.get("SJ_SFN_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.user_properties.append(("rng seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [value for key, value in item.user_properties if key == "rng seed"]
    if report.failed and seeds:
        report.sections.append(("rng seed", f"SJ_SFN_SEED={seeds[0]} reproduces this test's random draws"))
