"""``bench/overhead.py``'s structure split: the SNN without its sites computes the ANN, and is timed beside it."""

from __future__ import annotations

import copy
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def overhead(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("overhead", None)
    import overhead

    return overhead


def test_identity_sites_leave_the_structure_and_the_snn(overhead, rng: torch.Generator) -> None:
    import timm

    import sj_sfn
    from sj_sfn.neuron import MultiLevelNode

    torch.manual_seed(0)
    ann = timm.create_model("test_vit", img_size=32, num_classes=5).eval()
    snn = sj_sfn.convert(ann, [torch.randn(4, 3, 32, 32, generator=rng) for _ in range(2)], progress=False)
    sites = sum(isinstance(m, MultiLevelNode) for m in snn.modules())
    structure = overhead.identity_sites(snn)
    assert sites > 0 and sum(isinstance(m, MultiLevelNode) for m in snn.modules()) == sites
    assert not any(isinstance(m, MultiLevelNode) for m in structure.modules())
    # the ANN with the converted weights (calibration corrects some biases): what the SNN computes without its fire
    corrected = copy.deepcopy(ann)
    state = snn.state_dict()
    corrected.load_state_dict({k: state[k] for k in ann.state_dict()})
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        # the explicit attention without its sites is the ANN's fused one, up to float rounding
        torch.testing.assert_close(structure(x), corrected(x), rtol=1e-4, atol=1e-5)
        row = overhead.measure(ann, snn, x, repeats=2, mem_repeats=1, structure=structure)
    assert row["structure_ratio"] > 0 and row["time_ratio"] > 0
    assert "struct ×" in overhead.table([{"model": "test_vit", "batch": 2, "threads": 1, "exact": True, **row}])
    assert "struct ×" not in overhead.table([{"model": "test_vit", "batch": 2, "threads": 1, "exact": True,
                                               **overhead.measure(ann, snn, x, repeats=1, mem_repeats=1)}])  # fmt: skip
