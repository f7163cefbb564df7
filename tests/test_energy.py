"""Energy accounting against hand-computed operation counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sj_sfn import MTNode, SFNode
from sj_sfn.energy import E_AC_PJ, E_MAC_PJ, EnergyReport, measure_energy


def _counts(x: torch.Tensor, step: float, n: int) -> torch.Tensor:
    """Spike counts of a positive-only SFN at rest: ``clip(floor(x / λθ), 0, N)``."""
    return torch.clamp(torch.floor(x / step), 0, n)


def _conv_acs_by_loops(k: torch.Tensor, conv: nn.Conv2d) -> tuple[float, float]:
    """Σ over output positions, output channels and kernel taps of |k| at the (in-bounds) input tap."""
    n, cin, h, w = k.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    g = conv.groups
    cin_g, cout_g = cin // g, conv.out_channels // g
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    acs = ev = 0.0
    a = k.abs()
    for oc in range(conv.out_channels):
        grp = oc // cout_g
        for i in range(ho):
            for j in range(wo):
                for c in range(grp * cin_g, (grp + 1) * cin_g):
                    for di in range(kh):
                        for dj in range(kw):
                            y, x = i * sh - ph + di, j * sw - pw + dj
                            if 0 <= y < h and 0 <= x < w:
                                acs += a[:, c, y, x].sum().item()
                                ev += (a[:, c, y, x] > 0).sum().item()
    return acs, ev


def test_single_linear_hand_counts(rng):
    lam, theta, n = 0.25, 0.8, 8
    layer = nn.Linear(12, 7)
    net = nn.Sequential(SFNode(theta, lam=lam, max_spikes=n), layer)
    x = torch.rand(5, 12, generator=rng) * 2.5 - 0.5
    r = measure_energy(net, [x])
    k = _counts(x, lam * theta, n)
    assert r.samples == 5
    assert r.macs == 0
    assert r.sops == pytest.approx(k.sum().item() * 7 / 5, rel=1e-9)
    assert r.events == pytest.approx((k > 0).sum().item() * 7 / 5, rel=1e-9)
    assert r.ann_macs == pytest.approx(12 * 7, rel=1e-9)
    assert r.ratio == pytest.approx(E_AC_PJ * r.sops / (E_MAC_PJ * 12 * 7), rel=1e-9)
    (row,) = r.per_layer
    assert row.kind == "Linear" and row.spiking_input
    assert row.firing_rate == pytest.approx(k.mean().item(), rel=1e-6)
    assert r.firing_rates["0"] == pytest.approx(k.mean().item(), rel=1e-6)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 2), (2, 0, 1)])
def test_single_conv2d_hand_counts(rng, stride, padding, groups):
    lam, theta, n = 0.3, 1.0, 4
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups)
    net = nn.Sequential(SFNode(theta, lam=lam, max_spikes=n), conv)
    x = torch.rand(2, 4, 7, 6, generator=rng) * 1.5
    r = measure_energy(net, [(x, torch.zeros(2))])
    k = _counts(x, lam * theta, n)
    acs, ev = _conv_acs_by_loops(k, conv)
    assert r.sops == pytest.approx(acs / 2, rel=1e-9)
    assert r.events == pytest.approx(ev / 2, rel=1e-9)
    out = conv(x)
    assert r.ann_macs == pytest.approx(out[0].numel() * (4 // groups) * 9, rel=1e-9)
    assert r.macs == 0


def test_image_input_costs_macs_and_avgpool_is_not_spiking(rng):
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), SFNode(0.5, lam=0.2, max_spikes=8),
        nn.AvgPool2d(2), nn.Conv2d(3, 4, 1), SFNode(0.5, lam=0.2, max_spikes=8),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )
    x = torch.rand(3, 1, 8, 8, generator=rng)
    r = measure_energy(net, [x])
    rows = {row.name: row for row in r.per_layer}
    assert rows["0"].macs == pytest.approx(rows["0"].ann_macs) and rows["0"].snn_acs == 0
    assert rows["3"].macs == pytest.approx(rows["3"].ann_macs) and rows["3"].spiking_input is False
    # max-pooled, flattened spikes are still spikes: the Linear gets ACs
    assert rows["7"].spiking_input and rows["7"].macs == 0
    with torch.no_grad():
        h = net[3](net[2](net[1](net[0](x))))
    k = torch.nn.functional.max_pool2d(_counts(h, 0.1, 8), 2).flatten(1)
    assert rows["7"].snn_acs == pytest.approx(k.sum().item() * 3 / 3, rel=1e-6)
    assert r.macs == pytest.approx(rows["0"].ann_macs + rows["3"].ann_macs)


def test_time_steps_and_ann_given_and_mtn(rng):
    ann = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    snn = nn.Sequential(nn.Linear(6, 5), MTNode(0.2, max_spikes=3), nn.Linear(5, 2))
    snn.load_state_dict(ann.state_dict(), strict=False)
    x = torch.rand(4, 6, generator=rng)
    r1 = measure_energy(snn, [x], ann=ann)
    r3 = measure_energy(snn, [x], ann=ann, time_steps=3)
    assert r1.ann_macs == pytest.approx(6 * 5 + 5 * 2) and r3.ann_macs == pytest.approx(r1.ann_macs)
    assert r3.macs == pytest.approx(r1.macs)  # the image layer's output is the same every step: paid once
    with torch.no_grad():
        h = snn[0](x)
    k1 = torch.clamp(torch.floor(h / 0.2), 0, 3)
    assert r1.sops == pytest.approx(k1.sum().item() * 2 / 4, rel=1e-6)
    assert r3.time_steps == 3 and r3.sops >= r1.sops


class _MyLinear(nn.Linear):
    """A Linear subclass (quantised and wrapped layers are often spelled like this)."""


@pytest.mark.parametrize("last", [nn.Linear, _MyLinear])
def test_ann_macs_of_layer_subclasses_are_counted_once(rng, last):
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), last(8, 3))
    snn = nn.Sequential(nn.Linear(4, 8), SFNode(0.5, max_spikes=4), last(8, 3))
    snn.load_state_dict(ann.state_dict(), strict=False)
    x = torch.rand(5, 4, generator=rng)
    own, given = measure_energy(snn, [x]), measure_energy(snn, [x], ann=ann)
    assert own.ann_macs == pytest.approx(4 * 8 + 8 * 3) and given.ann_macs == pytest.approx(4 * 8 + 8 * 3)


class _WithOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)

    def energy_ops(self):
        return [{"name": "qk", "kind": "matmul", "macs": 10.0, "acs": 20.0, "events": 5.0, "ann_macs": 40.0}]


def test_energy_ops_contract_and_report_fields(rng):
    net = _WithOps()
    x = torch.rand(2, 4, generator=rng)
    r = measure_energy(net, [x, x])
    row = next(row for row in r.per_layer if row.name.endswith(".qk"))
    # called once per forward (2 batches), per-sample averages over 4 samples
    assert (row.macs, row.snn_acs, row.events, row.ann_macs) == pytest.approx((5.0, 10.0, 2.5, 20.0))
    assert r.ann_macs == pytest.approx(16 + 20.0)
    d = r.to_dict()
    assert set(d) >= {"ratio", "sops", "events", "macs", "per_layer", "firing_rates"}
    assert d["per_layer"][0].keys() >= {"name", "kind", "ann_macs", "snn_acs", "events", "macs", "firing_rate"}
    assert "ratio" in str(r)
    assert isinstance(r, EnergyReport)


def test_bad_arguments():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="empty"):
        measure_energy(net, [])
    with pytest.raises(ValueError, match="time_steps"):
        measure_energy(net, [torch.zeros(1, 2)], time_steps=0)
    with pytest.raises(TypeError, match="nn.Module"):
        measure_energy(lambda x: x, [torch.zeros(1, 2)])


# -- one truth with SpikingJelly's op counters; every weight op; graded levels ------------------

import timm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from spikingjelly.activation_based import functional  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based.op_counter import simple_energy  # noqa: E402

import sj_sfn  # noqa: E402
from sj_sfn import op_counter, zoo  # noqa: E402


def _profile(snn: nn.Module, x: torch.Tensor) -> simple_energy.SimpleEnergyProfiler:
    """SpikingJelly's SimpleEnergyProfiler with the multi-level counters (the adapter), after one forward."""
    with op_counter.multilevel_spikes(snn):
        prof = simple_energy.SimpleEnergyProfiler()
        prof.bind_model(snn)
        with prof, torch.no_grad():
            snn(x)
    return prof


def _scope_total(counter, scope: str) -> float:
    return float(sum(counter.get_counts().get(scope, {}).values()))


def _converted(kind: str, rng: torch.Generator) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    if kind == "cnn":
        ann = zoo.digits_cnn(width=4).eval()
    else:
        ann = timm.models.vision_transformer.VisionTransformer(
            img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2
        ).eval()
    x = torch.rand(6, 1, 8, 8, generator=rng)
    return ann, sj_sfn.convert(ann, [x], lam=0.1 if kind == "cnn" else 0.25, progress=False), x


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_measure_energy_and_spikingjelly_counters_agree_to_the_op(kind, rng):
    ann, snn, x = _converted(kind, rng)
    n = x.shape[0]
    rep = measure_energy(snn, [x], ann=ann)
    prof = _profile(snn, x)
    root = type(snn).__name__
    products = {}
    for row in rep.per_layer:
        if row.kind == "matmul":  # the attention products: the counters see them at aten.bmm in the attention module
            products.setdefault(row.name.rpartition(".")[0], []).append(row)
            continue
        scope = f"{root}.{row.name}"
        assert _scope_total(prof.synop_counter, scope) == pytest.approx(row.snn_acs * n, abs=0.5), row.name
        assert _scope_total(prof.mac_counter, scope) == pytest.approx(row.macs * n, abs=0.5), row.name
    for module, rows in products.items():
        bmm = prof.synop_counter.get_counts()[f"{root}.{module}"][torch.ops.aten.bmm.default]
        assert bmm == pytest.approx(sum(r.snn_acs for r in rows) * n, abs=0.5)
    if kind == "vit":
        assert len(products) == 2
    report = op_counter.estimate_simple_energy(snn, x)
    assert report.counts["synop"] == pytest.approx(rep.sops * n, abs=0.5)
    assert report.counts["mac"] == pytest.approx(rep.macs * n, abs=0.5)
    assert rep.sops > 0 and rep.macs > 0  # the image into the first layer stays MACs
    # SpikingJelly's own estimate, without the adapter, takes the multi-level spikes for dense values
    plain = simple_energy.estimate_simple_energy(snn, x)
    assert plain.counts["synop"] == 0 and plain.counts["mac"] > report.counts["mac"]


class _BinaryNet(nn.Module):
    def __init__(self, node_factory):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.n1 = node_factory()
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.n2 = node_factory()
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.n2(self.c2(self.n1(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("node_factory", [
    lambda: sj_neuron.IFNode(v_threshold=0.2),
    lambda: SFNode(1.0, lam=1.0, max_spikes=1),  # N = 1, λθ = 1: spikes of value 1
], ids=["IFNode", "SFNode-N1"])  # fmt: skip
def test_binary_spikes_count_exactly_as_spikingjelly_does(node_factory, rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    net = _BinaryNet(node_factory).eval()
    x = torch.rand(3, 1, 8, 8, generator=rng) * 3
    own = simple_energy.estimate_simple_energy(net, x)
    functional.reset_net(net)  # stateful nodes: every count starts from rest
    ours = op_counter.estimate_simple_energy(net, x)
    functional.reset_net(net)
    rep = measure_energy(net, [x])
    assert own.counts["synop"] > 0
    assert ours.counts == own.counts
    assert rep.sops * 3 == pytest.approx(own.counts["synop"], abs=1e-6)


def _loops_conv_costs(ac: torch.Tensor, conv: nn.Conv2d, padding) -> float:
    """Σ over outputs, output channels and kernel taps of the per-element cost at the in-bounds input tap."""
    n, cin, h, w = ac.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    (pt, pb), (pl, pr) = padding
    cin_g, cout_g = cin // conv.groups, conv.out_channels // conv.groups
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    total = 0.0
    for oc in range(conv.out_channels):
        grp = oc // cout_g
        for i in range(ho):
            for j in range(wo):
                for di in range(kh):
                    for dj in range(kw):
                        y, xx = i * sh - pt + di, j * sw - pl + dj
                        if 0 <= y < h and 0 <= xx < w:
                            total += ac[:, grp * cin_g:(grp + 1) * cin_g, y, xx].sum().item()
    return total


def test_conv2d_same_padding_is_counted_on_the_padded_input(rng):
    """timm's Conv2dSame pads inside its forward (padding=0 on the module): the fan-out follows the padded input."""
    from timm.layers import Conv2dSame

    lam, n = 0.25, 4
    conv = Conv2dSame(3, 4, 3, stride=2)
    net = nn.Sequential(SFNode(1.0, lam=lam, max_spikes=n), conv)
    x = torch.rand(2, 3, 6, 7, generator=rng) * 1.2
    r = measure_energy(net, [x])
    k = _counts(x, lam, n)
    # pad_same for 6x7, k=3, s=2: total pad max((ceil(i/s)-1)*s + k - i, 0) -> h: 1 (0 top, 1 bottom), w: 2 (1, 1)
    acs = _loops_conv_costs(k, conv, ((0, 1), (1, 1)))
    assert acs > 0
    assert r.sops == pytest.approx(acs / 2, rel=1e-9)
    assert r.per_layer[0].kind == "Conv2dSame" and r.per_layer[0].macs == 0
    assert r.ann_macs == pytest.approx(conv(x)[0].numel() * 3 * 9, rel=1e-9)


class _Functional(nn.Module):
    """Weights used through functional calls: traced into the FX graph as call_function nodes."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.5)
        self.w2 = nn.Parameter(torch.randn(8, 4 * 16) * 0.2)
        self.w3 = nn.Parameter(torch.randn(8, 3) * 0.3)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w1, padding=1))
        h = F.max_pool2d(h, 2).flatten(1)
        h = torch.relu(F.linear(h, self.w2))
        return torch.matmul(h, self.w3)


def test_functional_weight_ops_in_an_fx_graph_are_counted(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    ann = _Functional().eval()
    x = torch.rand(5, 1, 8, 8, generator=rng)
    snn = sj_sfn.convert(ann, [x], lam=0.2, max_spikes=8, progress=False)
    outs = {}
    for name, m in sj_sfn.sfn_nodes(snn):
        m.register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, (o, m)))
    r = measure_energy(snn, [x], ann=ann)
    rows = {row.name: row for row in r.per_layer}
    assert set(rows) == {"w1", "w2", "w3"}
    assert rows["w1"].macs == pytest.approx(5 * 4 * 64 * 9 / 5) and rows["w1"].snn_acs == 0  # the image
    (o1, s1), (o2, s2) = outs.values()
    k1 = (o1 / s1.v_threshold).round()
    k2 = (o2 / s2.v_threshold).round()
    assert rows["w2"].snn_acs == pytest.approx(F.max_pool2d(k1, 2).sum().item() * 8 / 5, rel=1e-6)
    assert rows["w3"].snn_acs == pytest.approx(k2.sum().item() * 3 / 5, rel=1e-6)
    assert r.ann_macs == pytest.approx(4 * 64 * 9 + 64 * 8 + 8 * 3)


def test_a_layer_missing_on_one_side_is_an_error(rng):
    ann = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    snn = nn.Sequential(nn.Linear(4, 6), SFNode(0.5, max_spikes=4), nn.Linear(6, 3))
    x = torch.rand(3, 4, generator=rng)
    with pytest.raises(ValueError, match=r"in the ANN but not in the SNN: \['4'\]"):
        measure_energy(snn, [x], ann=ann)


LEVELS = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 9.7])
# graded spikes per level, by hand: 2^e is one, 3 = 2 + 1 and 6 = 4 + 2 are two; 9.7 is no short sum (a multiply)
_TERMS = {0.0: 0, 1.0: 1, 2.0: 1, 3.0: 2, 4.0: 1, 6.0: 2, 8.0: 1}


def _graded(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: (ACs = graded spikes of the level y_|k|, 1 if the level costs a multiply)."""
    idx = k.abs().long()
    y = torch.cat([torch.zeros(1), LEVELS])[idx]
    terms = torch.tensor([float(_TERMS.get(v, 0)) for v in y.flatten().tolist()]).view(y.shape).double()
    mac = torch.tensor([v not in _TERMS for v in y.flatten().tolist()]).view(y.shape).double()
    return terms, mac


def test_graded_levels_into_a_linear_and_a_conv(rng):
    lam = 0.1
    site = SFNode(1.0, 1.0, lam=lam, levels=LEVELS, store_counts=True)
    lin = nn.Linear(10, 7)
    x = (torch.rand(6, 10, generator=rng) - 0.4) * 2
    r = measure_energy(nn.Sequential(site, lin), [x])
    site(x)
    ac, mac = _graded(site.last_counts)
    assert ac.sum() > 0 and mac.sum() > 0 and (ac == 2).any()
    assert r.sops == pytest.approx(ac.sum().item() * 7 / 6)
    assert r.macs == pytest.approx(mac.sum().item() * 7 / 6)
    assert r.events == pytest.approx((site.last_counts != 0).sum().item() * 7 / 6)
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    x = torch.rand(2, 3, 5, 5, generator=rng) * 0.8
    r = measure_energy(nn.Sequential(site, conv), [x])
    site(x)  # measure_energy leaves the site reset
    ac, mac = _graded(site.last_counts)
    assert r.sops == pytest.approx(_loops_conv_costs(ac, conv, ((1, 1), (1, 1))) / 2)
    assert r.macs == pytest.approx(_loops_conv_costs(mac, conv, ((1, 1), (1, 1))) / 2)
    # evenly spaced levels keep |k| ACs per fan-out
    uniform = SFNode(1.0, lam=lam, max_spikes=8, store_counts=True)
    xu = x.flatten(1)[:, :10] * 2 - 0.5
    r = measure_energy(nn.Sequential(uniform, lin), [xu])
    k = _counts(xu, lam, 8)
    assert r.macs == 0 and r.sops == pytest.approx(k.sum().item() * 7 / 2) and (k > 1).any()


@pytest.mark.parametrize("levels", ["pow2", "graded"])
def test_graded_softmax_site_in_the_attention_product(levels, rng):
    """With graded SoftMax spikes each (attn, v) pair costs |k_v| ACs (power-of-two level) or one MAC (other level)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    x = torch.rand(4, 1, 8, 8, generator=rng)
    snn = sj_sfn.convert(vit, [x], lam=0.25, progress=False)
    y = 2.0 ** torch.arange(-7, 1, dtype=torch.float32) if levels == "pow2" else torch.tensor([0.1, 0.15, 0.25, 0.3, 0.5, 1.0])
    snn.blocks[0].attn.sfn_attn = SFNode(1.0, lam=1.0, levels=y, ceiling=1.0, kind="attn")
    seen = {}
    for kind in ("attn", "v"):
        site = getattr(snn.blocks[0].attn, f"sfn_{kind}")
        site.register_forward_hook(lambda m, i, o, _k=kind: seen.__setitem__(_k, m.last_counts.clone()))
    rep = measure_energy(snn, [x], ann=vit)
    row = {r.name: r for r in rep.per_layer}["blocks.0.attn.av"]
    ka, kv = seen["attn"], seen["v"]
    idx = ka.long()
    p2 = torch.frexp(torch.cat([torch.ones(1), y]))[0][idx] == 0.5
    a_ac, a_mac = ((idx > 0) & p2).double(), ((idx > 0) & ~p2).double()
    assert (idx > 0).any()
    pair_ac = (a_ac[..., :, :, None] * kv.abs().double()[..., None, :, :]).sum().item()  # [B,H,N,M,D]
    pair_mac = (a_mac[..., :, :, None] * (kv != 0).double()[..., None, :, :]).sum().item()
    assert row.snn_acs * 4 == pytest.approx(pair_ac) and row.macs * 4 == pytest.approx(pair_mac)
    if levels == "pow2":
        assert pair_mac == 0 and pair_ac > 0
    else:
        assert pair_mac > 0
    # the same products at ATen level (SpikingJelly's counters with the adapter)
    prof = _profile(snn, x)
    bmm = torch.ops.aten.bmm.default
    root = type(snn).__name__
    qk = {r.name: r for r in rep.per_layer}["blocks.0.attn.qk"]
    assert prof.synop_counter.get_counts()[f"{root}.blocks.0.attn"][bmm] == pytest.approx((qk.snn_acs + row.snn_acs + row.macs) * 4, abs=0.5)
    assert prof.mac_counter.get_counts()[f"{root}.blocks.0.attn"][bmm] == pytest.approx(row.macs * 4, abs=0.5)


def test_energy_of_a_model_that_feeds_a_parameter_view_to_a_block():
    """CaiT hands ``cls_token.expand(...)`` (a view of a parameter, made under no_grad) to its class-attention blocks:
    the count runs (parameters frozen while counting, then restored) and agrees with the SFormer product count."""
    torch.manual_seed(0)
    ann = timm.models.cait.Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, depth_token_only=1,
                                num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    snn = sj_sfn.convert(ann, [x], progress=False)
    rep = measure_energy(snn, [x], ann=ann, progress=False)
    assert 0 < rep.ratio < 1
    assert all(p.requires_grad for p in snn.parameters()) and all(p.requires_grad for p in ann.parameters())
