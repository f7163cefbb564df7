"""Module-level placement: models torch.fx cannot trace convert anyway, and reproduce the ANN at fine resolution."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional

import sj_sfn
from sj_sfn.ann2snn.module_placement import SITE_NAME, input_sites, place_input_sites, protect_reset
from sj_sfn.calibration.budget import allocate_thresholds
from sj_sfn.energy import measure_energy

# fine resolution: step θ/256, full scale 16θ, rounding; every site's error is at most half a step
FINE = {"lam": 1 / 256, "max_spikes": 4096, "calibration": "quantile", "progress": False}
# the models below hold 2-3 sites; Branchy's relative error at FINE over 20 seeds: median 1.3e-3, max 2.6e-3
TOL = 0.01
pytestmark = [pytest.mark.filterwarnings("ignore:sj_sfn.convert. torch.fx cannot trace"),
              pytest.mark.filterwarnings("ignore:site .*quantile is 0")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class Branchy(nn.Module):
    """Data-dependent control flow (fx cannot trace it), in-place ops, a ReLU6, a signed residual and a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6(inplace=True)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.rare = nn.Conv2d(8, 8, 1)  # only on inputs whose mean activation is tiny: never during calibration
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        if y.mean() < 1e-6:
            y = self.rare(y)
        z = self.bn(self.body(y))
        z += y  # in place, signed
        z = self.mix(z)
        return self.fc(torch.relu_(z).mean((2, 3)))


def _randomised(model: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture
def branchy(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ann = _randomised(Branchy(), rng)
    calib = [torch.randn(8, 3, 8, 8, generator=rng) for _ in range(2)]
    return ann, calib, torch.randn(4, 3, 8, 8, generator=rng)


def test_untraceable_model_falls_back_to_module_placement(branchy):
    ann, calib, x = branchy
    before = copy.deepcopy(ann.state_dict())
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Branchy \(TraceError.*module-level placement"):
        snn = sj_sfn.convert(ann, calib, **FINE)
    assert snn.sfn_conversion_path == "module"
    layers = {e.name: e for e in snn.sfn_placement.layers}
    assert layers["stem"].reason == "analog model input" and not hasattr(snn.stem, SITE_NAME)
    assert layers["rare"].reason == "not called during calibration" and not hasattr(snn.rare, SITE_NAME)
    # ReLU6 output: positive-only with its ceiling; a residual sum: signed; the mean of a ReLU: positive
    body, mix, fc = (getattr(snn, n).input_site for n in ("body", "mix", "fc"))
    assert (body.signed, float(body.ceiling)) == (False, 6.0)
    assert mix.signed and mix.kind == "input"
    assert not fc.signed and fc.ceiling is None and fc.kind == "linear_in"
    assert [n for n, _ in input_sites(snn)] == ["body", "mix", "fc"]
    # the caller's model is untouched: same weights, no site, no hook
    assert all(torch.equal(v, ann.state_dict()[k]) for k, v in before.items())
    assert not any(hasattr(m, SITE_NAME) or m._forward_pre_hooks for m in ann.modules())
    with torch.no_grad():
        a, s = ann(x), snn(x)
    assert _rel(s, a) < TOL, _rel(s, a)
    # the residual is quantisation: a 4x finer step with the same full scale shrinks it
    finer = sj_sfn.convert(ann, calib, **{**FINE, "lam": 1 / 1024, "max_spikes": 16384})
    with torch.no_grad():
        assert _rel(finer(x), a) < 0.8 * _rel(s, a)


def test_module_path_energy_and_budget_allocation(branchy):
    ann, calib, x = branchy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = sj_sfn.convert(ann, calib, progress=False)  # calibration='budget' at the default 0.35
    assert snn.sfn_conversion_path == "module"
    alloc = snn.sfn_allocation
    assert {s.name for s in alloc.sites} == {"body.input_site", "mix.input_site", "fc.input_site"}
    e = measure_energy(snn, calib, ann=ann)  # same weight-layer names on both sides
    rows = {r.name: r for r in e.per_layer}
    assert rows["stem"].spiking_input is False
    assert all(rows[n].spiking_input for n in ("body", "mix", "fc"))
    # the allocation predicts the measured ratio on its own calibration data
    assert e.ratio == pytest.approx(alloc.predicted_ratio, rel=0.05)
    assert e.ratio == pytest.approx(0.35, rel=0.1)
    with torch.no_grad():
        assert _rel(snn(x), ann(x)) < 0.2


def test_placement_module_matches_fx_on_a_traceable_cnn(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ann = _randomised(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ), rng)
    calib = [torch.randn(8, 3, 8, 8, generator=rng)]
    x = torch.randn(4, 3, 8, 8, generator=rng)
    fx_snn = sj_sfn.convert(ann, calib, **FINE)
    mod_snn = sj_sfn.convert(ann, calib, placement="module", **FINE)
    assert (fx_snn.sfn_conversion_path, mod_snn.sfn_conversion_path) == ("fx", "module")
    assert [n for n, _ in input_sites(mod_snn)] == ["4", "8"]  # through the max-pool: a positive site; the pool: too
    assert not mod_snn[4].input_site.signed and not mod_snn[8].input_site.signed
    with torch.no_grad():
        a = ann(x)
        assert _rel(fx_snn(x), a) < TOL and _rel(mod_snn(x), a) < TOL


def test_aliasing_fx_cannot_reproduce_converts_with_placement_module(rng):
    class AugmentedAlias(nn.Module):  # y += ... on a tensor another name refers to: fx records it differently
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            z = y
            y += self.c2(y)
            return self.c3(z)

    ann = AugmentedAlias().eval()
    calib = [torch.randn(4, 3, 8, 8, generator=rng)]
    with pytest.raises(ValueError, match="placement='module'"):
        sj_sfn.convert(ann, calib, **FINE)
    snn = sj_sfn.convert(ann, calib, placement="module", **FINE)
    x = torch.randn(2, 3, 8, 8, generator=rng)
    with torch.no_grad():
        assert _rel(snn(x), ann(x)) < TOL


def test_state_dict_round_trip_pickle_and_reset_net(branchy):
    ann, calib, x = branchy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = sj_sfn.convert(ann, calib, **FINE)
        other = sj_sfn.convert(ann, [c * 3 for c in calib], **FINE)  # other thresholds, same structure
    assert other.body.input_site.theta_pos.item() != snn.body.input_site.theta_pos.item()
    assert any(k.endswith("body.input_site.theta_pos") for k in snn.state_dict())
    other.load_state_dict(snn.state_dict())
    buf = io.BytesIO()
    torch.save(snn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    functional.reset_net(loaded)
    with torch.no_grad():
        ref = snn(x)
        assert torch.equal(other(x), ref) and torch.equal(loaded(x), ref)


def test_protect_reset_keeps_reset_net_from_calling_a_reset_with_arguments():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def reset(self, num_classes: int) -> None:
            self.fc = nn.Linear(4, num_classes)

    net = nn.Sequential(nn.Linear(4, 4), Head())
    with pytest.raises(TypeError):
        functional.reset_net(copy.deepcopy(net))
    assert protect_reset(net) == ["1"]
    functional.reset_net(net)  # no-op for the head
    assert net[1].fc.out_features == 3
    net[1].reset(7)  # the head's own reset, with its arguments
    assert net[1].fc.out_features == 7


def test_allocation_sees_module_sites_and_place_input_sites_errors(rng):
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    calib = [torch.randn(16, 6, generator=rng)]
    placed = place_input_sites(net, calib, lam=0.05, progress=False)
    assert placed.sites == ["2.input_site", "4.input_site"]
    assert net[2].input_site.signed and net[4].input_site.signed  # GELU and tanh go negative
    alloc = allocate_thresholds(net, calib, 0.5, progress=False)
    assert {s.name for s in alloc.sites} == set(placed.sites)
    assert all(s.fanout > 0 for s in alloc.sites)  # each site's consumer layer was found through its hook
    with pytest.raises(ValueError, match="already have an input site"):
        place_input_sites(net, calib, progress=False)
    with pytest.raises(ValueError, match="has no weight layer"):
        place_input_sites(nn.Sequential(nn.ReLU()), calib, progress=False)
    with pytest.raises(ValueError, match="placement must be"):
        sj_sfn.convert(nn.Linear(2, 2), [torch.randn(2, 2)], placement="graph")


def test_functional_weight_calls_stay_analog_and_are_reported(rng):
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1) * 0.5)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            if y.sum() > 0:  # not traceable
                y = torch.relu(F.conv2d(y, self.w))
            return self.fc(y.mean((2, 3)))

    ann = Functional().eval()
    calib = [torch.randn(4, 3, 8, 8, generator=rng)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = sj_sfn.convert(ann, calib, **FINE)
    rep = sj_sfn.report(snn, ann, calib)
    by = {e.name: e for e in rep.layers}
    assert by["fc"].spiking and by["c1"].reason == "analog model input"
    # F.conv2d on the root's parameter w: named after the weight, its input left analog, with the reason
    assert by["w"].layer_type == "functional (Functional)" and by["w"].spiking is False
    assert "functional weight call" in by["w"].reason
    assert "analog input: w (functional (Functional)" in str(rep)


def test_per_channel_module_sites(branchy):
    ann, calib, x = branchy
    snn = sj_sfn.convert(ann, calib, per_channel=True, **FINE)
    assert snn.body.input_site.theta_pos.shape == (8,) and snn.body.input_site.channel_dim == 1
    assert snn.fc.input_site.theta_pos.shape == (8,) and snn.fc.input_site.channel_dim == -1
    assert snn.mix.input_site.theta_neg.shape == (8,)
    rep = sj_sfn.report(snn)
    assert rep.sites_by_kind["input"] == {"sites": 2, "signed": 1, "positive": 1, "per_channel": 2}
    with torch.no_grad():
        assert _rel(snn(x), ann(x)) < TOL


def test_tracing_side_effects_stay_off_the_callers_model(rng):
    class Cached(nn.Module):  # timm's attention-bias caches: forward stores a computed tensor in a dict attribute
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x):
            self.cache["scale"] = x.abs().mean()
            y = torch.relu(self.c1(x))
            if self.cache["scale"] > 0:  # not traceable
                y = self.c2(y)
            return y

    ann = Cached().eval()
    calib = [torch.randn(2, 3, 8, 8, generator=rng)]
    for _ in range(2):  # a second conversion deep-copies the model the first one saw
        snn = sj_sfn.convert(ann, calib, **FINE)
        assert snn.sfn_conversion_path == "module"
    assert ann.cache == {}  # neither tracing nor calibration ran the caller's model


def test_torch_compile_keeps_the_input_sites(branchy):
    ann, calib, x = branchy
    snn = sj_sfn.convert(ann, calib, lam=0.05, calibration="quantile", progress=False)
    with torch.no_grad():
        ref = snn(x)
        assert not torch.allclose(ref, ann(x))  # the sites quantise: an SNN without them would equal the ANN
        assert torch.equal(torch.compile(snn, backend="eager")(x), ref)
