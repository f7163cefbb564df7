"""MTNRecipe (Theorem 2): one MTN step equals SpikingJelly's rate-coded IF network averaged over T steps.

Theorem 2 holds when every IF neuron's input, at every step, lies in ``[0, θ]`` (here, after
RateCodingRecipe's ``1/s`` scaler, ``[0, 1]``) and ``0 <= v(0) < θ``. Random networks do not
satisfy this: a layer's per-step input is ``W·(s·spikes_t) + b``, and when many upstream
neurons fire together it can exceed the calibrated maximum of ``W·a + b``. The networks below
are built to stay inside the bounds: non-negative weights, inputs in ``[0, 1]`` and biases chosen
so that the all-ones input ``x*`` drives every unit of a layer to the SAME value ``c_l``. With
``x*`` in the single calibration batch, the calibrated scale of layer ``l`` is exactly ``c_l``
(weights are non-negative, so ``x <= x*`` gives activations ``<= c_l``), and any spike pattern
of the previous layer gives a per-step input ``<= W·(c_{l-1}·1) + b = c_l``. The tests check
the bounds on the fly (a hook on every IF neuron) and then compare outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from spikingjelly.activation_based.ann2snn import Converter, RateCodingRecipe

from sj_sfn import MTNode, MTNRecipe


def _equalise(layer: nn.Module, z_star: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Set ``layer``'s bias so that its output at ``z_star`` is one constant ``c`` (bias >= 0); return the output."""
    with torch.no_grad():
        layer.bias.zero_()
        a = layer(z_star)
        dims = [d for d in range(a.dim()) if d != 1]
        per_unit = a.amax(dim=dims) if a.dim() > 2 else a[0]
        c = per_unit.max() + 0.1 * torch.rand((), generator=rng)
        layer.bias.copy_(c - per_unit)
        return layer(z_star)


def _saturating_mlp(rng: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    x_star = torch.ones(1, 6)
    z = x_star
    for i in (0, 2):
        with torch.no_grad():
            net[i].weight.copy_(torch.rand(net[i].weight.shape, generator=rng) / net[i].in_features)
        z = torch.relu(_equalise(net[i], z, rng))
    return net, x_star


def _saturating_cnn(rng: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(45, 3),
    )
    x_star = torch.ones(1, 2, 12, 12)
    z = x_star
    for i, post in ((0, 2), (3, None)):
        fan_in = net[i].weight[0].numel()
        with torch.no_grad():
            net[i].weight.copy_(torch.rand(net[i].weight.shape, generator=rng) / fan_in)
        z = torch.relu(_equalise(net[i], z, rng))
        if post is not None:
            z = net[post](z)
    return net, x_star


def _if_average(snn: nn.Module, x: torch.Tensor, t: int) -> tuple[torch.Tensor, float, float]:
    """The IF network's output averaged over ``t`` steps, and the min/max of every IF input seen."""
    lo, hi = [float("inf")], [float("-inf")]

    def hook(m, inputs):
        lo[0] = min(lo[0], inputs[0].min().item())
        hi[0] = max(hi[0], inputs[0].max().item())

    handles = [m.register_forward_pre_hook(hook) for m in snn.modules() if isinstance(m, neuron.IFNode)]
    functional.reset_net(snn)
    with torch.no_grad():
        out = sum(snn(x) for _ in range(t)) / t
    for h in handles:
        h.remove()
    return out, lo[0], hi[0]


@pytest.mark.parametrize("build", [_saturating_mlp, _saturating_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("t", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("v_init", [0.0, 0.5])
def test_mtn_one_step_equals_if_average_inside_bounds(rng, build, t, v_init):
    ann, x_star = build(rng)
    x = torch.rand(32, *x_star.shape[1:], generator=rng)
    calib = [torch.cat([x_star, torch.rand(15, *x_star.shape[1:], generator=rng)])]
    # float64: float32 rounding can put a value an ulp on the other side of a threshold in one of the
    # two networks (they sum in different orders), which flips one spike; in float64 that needs a value
    # within ~1e-16 of a threshold
    ann, x, calib = ann.double(), x.double(), [c.double() for c in calib]
    factory = (lambda s: neuron.HalfThresholdIFNode()) if v_init else None
    if_net = Converter(RateCodingRecipe(calib, neuron_factory=factory)).convert(ann)
    mtn_net = Converter(MTNRecipe(calib, time_steps=t, v_init=v_init)).convert(ann)
    expect, lo, hi = _if_average(if_net, x, t)
    assert lo >= -1e-6 and hi <= 1 + 1e-5, f"IF inputs left the theorem's bounds [0, 1]: [{lo}, {hi}]"
    functional.reset_net(mtn_net)
    with torch.no_grad():
        got = mtn_net(x)
    nodes = [m for m in mtn_net.modules() if isinstance(m, MTNode)]
    assert len(nodes) == 2 and all(m.max_spikes == t and m.v_threshold == pytest.approx(1 / t) for m in nodes)
    # exact in real arithmetic; the summation order differs, so compare with a float64 tolerance
    assert got.dtype == expect.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    if t <= 4:  # and the comparison is not trivial: at small T both are visibly quantised
        with torch.no_grad():
            assert (got - ann(x)).abs().max() > 1e-3


def test_outside_the_bounds_the_networks_differ(rng):
    """The equality is not automatic: a signed random network breaks the bounds and the outputs differ."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    ann = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    calib = [torch.randn(64, 6, generator=rng)]
    x = torch.randn(64, 6, generator=rng)
    t = 8
    if_net = Converter(RateCodingRecipe(calib)).convert(ann)
    mtn_net = Converter(MTNRecipe(calib, time_steps=t)).convert(ann)
    expect, lo, hi = _if_average(if_net, x, t)
    assert lo < 0 or hi > 1
    functional.reset_net(mtn_net)
    with torch.no_grad():
        got = mtn_net(x)
    assert (got - expect).abs().max() > 1e-3


def test_mtn_recipe_contract(rng):
    ann, x_star = _saturating_mlp(rng)
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    snn = Converter(MTNRecipe([x_star], time_steps=4)).convert(ann)
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    assert not any(isinstance(m, MTNode) for m in ann.modules())
    # follows set_step_mode: [T, N, ...] input of T copies gives the single-step outputs stepped T times
    x = torch.rand(5, 6, generator=rng)
    functional.reset_net(snn)
    with torch.no_grad():
        single = torch.stack([snn(x) for _ in range(3)])
    functional.set_step_mode(snn, "m")
    functional.reset_net(snn)
    with torch.no_grad():
        multi = snn(x.unsqueeze(0).repeat(3, 1, 1))
    torch.testing.assert_close(multi, single)
    with pytest.raises(ValueError, match="time_steps"):
        Converter(MTNRecipe([x_star], time_steps=0)).convert(ann)
    with pytest.raises(ValueError, match="v_init"):
        Converter(MTNRecipe([x_star], time_steps=2, v_init=1.0)).convert(ann)
