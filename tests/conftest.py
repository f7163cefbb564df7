"""Shared pytest setup: fixtures modules, thread count, GPU skipping, and the seed of every random draw.

The suite runs with a fixed seed (printed when pytest starts); ``SJ_SFN_SEED=random`` draws a new seed per
test for stress runs, ``SJ_SFN_SEED=<int>`` picks one. A failing test's report names its seed (docs/install.md).
"""

from __future__ import annotations

import os
import pathlib
import random
import sys

import numpy as np
import pytest
import torch

_here = pathlib.Path(__file__).parent
sys.path.insert(0, str(_here))

# Every tests/fixtures_*.py module is a plugin of session-scoped fixtures (trained models, data).
pytest_plugins = sorted(p.stem for p in _here.glob("fixtures_*.py"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEFAULT_SEED = 0


def _seed_setting() -> int | None:
    """``SJ_SFN_SEED``: unset = the fixed default, an integer = that seed, ``random`` = a new seed per test."""
    value = os.environ.get("SJ_SFN_SEED", "").strip()
    if not value:
        return DEFAULT_SEED
    if value.lower() == "random":
        return None
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"SJ_SFN_SEED must be an integer or 'random', got {value!r}") from None


def _seed_line() -> str:
    seed = _seed_setting()
    shown = "random (a new seed per test, printed on failure)" if seed is None else f"{seed} (SJ_SFN_SEED={seed})"
    return f"sj-sfn test seed: {shown}; set SJ_SFN_SEED=random or an integer to change it"


def pytest_sessionstart(session) -> None:
    seed = _seed_setting()  # a bad SJ_SFN_SEED is a usage error before any test runs
    _seed_everything(DEFAULT_SEED if seed is None else seed)  # session fixtures (trained models) draw from here
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # printed even under -q (the header is not)
        reporter.write_line(_seed_line())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _test_seed(request) -> int:
    """Seed ``random``, ``numpy`` and ``torch`` before every test; the seed is reported if the test fails."""
    seed = _seed_setting()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("rng seed", seed))
    _seed_everything(seed)
    return seed


@pytest.fixture
def rng(_test_seed: int) -> torch.Generator:
    """A generator per test, seeded with the test's seed (fixed by default; ``SJ_SFN_SEED`` changes it).

    A failing test's report names its seed; ``SJ_SFN_SEED=<seed> pytest <test>`` reruns it with that seed.
    """
    return torch.Generator().manual_seed(_test_seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [value for key, value in item.user_properties if key == "rng seed"]
    if report.failed and seeds:
        report.sections.append(("rng seed", f"SJ_SFN_SEED={seeds[0]} reproduces this test's random draws"))
