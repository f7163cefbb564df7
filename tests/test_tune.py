"""λ tuning with Ax on real digits models: search quality, reproducibility, objectives, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sj_sfn.neuron import set_lambda, sfn_nodes
from sj_sfn.tune import Trial, TuneResult, evaluate_lambda, pareto_front, site_groups, tune_lambda

BOUNDS = (0.05, 1.0)


def _grid(snn, loader, n=40):
    """Accuracy and energy ratio on a log-spaced grid of ``n`` λ over ``BOUNDS``."""
    saved = {name: float(m.lam) for name, m in sfn_nodes(snn)}
    rows = []
    for lam in np.geomspace(*BOUNDS, n):
        set_lambda(snn, float(lam))
        acc, ratio = evaluate_lambda(snn, loader)
        rows.append({"lam": float(lam), "metric": acc, "energy_ratio": ratio})
    for name, m in sfn_nodes(snn):
        m.set_lambda(saved[name])
    return rows


def _lams(snn):
    return [float(m.lam) for _, m in sfn_nodes(snn)]


@pytest.mark.slow
def test_bo_reaches_grid_best_cnn(tune_cnn_snn, tune_search_loader, tune_cnn_result, tmp_path):
    before = _lams(tune_cnn_snn)
    grid = _grid(tune_cnn_snn, tune_search_loader)
    best_grid = max(r["metric"] for r in grid)
    res = tune_cnn_result
    assert len(res.trials) <= 15 and res.failed == 0
    assert res.best.metric >= best_grid - 0.5, (res.best.metric, best_grid)
    assert BOUNDS[0] <= res.best_lam <= BOUNDS[1]
    # the search left the model's λ alone; apply() sets the chosen one and reproduces its accuracy
    assert _lams(tune_cnn_snn) == before
    res.apply(tune_cnn_snn)
    assert all(math.isclose(v, res.best_lam, rel_tol=1e-6) for v in _lams(tune_cnn_snn))
    acc, ratio = evaluate_lambda(tune_cnn_snn, tune_search_loader)
    assert acc == pytest.approx(res.best.metric, abs=1e-9) and ratio == pytest.approx(res.best.energy_ratio, rel=1e-9)
    for _name, m in sfn_nodes(tune_cnn_snn):
        m.set_lambda(before[0])
    # the metric in the single pass equals a plain accuracy pass
    from sj_sfn import zoo

    set_lambda(tune_cnn_snn, res.trials[0].lam)
    assert zoo.accuracy(tune_cnn_snn, tune_search_loader) == pytest.approx(res.trials[0].metric, abs=1e-9)
    set_lambda(tune_cnn_snn, before[0])
    png = res.plot(tmp_path / "lam.png", sweep=grid)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bo_reaches_grid_best_vit(tune_vit_snn, tune_search_loader):
    grid = _grid(tune_vit_snn, tune_search_loader)
    best_grid = max(r["metric"] for r in grid)
    res = tune_lambda(tune_vit_snn, tune_search_loader, trials=15, seed=0, progress=False)
    assert len(res.trials) <= 15
    assert res.best.metric >= best_grid - 0.5, (res.best.metric, best_grid, res.table())


def test_same_seed_same_trials(tune_cnn_snn, tune_search_loader):
    kw = dict(trials=5, init_trials=3, progress=False)
    a = tune_lambda(tune_cnn_snn, tune_search_loader, seed=3, **kw)
    b = tune_lambda(tune_cnn_snn, tune_search_loader, seed=3, **kw)
    c = tune_lambda(tune_cnn_snn, tune_search_loader, seed=4, trials=3, progress=False)  # quasi-random part only
    key = lambda r: [(t.lam, t.metric, t.energy_ratio) for t in r.trials]  # noqa: E731
    assert key(a) == key(b)
    assert a.best_lam == b.best_lam
    assert [t.lam for t in a.trials[:3]] != [t.lam for t in c.trials]


def test_tradeoff_prefers_lower_energy(tune_cnn_snn, tune_search_loader, tune_cnn_result):
    res = tune_lambda(tune_cnn_snn, tune_search_loader, objective="tradeoff", beta=500.0, trials=6, seed=0, progress=False)
    assert res.best.energy_ratio < tune_cnn_result.best.energy_ratio
    for t in res.trials:
        assert t.score == pytest.approx(t.metric - 500.0 * t.energy_ratio)
    assert res.best.score == max(t.score for t in res.trials)


def test_pareto_front_non_dominated(tune_cnn_snn, tune_search_loader, tmp_path):
    res = tune_lambda(tune_cnn_snn, tune_search_loader, objective="pareto", trials=4, seed=0, progress=False)
    done = [t for t in res.trials if t.ok]
    front_ids = {t.index for t in res.pareto}
    assert res.pareto and res.best_index in front_ids

    def dominates(a, b):
        return a.metric >= b.metric and a.energy_ratio <= b.energy_ratio and (a.metric > b.metric or a.energy_ratio < b.energy_ratio)

    for f in res.pareto:
        assert not any(dominates(o, f) for o in done)
    for t in done:
        if t.index not in front_ids:
            assert any(dominates(f, t) or (f.metric, f.energy_ratio) == (t.metric, t.energy_ratio) for f in res.pareto)
    # round trip through JSON
    path = res.to_json(tmp_path / "r.json")
    back = TuneResult.from_json(path)
    assert [t.index for t in back.pareto] == [t.index for t in res.pareto]
    assert back.best_group_lams == res.best_group_lams
    assert json.load(open(path))["objective"] == "pareto"


def test_pareto_front_matches_brute_force(rng):
    vals = torch.randint(0, 6, (40, 2), generator=rng).tolist()
    trials = [Trial(i, 0.1, {"lam": 0.1}, float(a), float(e) / 5, float(a), 0.0, 0.0) for i, (a, e) in enumerate(vals)]
    trials[3].status = "failed"
    front = pareto_front(trials)
    ok = [t for t in trials if t.ok]
    expected = set()
    for t in ok:
        dominated = any(
            (o.metric >= t.metric and o.energy_ratio <= t.energy_ratio)
            and ((o.metric, o.energy_ratio) != (t.metric, t.energy_ratio) or o.index < t.index)
            for o in ok if o is not t
        )
        if not dominated:
            expected.add(t.index)
    assert {t.index for t in front} == expected
    assert 3 not in {t.index for t in front}


def test_pareto_front_hand_computed():
    points = [(90, 0.5), (90, 0.4), (95, 0.6), (80, 0.3), (95, 0.6), (70, 0.35), (99, 0.2), (85, math.nan)]
    trials = [Trial(i, 0.1, {"lam": 0.1}, float(a), e, float(a), 0.0, 0.0) for i, (a, e) in enumerate(points)]
    trials[6].status = "failed"  # would dominate every other point
    # 0 is dominated by 1, 4 repeats 2, 5 is dominated by 3, 7 has no finite energy; sorted by energy
    assert [t.index for t in pareto_front(trials)] == [3, 1, 2]


def test_nan_metric_marks_trial_failed(tune_cnn_snn, tune_search_loader):
    from sj_sfn import zoo

    def picky(model, loader):
        lam = float(sfn_nodes(model)[0][1].lam)
        return math.nan if lam > 0.2 else zoo.accuracy(model, loader)

    res = tune_lambda(tune_cnn_snn, tune_search_loader, metric=picky, trials=6, seed=0, progress=False)
    assert len(res.trials) == 6
    bad = [t for t in res.trials if t.lam > 0.2]
    assert bad and res.failed == len(bad)
    assert all(t.status == "failed" and "metric" in t.reason for t in bad)
    assert res.best.ok and res.best_lam <= 0.2 and res.metric_name == "picky"


def test_groups_search_separate_lambdas(tune_cnn_snn, tune_search_loader):
    names = [n for n, _ in sfn_nodes(tune_cnn_snn)]
    groups = {"first": [names[0]], "rest": names[1:]}
    res = tune_lambda(tune_cnn_snn, tune_search_loader, groups=groups, trials=5, seed=0, progress=False)
    assert set(res.best_group_lams) == {"first", "rest"}
    assert any(t.group_lams["first"] != t.group_lams["rest"] for t in res.trials)
    res.apply(tune_cnn_snn)
    lams = dict(zip(names, _lams(tune_cnn_snn)))
    assert lams[names[0]] == pytest.approx(res.best_group_lams["first"], rel=1e-6)
    assert all(lams[n] == pytest.approx(res.best_group_lams["rest"], rel=1e-6) for n in names[1:])
    set_lambda(tune_cnn_snn, 0.25)


def test_vit_kind_groups(tune_vit_snn):
    g = site_groups(tune_vit_snn, "kind")
    assert {"qkv_in", "proj_in", "fc1_in", "fc2_in", "q", "k", "v", "attn"} <= set(g)
    attention = ["q", "k", "v", "attn"]
    merged = site_groups(tune_vit_snn, {"linear": sorted(set(g) - set(attention)), "attention": attention})
    assert sorted(merged["linear"] + merged["attention"]) == sorted(n for n, _ in sfn_nodes(tune_vit_snn))


def test_timeout_stops_early(tune_cnn_snn, tune_search_loader):
    res = tune_lambda(tune_cnn_snn, tune_search_loader, trials=10, timeout=1e-6, progress=False)
    assert res.stopped_early and len(res.trials) == 1


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(bounds=(0.5, 0.1)), ValueError, "low < high"),
        (dict(bounds=(0.5, 0.5)), ValueError, "low < high"),
        (dict(bounds=(0.0, 1.0)), ValueError, "> 0"),
        (dict(bounds=(-1.0, 1.0)), ValueError, "> 0"),
        (dict(bounds=(0.1, math.inf)), ValueError, "finite"),
        (dict(bounds="ab"), TypeError, "pair"),
        (dict(trials=0), ValueError, "trials"),
        (dict(trials=2.5), ValueError, "trials"),
        (dict(objective="speed"), ValueError, "objective"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(metric=3), TypeError, "metric"),
        (dict(groups={"g": ["no_such_site*"]}), ValueError, "matches no SFN site"),
        (dict(groups="layer"), ValueError, "groups"),
    ],
)
def test_bad_arguments(tune_cnn_snn, tune_search_loader, kwargs, err, match):
    with pytest.raises(err, match=match):
        tune_lambda(tune_cnn_snn, tune_search_loader, progress=False, **kwargs)


def test_bad_models_and_loaders(tune_cnn_snn, cnn_digits_model):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        tune_lambda(tune_cnn_snn, empty, progress=False)
    with pytest.raises(ValueError, match="empty"):
        tune_lambda(tune_cnn_snn, [], trials=1, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        tune_lambda(tune_cnn_snn, iter([(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]), progress=False)
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match="no SFNode"):
        tune_lambda(cnn_digits_model, DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long))), progress=False)
    names = [n for n, _ in sfn_nodes(tune_cnn_snn)]
    with pytest.raises(ValueError, match="two λ groups"):
        site_groups(tune_cnn_snn, {"a": names, "b": names[:1]})
