"""Theorems 1 and 2 of the paper, checked against SpikingJelly's own IF neuron.

Theorem 1: an IF neuron (soft reset, threshold θ, initial potential v0) run for T steps on
inputs in [0, θ], averaged, equals ONE step of an MTN with θ/T, N = T and v0/T on the mean
input, provided 0 <= v0 < θ. Theorem 2: the same for whole networks whose per-step layer
inputs stay inside those bounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron

from sj_sfn import MTNode


def _if_average(x_seq: torch.Tensor, theta: float, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average output (spike value θ) and spike count of SpikingJelly's IFNode over T steps."""
    ifn = neuron.IFNode(v_threshold=theta, v_reset=None, step_mode="m")
    ifn.v = v0.clone()
    spikes = ifn(x_seq)
    return spikes.mean(0) * theta, spikes.sum(0)


def _mtn_one_step(x_mean: torch.Tensor, theta: float, T: int, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mtn = MTNode(theta / T, max_spikes=T, store_counts=True)
    mtn.v = v0 / T
    out = mtn(x_mean)
    return out, mtn.last_counts


@pytest.mark.parametrize("draw", range(40))
def test_theorem1_exact_inside_bounds(draw: int, rng: torch.Generator) -> None:
    T = int(torch.randint(1, 65, (), generator=rng))
    theta = float(0.05 + 3 * torch.rand((), generator=rng, dtype=torch.float64))
    shape = tuple(int(s) for s in torch.randint(1, 9, (int(torch.randint(1, 4, (), generator=rng)),), generator=rng))
    x_seq = torch.rand((T, *shape), generator=rng, dtype=torch.float64) * theta  # inputs in [0, θ]
    v0 = torch.rand(shape, generator=rng, dtype=torch.float64) * theta * 0.999  # 0 <= v0 < θ
    if_avg, if_count = _if_average(x_seq, theta, v0)
    mtn_out, mtn_count = _mtn_one_step(x_seq.mean(0), theta, T, v0)
    seed = rng.initial_seed()
    assert torch.equal(mtn_count.long(), if_count.long()), f"spike counts differ (seed {seed}, T={T}, θ={theta})"
    torch.testing.assert_close(mtn_out, if_avg, atol=1e-6 * theta, rtol=0, msg=f"seed {seed}")


def test_theorem1_uniform_initial_potential_via_v_init(rng: torch.Generator) -> None:
    T, theta = 8, 0.7
    x_seq = torch.rand(T, 5000, generator=rng, dtype=torch.float64) * theta
    v0 = 0.5 * theta  # SpikingJelly's half-threshold start
    if_avg, _ = _if_average(x_seq, theta, torch.full((5000,), v0, dtype=torch.float64))
    mtn = MTNode(theta / T, max_spikes=T, v_init=v0 / T)
    torch.testing.assert_close(mtn(x_seq.mean(0)), if_avg, atol=1e-6, rtol=0)


def test_theorem1_counterexamples_outside_bounds() -> None:
    """Documented failures: a late input above θ, and a signed input sequence."""
    theta, T = 1.0, 3
    # IF can fire at most one spike per step: a burst at the last step is mostly lost.
    x_seq = torch.tensor([[0.0], [0.0], [3.0]], dtype=torch.float64)
    if_avg, _ = _if_average(x_seq, theta, torch.zeros(1, dtype=torch.float64))
    mtn_out, _ = _mtn_one_step(x_seq.mean(0), theta, T, torch.zeros(1, dtype=torch.float64))
    assert if_avg.item() == pytest.approx(1 / 3)
    assert mtn_out.item() == pytest.approx(1.0)
    # A positive then a negative input: IF keeps the early spike, the mean input is zero.
    x_seq = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    if_avg, _ = _if_average(x_seq, theta, torch.zeros(1, dtype=torch.float64))
    mtn_out, _ = _mtn_one_step(x_seq.mean(0), theta, 2, torch.zeros(1, dtype=torch.float64))
    assert if_avg.item() == pytest.approx(0.5)
    assert mtn_out.item() == 0.0


class _Net(nn.Module):
    """Non-negative layers scaled so that every per-step layer input lies in [0, θ]."""

    def __init__(self, layers: list[nn.Module], node_factory):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.nodes = nn.ModuleList(node_factory(i) for i in range(len(layers)))

    def forward(self, x):
        for layer, node in zip(self.layers, self.nodes):
            x = node(layer(x))
        return x


def _nonneg_layers(kind: str, theta: float, rng: torch.Generator) -> list[nn.Module]:
    if kind == "linear":
        dims = [12, 24, 16, 6]
        layers = [nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])]
    else:
        chans = [2, 4, 3]
        layers = [nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:])]
    for layer in layers:
        w = torch.rand(layer.weight.shape, generator=rng, dtype=torch.float64)
        # every input is at most θ (the image in [0, θ], spikes exactly θ): Σ_in w < 1 per output.
        # Random row sums in [0.6, 0.95] keep saturated layers off exact float ties (floor at an integer).
        row_sum = w.flatten(1).sum(1).view(-1, *([1] * (w.dim() - 1)))
        target = 0.6 + 0.35 * torch.rand(row_sum.shape, generator=rng, dtype=torch.float64)
        layer.weight = nn.Parameter(w / row_sum * target)
    return layers


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_theorem2_network_equivalence(kind: str, rng: torch.Generator) -> None:
    import copy

    theta = 1.0
    shape = (5, 12) if kind == "linear" else (3, 2, 6, 6)
    # A draw where the last layer never fires checks nothing (the layers contract, so with small T
    # that happens in a few percent of draws): redraw until it fires.
    for _ in range(50):
        T = int(torch.randint(2, 33, (), generator=rng))
        layers = _nonneg_layers(kind, theta, rng)
        if_net = _Net(copy.deepcopy(layers), lambda i: neuron.IFNode(v_threshold=theta, v_reset=None)).double()
        mtn_net = _Net(copy.deepcopy(layers), lambda i, T=T: MTNode(theta / T, max_spikes=T)).double()
        x_seq = torch.rand((T, *shape), generator=rng, dtype=torch.float64) * theta
        functional.reset_net(if_net)
        with torch.no_grad():
            if_avg = torch.stack([if_net(x) for x in x_seq]).mean(0) * theta
            mtn_out = mtn_net(x_seq.mean(0))
        if if_avg.abs().sum() > 0:
            break
    assert if_avg.abs().sum() > 0, "50 draws in a row where nothing fired"
    torch.testing.assert_close(mtn_out, if_avg, atol=1e-6, rtol=0, msg=f"seed {rng.initial_seed()}, T={T}")
