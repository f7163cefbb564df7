"""Energy-budget threshold allocation (sj_sfn.calibration.budget): the error tables are the node's own
fire rule, the budget is met, and the allocation beats the quantile calibration at equal energy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from fixtures_small_nets import InvertedResidualNet, he_init_

import sj_sfn
from sj_sfn import SFNode
from sj_sfn import functional as F
from sj_sfn.calibration import CalibrationError, allocate_thresholds
from sj_sfn.calibration.budget import LEVEL_SETS, level_set, quantization_table
from sj_sfn.energy import measure_energy


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("signed,ceiling,offset", [(True, None, 0.5), (False, 6.0, 0.5), (False, None, 0.0), (True, None, 0.3)])
def test_quantization_table_is_the_node_fire_rule(rng, signed, ceiling, offset):
    x = torch.randn(3, 500, generator=rng) * torch.tensor([[0.5], [2.0], [8.0]])
    node = SFNode(theta_pos=1.0, theta_neg=1.0 if signed else None, max_spikes=8, offset=offset, ceiling=ceiling,
                  store_counts=True)
    target = x if signed else x.clamp(0, ceiling if ceiling is not None else float("inf"))
    steps = torch.tensor([0.05, 0.3, 1.0, 2.5])
    mse, cnt = quantization_table(x, target, steps, node)
    for g, step in enumerate(steps):
        ref = SFNode(theta_pos=float(step), theta_neg=float(step) if signed else None, max_spikes=8, offset=offset,
                     ceiling=ceiling, store_counts=True)
        out = ref(x)
        torch.testing.assert_close(mse[g], (out - target).pow(2).mean(1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cnt[g], ref.last_counts.abs().float().mean(1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("subnormal", [False, True])
@pytest.mark.parametrize("signed,ceiling", [(True, None), (False, 6.0), (False, None)])
def test_quantization_table_with_graded_levels_is_the_node_fire_rule(rng, signed, ceiling, subnormal):
    """Against the node and against an independent oracle: the nearest allowed level, by brute force."""
    x = torch.randn(3, 500, generator=rng) * torch.tensor([[0.5], [2.0], [8.0]])
    levels = F.float_levels(2, 6, subnormal=subnormal)  # (1 + j/4)·2^e: 1 + popcount(j) graded spikes
    below = [bin(j).count("1") for j in range(1, 4)] if subnormal else []  # j/4 under 1: popcount(j) graded spikes
    spikes = torch.tensor([0.0] + below + [1.0 + bin(j).count("1") for _ in range(6) for j in range(4)])
    target = x if signed else x.clamp(0, ceiling if ceiling is not None else float("inf"))
    steps = torch.tensor([0.01, 0.05, 0.3])
    node = SFNode(1.0, 1.0 if signed else None, levels=levels, offset=0.5, ceiling=ceiling)
    mse, cnt = quantization_table(x, target, steps, node, levels=levels)
    for g, step in enumerate(steps):
        ref = SFNode(float(step), float(step) if signed else None, levels=levels, offset=0.5, ceiling=ceiling,
                     store_counts=True)
        out = ref(x)
        torch.testing.assert_close(mse[g], (out - target).pow(2).mean(1), rtol=1e-5, atol=1e-7)
        values = torch.cat([torch.zeros(1), levels]) * step
        allowed = torch.ones(len(values), dtype=torch.bool)
        if ceiling is not None:  # no level above the cap, but always the first one
            allowed[2:] = values[2:] <= ceiling
        mag = x.abs() if signed else x.clamp_min(0)
        dist = (mag.unsqueeze(-1) - values).abs().masked_fill(~allowed, float("inf"))
        idx = dist.argmin(-1)
        oracle = values[idx] * (x.sign() if signed else 1.0)
        torch.testing.assert_close(out, oracle, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cnt[g], spikes[idx].mean(1), rtol=1e-6, atol=1e-7)


def test_graded_levels_beat_uniform_on_heavy_tailed_data_at_equal_cost(rng):
    """Per element, log-normal magnitudes: float levels (2 mantissa bits) cost graded spikes, uniform levels |k|."""
    x = torch.exp(torch.randn(1, 20000, generator=rng) * 1.5)
    node = SFNode(1.0, max_spikes=32, offset=0.5)
    steps = x.pow(2).mean().sqrt() * torch.pow(2.0, torch.arange(-60, 12, dtype=torch.float32) / 4)
    mse_u, cnt_u = quantization_table(x, x, steps, node)
    mse_f, cnt_f = quantization_table(x, x, steps, node, levels=level_set("float2", 32))
    for cost in (1.0, 1.5, 2.0):  # the best MSE at no more than this many ACs per element
        best_u = mse_u[cnt_u[:, 0] <= cost, 0].min()
        best_f = mse_f[cnt_f[:, 0] <= cost, 0].min()
        assert best_f < 0.25 * best_u, (cost, best_f.item(), best_u.item())


def test_subnormal_levels_beat_plain_float_levels_at_equal_cost(rng):
    """Heavy-tailed signed data with many small values: with 32 levels, the subnormal sets (one octave of range
    traded for 2^m - 1 levels under Δ) reach a lower error than the plain float sets at every spike cost."""
    x = torch.randn(1, 20000, generator=rng) * torch.exp(torch.randn(1, 20000, generator=rng))
    node = SFNode(1.0, 1.0, offset=0.5)
    steps = x.pow(2).mean().sqrt() * torch.pow(2.0, torch.arange(-60, 12, dtype=torch.float32) / 4)
    best = {}
    for name in ("float2", "float3", "float2s", "float3s"):
        mse, cnt = quantization_table(x, x, steps, node, levels=level_set(name, 32))
        best[name] = [float(mse[cnt[:, 0] <= cost, 0].min()) for cost in (1.0, 2.0, 3.0)]
    for plain in ("float2", "float3"):
        assert all(s < p for s, p in zip(best[plain + "s"], best[plain])), best
    assert all(s < 0.5 * p for s, p in zip(best["float3s"], best["float3"])), best  # 4 octaves are too few here


def test_level_helpers():
    torch.testing.assert_close(F.float_levels(0, 4), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    torch.testing.assert_close(F.float_levels(1, 2), torch.tensor([1.0, 1.5, 2.0, 3.0]))
    assert F.level_terms(F.float_levels(2, 3)).tolist() == [1, 2, 2, 3] * 3  # 1, 1.25 = 1 + 1/4, 1.5, 1.75 = 1 + 1/2 + 1/4
    assert F.level_terms(torch.tensor([0.1, 0.75, 3.0])).tolist() == [0, 2, 2]  # 0.1: no short sum of powers of two
    torch.testing.assert_close(F.level_edges(torch.tensor([1.0, 2.0, 4.0]), 0.5), torch.tensor([0.5, 1.5, 3.0]))
    torch.testing.assert_close(F.level_edges(torch.arange(1.0, 5.0), 0.3), torch.arange(1.0, 5.0) - 0.3)  # evenly spaced
    node = SFNode(1.0, levels=torch.tensor([1.0, 2.0, 4.0]), offset=0.5)  # round to the nearest level
    assert node(torch.tensor([0.49, 0.51, 1.49, 1.51, 2.9, 3.1, 100.0])).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    for bad in ((-1, 3), (5, 3), (1, 0), (True, 2)):
        with pytest.raises(ValueError):
            F.float_levels(*bad)
    # subnormal levels: the first octave's spacing continues down to zero, each j/2^m costs popcount(j) spikes
    torch.testing.assert_close(F.float_levels(2, 2, subnormal=True), torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5]))
    assert F.level_terms(F.float_levels(3, 1, subnormal=True)[:7]).tolist() == [1, 1, 2, 1, 2, 2, 3]
    for name in (n for n in LEVEL_SETS if n != "uniform"):
        for n in range(2, 80):  # never more levels than N; two octaves at least, or a clear error
            try:
                lv = level_set(name, n)
            except ValueError as e:
                assert "needs N >=" in str(e)
                continue
            assert lv.numel() <= n and bool((lv.diff() > 0).all()), (name, n)


@pytest.fixture(scope="module")
def net_and_data():
    g = torch.Generator().manual_seed(0)
    net = he_init_(InvertedResidualNet(), g)
    x = torch.randn(48, 3, 16, 16, generator=g) * torch.rand(48, 1, 1, 1, generator=g) * 3
    return net.eval(), x


def _loader(x):
    return torch.utils.data.DataLoader(x, batch_size=16)


def test_every_weight_input_is_a_site(net_and_data):
    net, x = net_and_data
    snn = sj_sfn.convert(net, _loader(x[:32]), lam=1 / 1024, max_spikes=8192, progress=False)
    kinds = [m.kind for _, m in sj_sfn.sfn_nodes(snn)]
    # 2 ReLU6 sites per block + a signed site before each expansion (after the stem / a residual add) + the head
    assert kinds.count("relu6") == 6 and kinds.count("input") == 4
    with torch.no_grad():
        assert _rel(snn(x), net(x)) < 2e-3  # fine resolution: every site placed where the ANN has the value
    e = measure_energy(snn, _loader(x[:16]), ann=net, progress=False)
    stem = next(r for r in e.per_layer if r.name.endswith("stem"))
    assert stem.macs > 0 and all(r.macs == 0 for r in e.per_layer if r is not stem and r.kind != "matmul")


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_budget_is_met(net_and_data, budget):
    net, x = net_and_data
    snn = sj_sfn.convert(net, _loader(x[:32]), energy_budget=budget, progress=False)
    alloc = snn.sfn_allocation
    # met, or nearly used up: when the finest resolution N levels allow costs less, the rest is left unspent
    assert 0.8 * budget <= alloc.predicted_ratio <= 1.02 * budget
    measured = measure_energy(snn, _loader(x[:32]), ann=net, progress=False).ratio
    assert measured == pytest.approx(alloc.predicted_ratio, rel=0.3)  # prediction: interior fan-outs, the ANN's activations


def test_budget_beats_quantile_at_equal_energy(net_and_data):
    net, x = net_and_data
    cal, ev = _loader(x[:32]), x[32:]
    with torch.no_grad():
        ref = net(ev)
    q = sj_sfn.convert(net, cal, lam=0.2, progress=False)
    e_q = measure_energy(q, _loader(ev), ann=net, progress=False).ratio
    b = sj_sfn.convert(net, cal, energy_budget=e_q, progress=False)
    e_b = measure_energy(b, _loader(ev), ann=net, progress=False).ratio
    with torch.no_grad():
        err_q, err_b = _rel(q(ev), ref), _rel(b(ev), ref)
    assert e_b <= 1.3 * e_q
    assert err_b < 0.8 * err_q, (err_b, err_q)  # measured: 0.090 vs 0.140


def test_per_channel_where_channels_differ(rng):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)
            self.c, self.d = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 100.0, 1000.0]))  # channels 6 decades apart
            return self.d(self.c(y))

    net = Two().eval()
    x = torch.randn(64, 4, generator=rng)
    snn = sj_sfn.convert(net, [x], lam=1.0, calibration="quantile", progress=False)
    alloc = allocate_thresholds(snn, [x], 0.5, level_sets="uniform", progress=False)
    chosen = {s.name: s.per_channel for s in alloc.sites}
    assert chosen["sfn_input_mul"] and not chosen["sfn_input_c"], chosen


def test_bad_budgets(net_and_data):
    net, x = net_and_data
    for bad in (0.0, -1.0, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match="energy_budget"):
            sj_sfn.convert(net, _loader(x[:16]), energy_budget=bad, progress=False)
    with pytest.raises(ValueError, match="analog"):
        sj_sfn.convert(net, _loader(x[:16]), energy_budget=1e-4, progress=False)
    snn = sj_sfn.convert(net, _loader(x[:16]), lam=0.1, progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        allocate_thresholds(snn, [], 0.3, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        sj_sfn.convert(net, _loader(x[:16]), calibration="mse", progress=False)


def test_allocation_chooses_graded_levels_and_the_energy_count_agrees(net_and_data):
    net, x = net_and_data
    cal, ev = _loader(x[:32]), x[32:]
    with torch.no_grad():
        ref = net(ev)
    uni = sj_sfn.convert(net, cal, lam=1.0, calibration="quantile", progress=False)
    allocate_thresholds(uni, cal, 0.3, level_sets="uniform", progress=False)
    gr = sj_sfn.convert(net, cal, lam=1.0, calibration="quantile", progress=False)
    alloc = allocate_thresholds(gr, cal, 0.3, level_sets=("uniform", "float2"), progress=False)
    assert any(s.levels == "float2" for s in alloc.sites)
    assert all((m.levels is None) == (s.levels == "uniform") for s, (_, m) in zip(alloc.sites, sj_sfn.sfn_nodes(gr)))
    e_u = measure_energy(uni, _loader(ev), ann=net, progress=False).ratio
    e_g = measure_energy(gr, _loader(ev), ann=net, progress=False)
    assert e_g.ratio == pytest.approx(0.3, rel=0.3) and e_g.ratio <= 1.2 * e_u
    with torch.no_grad():
        err_u, err_g = _rel(uni(ev), ref), _rel(gr(ev), ref)
    assert err_g < 0.8 * err_u, (err_g, err_u)
    with pytest.raises(ValueError, match="level_sets"):
        allocate_thresholds(gr, cal, 0.3, level_sets="float9", progress=False)


def test_convert_level_sets(net_and_data):
    net, x = net_and_data
    snn = sj_sfn.convert(net, _loader(x[:16]), energy_budget=0.3, level_sets="uniform", progress=False)
    assert all(m.levels is None for _, m in sj_sfn.sfn_nodes(snn))
    assert {s.levels for s in snn.sfn_allocation.sites} == {"uniform"}
    with pytest.raises(ValueError, match="level_sets"):
        sj_sfn.convert(net, _loader(x[:16]), lam=0.1, level_sets="float2", progress=False)


def test_a_site_reused_on_tensors_of_different_shapes(rng):
    """One activation module applied to differently shaped tensors (timm's Res2Net reuses its ReLU): one shared site."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, padding=1)
            self.relu = nn.ReLU()
            self.c = nn.Conv2d(16, 24, 3, padding=1)
            self.head = nn.Linear(24, 3)

        def forward(self, x):
            h = self.relu(self.a(x))  # 8 channels
            h = self.relu(self.b(h))  # the same module on 16 channels
            return self.head(self.c(h).mean((2, 3)))

    net = Reuse().eval()
    x = torch.randn(16, 3, 8, 8, generator=rng)
    snn = sj_sfn.convert(net, _loader(x), energy_budget=0.4, progress=False)
    e = measure_energy(snn, _loader(x), ann=net, progress=False).ratio
    assert e == pytest.approx(snn.sfn_allocation.predicted_ratio, rel=0.3)
    fine = sj_sfn.convert(net, _loader(x), lam=1 / 512, max_spikes=8192, progress=False)
    with torch.no_grad():
        assert _rel(fine(x), net(x)) < 0.01
        assert _rel(snn(x), net(x)) < 0.5


def test_outlier_aware_sample_keeps_every_row_extreme_and_stays_unbiased(rng):
    """The few huge entries of a row (LayerNorm outliers) are always kept; weighted sums estimate the full sums."""
    from sj_sfn.calibration.budget import _outlier_aware_sample

    rows = torch.randn(6, 20000, generator=rng)
    hot = torch.stack([torch.randperm(20000, generator=rng)[:5] for _ in range(6)])
    rows.scatter_(1, hot, 200.0)  # 5 outliers of 200 per row: 0.025% of the entries, ~two thirds of the energy
    x, w = _outlier_aware_sample(rows, 512, seed=3)
    assert x.shape == w.shape == (6, 512)
    assert torch.equal(x.abs().amax(1), rows.abs().amax(1))
    assert ((x == 200.0) & (w == 1)).sum(1).eq(5).all()  # each outlier once, at weight 1
    full = rows.pow(2).sum(1)
    assert torch.allclose((x.pow(2) * w).sum(1), full, rtol=0.05)  # the rest: 448 draws of unit-variance entries
    means = torch.stack([torch.mul(*_outlier_aware_sample(rows, 512, seed=s)).sum(1) for s in range(200)]).mean(0)
    assert torch.allclose(means, rows.sum(1), atol=0.02 * rows.abs().sum(1).max())  # unbiased over draws


def test_a_shared_site_read_by_a_linear_gets_its_bias_correction(rng):
    """A head applied to the pooled token and to every token (VOLO): the shared per-tensor site's mean error is folded
    into the Linear's bias on every input feature."""

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.act, self.head = nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)

        def forward(self, x):  # x: [B, L, 6]
            h = self.embed(x)
            return self.head(self.act(h[:, 0])) + self.head(self.act(h)).mean(1)

    net = TwoCalls().eval()
    x = torch.randn(32, 5, 6, generator=rng)
    snn = sj_sfn.convert(net, _loader(x), energy_budget=0.9, progress=False)  # the embedding's analog input: 0.6
    assert snn.head.bias is not None and not torch.equal(snn.head.bias, net.head.bias)
    with torch.no_grad():
        assert _rel(snn(x), net(x)) < 0.5


def test_level_sets_per_site_kind():
    """``level_sets={'attn': 'all', '*': 'uniform'}``: only the SoftMax sites may take graded levels; a kind the model
    does not have is an error naming the kinds it has."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                                           num_classes=5).eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    snn = sj_sfn.convert(vit, [x], calibration="quantile", lam=1.0, progress=False)
    alloc = allocate_thresholds(snn, [x], 0.5, level_sets={"attn": "all", "*": "uniform"}, progress=False)
    kinds = {s.kind for s in alloc.sites}
    assert "attn" in kinds and len(kinds) > 3
    assert all(s.levels == "uniform" for s in alloc.sites if s.kind != "attn")
    with torch.no_grad():
        assert _rel(snn(x), vit(x)) < 0.3
    with pytest.raises(ValueError, match="kinds the model does not have.*'attn'"):
        allocate_thresholds(snn, [x], 0.5, level_sets={"softmax": "all"}, progress=False)
    with pytest.raises(ValueError, match=r"level_sets\['attn'\]"):
        allocate_thresholds(snn, [x], 0.5, level_sets={"attn": "float9"}, progress=False)
    # the operands of q·kᵀ are offered the plain float sets in place of the subnormal ones unless named
    alloc = allocate_thresholds(snn, [x], 0.5, level_sets=("float3s",), progress=False)
    assert {s.levels for s in alloc.sites if s.kind in ("q", "k")} == {"float3"}
    assert {s.levels for s in alloc.sites if s.kind not in ("q", "k")} == {"float3s"}
    snn = sj_sfn.convert(vit, [x], calibration="quantile", lam=1.0, progress=False)  # levels allocated before are kept
    alloc = allocate_thresholds(snn, [x], 0.5, level_sets={"q": "float3s", "k": "float3s", "*": "float3s"}, progress=False)
    assert {s.levels for s in alloc.sites} == {"float3s"}, [(s.kind, s.levels) for s in alloc.sites]


@pytest.mark.parametrize("signed,ceiling,graded", [(True, None, False), (False, 6.0, False), (False, 6.0, True), (True, None, True)])
def test_sorted_table_equals_firing_every_element(rng, signed, ceiling, graded):
    """The prefix-sum table (sorted samples) against the elementwise fire rule: per-channel steps, weights, mean error."""
    from sj_sfn.calibration.budget import _quantization_table_elementwise, _quantization_table_sorted, _sorted_samples

    x = torch.randn(4, 3000, generator=rng) * torch.tensor([[0.1], [1.0], [3.0], [9.0]])
    w = torch.rand(4, 3000, generator=rng)
    w = w / w.sum(1, keepdim=True)
    levels = level_set("float2", 32) if graded else None
    node = SFNode(1.0, 1.0 if signed else None, max_spikes=32, offset=0.5, ceiling=ceiling)
    target = x if signed else x.clamp(0, ceiling)
    steps = torch.tensor([0.003, 0.02, 0.1, 0.4, 2.0])
    per_channel = (torch.rand(3, 4, 1, generator=rng) + 0.05)
    for st, weights, mean_error in ((steps, None, False), (steps, w, False), (per_channel, w, False), (per_channel, None, True)):
        ref = _quantization_table_elementwise(x, target, st, node, mean_error, levels, weights)
        got = _quantization_table_sorted(_sorted_samples(x, target, weights), st, node, mean_error, levels)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
