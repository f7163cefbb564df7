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
