"""MTNode and SFNode as SpikingJelly nodes: step modes, state, serialisation, gradients, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional

import sj_sfn
from sj_sfn import MTNode, SFNode
from sj_sfn import functional as F


def _nodes(rng: torch.Generator):
    c = 5
    return [
        MTNode(v_threshold=0.125, max_spikes=8),
        MTNode(v_threshold=0.3, max_spikes=3, v_init=0.1),
        SFNode(theta_pos=0.8, lam=0.25, max_spikes=16),
        SFNode(theta_pos=0.5, theta_neg=0.7, lam=0.3, max_spikes=4, v_init=0.5),
        SFNode(theta_pos=0.2 + torch.rand(c, generator=rng), theta_neg=0.2 + torch.rand(c, generator=rng),
               lam=0.4, max_spikes=6, channel_dim=1),
        SFNode(theta_pos=1.0, lam=0.5, levels=F.power_levels(8, 1.7)),
        SFNode(theta_pos=1.0, lam=0.25, max_spikes=32, ceiling=6.0),
    ]


def _input(rng: torch.Generator, T: int | None = None) -> torch.Tensor:
    shape = (3, 5, 4) if T is None else (T, 3, 5, 4)
    return (torch.rand(shape, generator=rng) * 2 - 0.7) * 2


def test_single_step_loop_equals_multi_step(rng: torch.Generator) -> None:
    T = int(torch.randint(1, 9, (), generator=rng))
    x_seq = _input(rng, T)
    for node in _nodes(rng):
        node.step_mode = "s"
        ys = torch.stack([node(x) for x in x_seq])
        v_single = node.v.clone()
        functional.reset_net(node)
        functional.set_step_mode(node, "m")
        ym = node(x_seq)
        torch.testing.assert_close(ym, ys, rtol=0, atol=0, msg=repr(node))
        torch.testing.assert_close(node.v, v_single, rtol=0, atol=0)


def test_reset_restores_initial_state(rng: torch.Generator) -> None:
    x = _input(rng)
    for node in _nodes(rng):
        first = node(x)
        node(x)  # changes the membrane
        functional.reset_net(node)
        torch.testing.assert_close(node(x), first, rtol=0, atol=0, msg=repr(node))
        functional.reset_net(node)
        assert isinstance(node.v, float)


def test_mtn_v_init_is_the_reset_value() -> None:
    node = MTNode(v_threshold=1.0, max_spikes=2, v_init=0.5)
    assert node(torch.tensor([0.6])).item() == 1.0  # 0.5 + 0.6 crosses one threshold
    functional.reset_net(node)
    assert node.v == 0.5


def test_store_v_seq_and_counts(rng: torch.Generator) -> None:
    x_seq = _input(rng, 4)
    for node in _nodes(rng):
        node.store_counts = True
        node.store_v_seq = True
        node.step_mode = "m"
        y = node(x_seq)
        assert node.v_seq.shape == x_seq.shape
        torch.testing.assert_close(node.v_seq[-1], node.v)
        assert node.last_counts.shape == x_seq.shape and not node.last_counts.is_floating_point()
        assert (node.last_counts != 0).eq(y != 0).all()
        functional.reset_net(node)
        node.step_mode = "s"
        node(x_seq[0])
        node(x_seq[1])
        assert node.v_seq.shape == (2, *x_seq.shape[1:])


def test_functional_forward_and_detach(rng: torch.Generator) -> None:
    x_seq = _input(rng, 3)
    for node in _nodes(rng):
        node.step_mode = "m"
        fn = base.to_functional_forward(node)
        (y,), (v,) = fn((x_seq,), (0.0,) if not isinstance(node, MTNode) else (node.v_init,))
        functional.reset_net(node)
        torch.testing.assert_close(y, node(x_seq), rtol=0, atol=0)
        torch.testing.assert_close(v, node.v)
        functional.detach_net(node)


def test_in_a_network_with_set_step_mode(rng: torch.Generator) -> None:
    net = nn.Sequential(nn.Linear(4, 8), SFNode(0.5, 0.5, lam=0.2, max_spikes=8), nn.Linear(8, 3), MTNode(0.1, 16))
    x = torch.randn(2, 6, 4, generator=rng)
    functional.set_step_mode(net, "m")
    y_m = net(x)
    functional.reset_net(net)
    functional.set_step_mode(net, "s")
    y_s = torch.stack([net(xt) for xt in x])
    torch.testing.assert_close(y_m, y_s)


def test_state_dict_round_trip_into_default_modules(rng: torch.Generator) -> None:
    x = _input(rng)
    for node in _nodes(rng):
        buf = io.BytesIO()
        torch.save(node.state_dict(), buf)
        buf.seek(0)
        fresh = type(node)()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        functional.reset_net(node)
        torch.testing.assert_close(fresh(x), node(x), rtol=0, atol=0, msg=repr(node))
        assert repr(fresh) == repr(node)


def test_signed_site_loads_into_positive_only_module_and_back(rng: torch.Generator) -> None:
    signed = SFNode(0.4, 0.6, lam=0.3, max_spikes=5)
    plain = SFNode(0.9, lam=0.7, max_spikes=3, levels=torch.tensor([1.0, 2.0, 4.0]))
    signed_copy = SFNode(0.9, lam=0.7, max_spikes=3, levels=torch.tensor([1.0, 2.0, 4.0]))
    signed_copy.load_state_dict(signed.state_dict())
    assert signed_copy.signed and signed_copy.levels is None and signed_copy.max_spikes == 5
    plain.load_state_dict(SFNode(0.2, lam=0.1, max_spikes=7).state_dict())
    assert not plain.signed and plain.levels is None and plain.max_spikes == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype, rng: torch.Generator) -> None:
    x = _input(rng)
    for node in _nodes(rng):
        ref = node(x)
        functional.reset_net(node)
        node.to(dtype)
        y = node(x.to(dtype))
        assert y.dtype == dtype and node.v.dtype == torch.float32
        # 16-bit inputs and thresholds may move an input across one threshold: compare within
        # the widest gap between two adjacent output levels
        if isinstance(node, MTNode):
            step = node.v_threshold
        else:
            gaps = torch.ones(1) if node.levels is None else torch.diff(node.levels.float(), prepend=torch.zeros(1))
            theta = torch.cat([node.theta_pos.float().flatten()] + ([node.theta_neg.float().flatten()] if node.signed else []))
            step = (gaps.max() * theta.max() * node.lam.float()).item()
        assert (y.float() - ref).abs().max().item() <= step * 1.02 + 1e-2


def test_straight_through_gradient_of_the_node(rng: torch.Generator) -> None:
    node = SFNode(0.5, 0.25, lam=0.5, max_spikes=4)
    x = (torch.randn(500, generator=rng) * 2).requires_grad_(True)
    node(x).sum().backward()
    inside = (x >= -4 * 0.125) & (x <= 4 * 0.25)
    assert torch.equal(x.grad, inside.float())
    mtn = MTNode(0.5, 3)
    x2 = (torch.randn(500, generator=rng) * 2).requires_grad_(True)
    mtn(x2).sum().backward()
    assert torch.equal(x2.grad, ((x2 >= 0) & (x2 <= 1.5)).float())


def test_from_statistics_and_set_lambda(rng: torch.Generator) -> None:
    stats = {"pos": torch.tensor(2.0), "neg": torch.tensor(1.0)}
    node = SFNode.from_statistics(stats, lam=0.25, max_spikes=8)
    assert node.signed
    tp, tn = node.scaled_thresholds()
    assert tp.item() == 0.5 and tn.item() == 0.25 and node.full_scale().item() == 4.0
    pos_only = SFNode.from_statistics(stats, lam=0.25, max_spikes=8, signed=False)
    assert not pos_only.signed
    net = nn.Sequential(nn.Linear(3, 3), node, nn.Linear(3, 3), pos_only)
    assert sj_sfn.set_lambda(net, 0.5) == 2
    assert node.lam.item() == 0.5 and pos_only.lam.item() == 0.5
    x = torch.randn(10, 3, generator=rng)
    before = net(x)
    sj_sfn.set_lambda(net, 0.5)
    functional.reset_net(net)
    torch.testing.assert_close(net(x), before)
    with pytest.raises(KeyError):
        sj_sfn.set_lambda(net, 0.3, names=["nope"])
    with pytest.raises(ValueError, match="no SFNode"):
        sj_sfn.set_lambda(nn.Linear(2, 2), 0.3)


def test_extra_repr_shows_the_parameters() -> None:
    assert "max_spikes=8" in repr(MTNode(0.125, 8)) and "v_threshold=0.125" in repr(MTNode(0.125, 8))
    r = repr(SFNode(0.5, 0.25, lam=0.3, max_spikes=4))
    assert "lam=0.3" in r and "theta_neg=0.25" in r


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SFNode(1.0, lam=0.0), "lam"),
        (lambda: SFNode(1.0, lam=-0.5), "lam"),
        (lambda: SFNode(1.0, lam=float("nan")), "lam"),
        (lambda: SFNode(1.0, max_spikes=0), "max_spikes"),
        (lambda: MTNode(1.0, max_spikes=0), "max_spikes"),
        (lambda: SFNode(float("inf")), "theta_pos"),
        (lambda: SFNode(0.0), "theta_pos"),
        (lambda: SFNode(1.0, theta_neg=float("nan")), "theta_neg"),
        (lambda: SFNode(torch.ones(2, 2)), "theta_pos"),
        (lambda: SFNode(torch.ones(3)), "channel_dim"),
        (lambda: SFNode(torch.ones(3), torch.ones(4), channel_dim=1), "theta_neg"),
        (lambda: SFNode(1.0, v_init=1.0), "v_init"),
        (lambda: SFNode(1.0, max_spikes=3, levels=torch.tensor([1.0, 2.0])), "levels"),
        (lambda: MTNode(float("nan"), 4), "v_threshold"),
        (lambda: MTNode(-1.0, 4), "v_threshold"),
        (lambda: SFNode(1.0, backend="triton"), "backend"),
        (lambda: MTNode(1.0, backend="jax"), "backend"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="max_spikes"):
        MTNode(1.0, max_spikes=2.5)
    with pytest.raises(TypeError, match="max_spikes"):
        SFNode(1.0, max_spikes=True)
    with pytest.raises(TypeError, match="lam"):
        SFNode(1.0, lam="0.2")


def test_bad_inputs_raise_clear_errors() -> None:
    node = SFNode(torch.ones(4), channel_dim=1, step_mode="s")
    with pytest.raises(ValueError, match="theta_pos has 4 channels"):
        node(torch.zeros(2, 3))
    for n in (SFNode(1.0, step_mode="m"), MTNode(1.0, 4, step_mode="m")):
        with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
            n(torch.zeros(5))
    with pytest.raises(ValueError, match="lam"):
        SFNode(1.0).set_lambda(0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cupy_backend_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA|CuPy"):
        SFNode(1.0, backend="cupy")
    with pytest.raises(RuntimeError, match="CUDA|CuPy"):
        MTNode(1.0, 4, backend="cupy")


def test_registered_with_spikingjelly_vision_configs() -> None:
    from spikingjelly.activation_based.distributed.vision import NeuronConfig
    from spikingjelly.activation_based.distributed.vision.config import _resolve_neuron_config

    cls, kwargs = _resolve_neuron_config(NeuronConfig("sj_sfn.neuron.MTNode", {"v_threshold": 0.5, "max_spikes": 4}))
    assert cls is MTNode
    node = cls(**kwargs)
    assert node(torch.tensor([1.3])).item() == 1.0


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_nan_input_gives_nan_with_custom_levels(step_mode: str, rng: torch.Generator) -> None:
    """The repro: with levels a NaN potential counted as crossing every level (full scale, or 0 when signed)."""
    lv = F.power_levels(4)
    x = torch.tensor([float("nan"), 0.5, 2.0])
    expected = torch.tensor([float("nan"), 0.25, 1.0])
    if step_mode == "m":
        x = torch.stack([x, torch.rand(3, generator=rng)])  # NaN stays in the membrane at the next step
    for node in (SFNode(1.0, lam=1.0, levels=lv, step_mode=step_mode, store_counts=True),
                 SFNode(1.0, theta_neg=1.0, lam=1.0, levels=lv, step_mode=step_mode, store_counts=True),
                 SFNode(1.0, lam=1.0, max_spikes=4, step_mode=step_mode, store_counts=True)):  # fmt: skip
        y = node(x)
        first = y if step_mode == "s" else y[0]
        if node.levels is None:
            expected_first = torch.tensor([float("nan"), 0.0, 2.0])
        else:
            expected_first = expected
        torch.testing.assert_close(first, expected_first, rtol=0, atol=0, equal_nan=True)
        assert node.v[0].isnan() and not node.v[1:].isnan().any()
        if step_mode == "m":
            assert y[1, 0].isnan() and not y[1, 1:].isnan().any()
        assert (node.last_counts[..., 0] == 0).all()


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_detach_net_detaches_v_seq(step_mode: str, rng: torch.Generator) -> None:
    """functional.detach_net detaches v and the recorded v_seq of SFNode (as BaseNode does for MTNode)."""
    for node in (SFNode(0.5, lam=1.0, max_spikes=4, store_v_seq=True, step_mode=step_mode),
                 SFNode(0.5, 0.5, lam=1.0, levels=F.power_levels(4), store_v_seq=True, step_mode=step_mode),
                 MTNode(0.5, 4, store_v_seq=True, step_mode=step_mode)):  # fmt: skip
        x = torch.rand(2, 3, generator=rng, requires_grad=True)
        node(x if step_mode == "s" else x.unsqueeze(0))
        node(x if step_mode == "s" else x.unsqueeze(0))
        assert node.v_seq.requires_grad and node.v.requires_grad
        functional.detach_net(node)
        assert not node.v_seq.requires_grad and not node.v.requires_grad, type(node).__name__
        y = node(x if step_mode == "s" else x.unsqueeze(0))
        y.sum().backward()  # the graph before detach_net is not reused
        functional.reset_net(node)


# -- SpikingJelly BaseNode contract (one common base) --------------------------------------


def test_both_nodes_are_spikingjelly_base_nodes() -> None:
    from spikingjelly.activation_based import neuron, surrogate

    for node in (MTNode(0.5, 4), SFNode(0.5, lam=0.5)):
        assert isinstance(node, neuron.BaseNode) and isinstance(node, sj_sfn.MultiLevelNode)
        assert node.v_reset is None and node.surrogate_function is None and node.detach_reset is False
    sg = surrogate.ATan()
    node = SFNode(0.5, lam=0.5, surrogate_function=sg)
    assert node.surrogate_function is sg


def test_sfn_v_threshold_is_the_positive_spike_value(rng: torch.Generator) -> None:
    node = SFNode(0.8, 0.4, lam=0.25, max_spikes=8)
    assert node.v_threshold == pytest.approx(0.2)
    node.v_threshold = 0.5  # θ+ ← 0.5 / λ; θ- unchanged
    assert node.theta_pos.item() == pytest.approx(2.0) and node.theta_neg.item() == pytest.approx(0.4)
    x = torch.rand(50, generator=rng) * 3
    torch.testing.assert_close(node(x), 0.5 * torch.clamp(torch.floor(x / 0.5), 0, 8))
    per_channel = SFNode(torch.tensor([1.0, 2.0]), lam=0.5, channel_dim=-1)
    torch.testing.assert_close(per_channel.v_threshold, torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_hard_reset_sets_the_membrane_after_firing(step_mode: str, rng: torch.Generator) -> None:
    """v_reset=float: v ← v_reset after a step in which the neuron fired, else v ← h (nothing subtracted)."""
    theta, n, v_reset = 0.25, 4, 0.05
    x_seq = torch.rand(5, 3, 7, generator=rng) * 0.6
    for node in (MTNode(theta, n, v_reset=v_reset, step_mode=step_mode), SFNode(1.0, lam=theta, max_spikes=n, v_reset=v_reset, step_mode=step_mode)):  # fmt: skip
        v = torch.zeros(3, 7)
        expected = []
        for x in x_seq:
            h = v + x
            o = theta * torch.clamp(torch.floor(h / theta), 0, n)
            v = torch.where(o != 0, torch.full_like(h, v_reset), h)
            expected.append(o)
        out = node(x_seq) if step_mode == "m" else torch.stack([node(x) for x in x_seq])
        torch.testing.assert_close(out, torch.stack(expected), msg=type(node).__name__)
        torch.testing.assert_close(node.v, v)
        assert "v_reset=0.05" in repr(node)


def test_offset_is_the_threshold_fraction_and_v_init_is_deprecated() -> None:
    node = SFNode(1.0, lam=0.5, offset=0.5)
    assert node.offset == 0.5 and node.v_init == 0.5
    with pytest.warns(DeprecationWarning, match="offset"):
        old = SFNode(1.0, lam=0.5, v_init=0.5)
    assert old.offset == 0.5
    x = torch.linspace(-1, 3, 41)
    torch.testing.assert_close(old(x), node(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="offset only"):
        SFNode(1.0, offset=0.5, v_init=0.5)
    with pytest.raises(ValueError, match="offset"):
        SFNode(1.0, offset=1.0)
    assert MTNode(1.0, 4, v_init=0.3).v_init == 0.3  # MTN: the absolute initial potential


def _old_state_dict(node: SFNode) -> dict:
    """A state_dict as SFNode wrote it before the common base: the same keys, v_init in the extra state."""
    sd = {k: v.clone() for k, v in node.state_dict().items() if k != "_extra_state"}
    sd["_extra_state"] = {"max_spikes": node.max_spikes, "channel_dim": node.channel_dim, "v_init": node.offset}
    return sd


def test_checkpoints_saved_before_the_change_load(rng: torch.Generator) -> None:
    x = _input(rng)
    for node in _nodes(rng):
        if not isinstance(node, SFNode):
            continue
        old = _old_state_dict(node)
        assert set(old) == set(node.state_dict())
        fresh = SFNode(kind="relu")
        fresh.load_state_dict(old)
        functional.reset_net(node)
        torch.testing.assert_close(fresh(x), node(x), rtol=0, atol=0, msg=repr(node))
        assert fresh.offset == node.offset and fresh.stateful and fresh.kind == "relu"
    # a whole converted network saved the old way
    net = nn.Sequential(nn.Linear(5, 4), SFNode(0.5, lam=0.5, offset=0.5), nn.Linear(4, 3), SFNode(0.7, 0.3, lam=0.25))
    sd = {}
    for k, v in net.state_dict().items():
        sd[k] = v
    for i in (1, 3):
        sd[f"{i}._extra_state"] = _old_state_dict(net[i])["_extra_state"]
    other = nn.Sequential(nn.Linear(5, 4), SFNode(), nn.Linear(4, 3), SFNode())
    other.load_state_dict(sd)
    x = torch.randn(3, 4, 5, generator=rng)
    functional.reset_net(net)
    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


def test_whole_module_pickles_from_before_the_change_load(rng: torch.Generator) -> None:
    """torch.save(snn) pickles the instance __dict__: an old one lacks the base's attributes and has v_init."""
    node = SFNode(0.5, 0.25, lam=0.5, max_spikes=4, offset=0.5)
    state = dict(copy.deepcopy(node).__dict__)
    state["v_init"] = state.pop("offset")
    for name in ("v_reset", "surrogate_function", "stateful", "kind", "_neuron_precision", "lava_s_cale"):
        state.pop(name, None)
    old = SFNode.__new__(SFNode)
    old.__setstate__(state)
    assert old.offset == 0.5 and old.stateful and old.kind == "" and old.v_reset is None
    x = _input(rng)
    torch.testing.assert_close(old(x), node(x), rtol=0, atol=0)


def test_set_lambda_by_kind_and_name(rng: torch.Generator) -> None:
    net = nn.Sequential(
        nn.Linear(3, 3), SFNode(1.0, kind="relu"), nn.Linear(3, 3), SFNode(1.0, 1.0, kind="input"),
        nn.Linear(3, 3), SFNode(1.0, kind="relu"),
    )  # fmt: skip
    assert sj_sfn.set_lambda(net, 0.5, kinds="relu") == 2
    assert [m.lam.item() for m in (net[1], net[3], net[5])] == [0.5, 1.0, 0.5]
    assert sj_sfn.set_lambda(net, 0.25, kinds=["relu"], names=["5"]) == 1
    assert [m.lam.item() for m in (net[1], net[3], net[5])] == [0.5, 1.0, 0.25]
    with pytest.raises(ValueError, match="attn.*the model's kinds are \\['input', 'relu'\\]"):
        sj_sfn.set_lambda(net, 0.5, kinds=["attn"])
    with pytest.raises(KeyError, match="nope"):
        sj_sfn.set_lambda(net, 0.5, names=["nope"])
    assert "kind='input'" in repr(net[3])


def _hand_crossings(node) -> list[tuple[int, float, float]]:
    """(sign, threshold c_i, value Δ_i) of every level of the three nodes below."""
    if isinstance(node, MTNode):
        return [(1, i * 0.3, 0.3) for i in range(1, 6)]
    if node.levels is None:  # λθ+ = 0.15, λθ- = 0.21, offset 0.5
        return [(1, (i - 0.5) * 0.15, 0.15) for i in range(1, 5)] + [(-1, (i - 0.5) * 0.21, 0.21) for i in range(1, 5)]
    y = [0.0] + node.levels.tolist()  # λθ = 0.25, ceiling 3: levels up to y_i <= 12
    top = max(1, sum(v <= 12.0 for v in y[1:]))
    return [(1, y[i] * 0.25, (y[i] - y[i - 1]) * 0.25) for i in range(1, top + 1)]


def test_surrogate_function_gives_the_gradient_and_keeps_the_values(rng: torch.Generator) -> None:
    """With a SpikingJelly surrogate, o = Σ_i Δ_i·sg(h − c_i): the fire rule's value, the surrogate's gradient."""
    from spikingjelly.activation_based import surrogate

    alpha = 4.0
    nodes = [
        MTNode(0.3, 5, surrogate_function=surrogate.Sigmoid(alpha)),
        SFNode(0.5, 0.7, lam=0.3, max_spikes=4, offset=0.5, surrogate_function=surrogate.Sigmoid(alpha)),
        SFNode(1.0, lam=0.25, levels=F.power_levels(6), ceiling=3.0, surrogate_function=surrogate.Sigmoid(alpha)),
    ]
    x_seq = torch.randn(3, 4, 6, generator=rng) * 1.5
    for node in nodes:
        plain = copy.deepcopy(node)
        plain.surrogate_function = None
        x = x_seq.clone().requires_grad_(True)
        node.step_mode = plain.step_mode = "m"
        y = node(x)
        torch.testing.assert_close(y, plain(x_seq), rtol=0, atol=0, msg=repr(node))
        torch.testing.assert_close(node.v, plain.v)
        # one step from rest against the formula: ∂o/∂x = Σ_i Δ_i·α·σ(α(±x − c_i))(1 − σ(α(±x − c_i)))
        functional.reset_net(node)
        x0 = x_seq[0].clone().requires_grad_(True)
        node(x0.unsqueeze(0)).sum().backward()
        expected = torch.zeros_like(x0)
        for sign, c, d in _hand_crossings(node):
            s = torch.sigmoid(alpha * (sign * x0.detach() - c))
            expected += d * alpha * s * (1 - s)
        torch.testing.assert_close(x0.grad, expected, msg=repr(node))
        assert not torch.equal(x0.grad, (x0.detach() > -100).float())  # not the straight-through gradient
        functional.reset_net(node)
