"""Dispatch of the neuron forward: custom ops, implementation choice, torch.compile, autograd (CPU)."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional as sjf

import sj_sfn
from sj_sfn import MTNode, SFNode, checks, ops
from sj_sfn import functional as F

ENV = ops.ENV_VAR


def _sfn_case(rng: torch.Generator, signed: bool, per_channel: bool, custom: bool, ceiling: bool, dtype=torch.float32, steps=None):
    """Fresh random inputs and parameters for one SFN configuration: x [T, B, C, L], channel_dim=1."""
    steps, c = steps or int(torch.randint(1, 5, (), generator=rng)), 6
    n_max = int(torch.randint(2, 20, (), generator=rng))
    x = (torch.randn(steps, 3, c, 5, generator=rng) * 1.5).to(dtype)
    v = torch.randn(3, c, 5, generator=rng) * 0.2
    shape = (c,) if per_channel else ()
    tp = torch.rand(shape, generator=rng) + 0.2
    tn = torch.rand(shape, generator=rng) + 0.2 if signed else None
    lam = float(torch.rand((), generator=rng)) * 0.4 + 0.05
    levels = F.power_levels(n_max, 2.0) if custom else None
    ceil = torch.tensor(float(torch.rand((), generator=rng)) + 0.5) if ceiling else None
    offset = float(torch.rand((), generator=rng)) * 0.9
    return dict(x=x, v=v, tp=tp, tn=tn, lam=lam, n=n_max, levels=levels, ceiling=ceil, offset=offset, channel_dim=1)


def _reference(c, detach_reset=False, store_v_seq=True):
    x0 = c["x"][0]
    tp = F.broadcast_threshold(c["tp"], x0, c["channel_dim"])
    tn = None if c["tn"] is None else F.broadcast_threshold(c["tn"], x0, c["channel_dim"])
    return F.sfn_multi_step(
        c["x"], c["v"], tp, tn, torch.tensor(c["lam"]), c["n"], c["levels"], c["offset"], c["ceiling"],
        detach_reset, True, store_v_seq,
    )  # fmt: skip


def _op_args(c, implementation="torch", detach_reset=False, store_v_seq=True):
    lam = torch.tensor(c["lam"])
    tn = None if c["tn"] is None else c["tn"] * lam
    return (
        c["x"], c["v"], c["tp"] * lam, tn, c["levels"], c["ceiling"], c["n"], c["offset"], c["channel_dim"],
        detach_reset, True, store_v_seq, implementation,
    )  # fmt: skip


CONFIGS = [(s, p, lv, ce) for s in (False, True) for p in (False, True) for lv in (False, True) for ce in (False, True)]


@pytest.mark.parametrize("signed,per_channel,custom,ceiling", CONFIGS)
def test_sfn_op_equals_reference(signed, per_channel, custom, ceiling, rng):
    """The op (CPU = reference) returns the reference's spikes, v, counts and v_seq exactly."""
    c = _sfn_case(rng, signed, per_channel, custom, ceiling)
    ref = _reference(c)
    spike, v, count, v_seq = torch.ops.sj_sfn.sfn_forward(*_op_args(c))
    assert torch.equal(spike, ref.spike_seq) and torch.equal(v, ref.v)
    assert torch.equal(count, ref.count_seq) and torch.equal(v_seq, ref.v_seq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sfn_entry_point_equals_reference_for_every_dtype(dtype, rng):
    c = _sfn_case(rng, True, True, False, False, dtype)
    ref = _reference(c)
    out = ops.sfn(c["x"], c["v"], c["tp"], c["tn"], torch.tensor(c["lam"]), c["n"], None, c["offset"], None, 1, return_count=True, store_v_seq=True)
    assert out.spike_seq.dtype == dtype and out.v.dtype == F.compute_dtype(dtype)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_mtn_op_equals_reference(rng):
    x = torch.randn(5, 4, 7, generator=rng)
    theta = float(torch.rand((), generator=rng)) + 0.1
    ref = F.mtn_multi_step(x, 0.1, theta, 6, return_count=True, store_v_seq=True)
    out = torch.ops.sj_sfn.mtn_forward(x, torch.full((4, 7), 0.1), theta, 6, False, True, True, "torch")
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_nodes_dispatch_to_the_reference_on_cpu(rng):
    x = torch.randn(3, 2, 6, 5, generator=rng)
    sfn = SFNode(torch.rand(6, generator=rng) + 0.1, torch.rand(6, generator=rng) + 0.1, lam=0.3, max_spikes=9,
                 channel_dim=1, step_mode="m", store_counts=True)  # fmt: skip
    tp, tn = sfn.broadcast_thresholds(x[0])
    ref = F.sfn_multi_step(x, 0.0, tp, tn, sfn.lam, 9, return_count=True)
    assert torch.equal(sfn(x), ref.spike_seq) and torch.equal(sfn.last_counts, ref.count_seq) and torch.equal(sfn.v, ref.v)
    mtn = MTNode(0.25, 5, v_init=0.1, step_mode="m", store_counts=True)
    ref = F.mtn_multi_step(x, 0.1, 0.25, 5, return_count=True)
    assert torch.equal(mtn(x), ref.spike_seq) and torch.equal(mtn.last_counts, ref.count_seq)


def test_op_checks_pass():
    """Schema, fake tensor, autograd registration and AOT dispatch of both ops (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g, requires_grad=True)
    v = torch.zeros(2, 4, 5, requires_grad=True)
    tp = torch.rand(4, generator=g) + 0.1
    for args in [
        (x, v, tp, tp * 0.5, None, None, 8, 0.5, 1, False, True, True, "torch"),
        (x, v, tp, None, F.power_levels(200), torch.tensor(2.0), 200, 0.0, 1, True, True, False, "torch"),
        (x.detach(), v.detach(), torch.tensor(0.3), None, None, None, 4, 0.0, None, False, False, False, "torch"),
    ]:
        torch.library.opcheck(torch.ops.sj_sfn.sfn_forward.default, args)
    torch.library.opcheck(torch.ops.sj_sfn.mtn_forward.default, (x, v, 0.3, 5, False, True, True, "torch"))


# -- autograd: straight-through ----------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("signed,per_channel,custom,ceiling", [(False, False, False, False), (True, True, False, True), (True, False, True, False)])
def test_op_gradient_equals_reference_autograd(signed, per_channel, custom, ceiling, detach_reset, steps, rng):
    """Gradients through the op equal autograd of the reference (straight-through on [lo, hi])."""
    c = _sfn_case(rng, signed, per_channel, custom, ceiling, steps=steps)
    gs = torch.randn(c["x"].shape, generator=rng)
    gv = torch.randn(c["v"].shape, generator=rng)
    gvs = torch.randn(c["x"].shape, generator=rng)

    x1, v1 = c["x"].clone().requires_grad_(True), c["v"].clone().requires_grad_(True)
    ref = _reference({**c, "x": x1, "v": v1}, detach_reset)
    torch.autograd.backward([ref.spike_seq, ref.v, ref.v_seq], [gs, gv, gvs])

    x2, v2 = c["x"].clone().requires_grad_(True), c["v"].clone().requires_grad_(True)
    spike, v, _, v_seq = torch.ops.sj_sfn.sfn_forward(*_op_args({**c, "x": x2, "v": v2}, detach_reset=detach_reset))
    torch.autograd.backward([spike, v, v_seq], [gs, gv, gvs])

    assert torch.equal(x2.grad, x1.grad) and torch.equal(v2.grad, v1.grad)
    # the forward agrees too (the reference's straight-through adds h - h: rounding only)
    torch.testing.assert_close(spike, ref.spike_seq.detach(), rtol=1e-6, atol=1e-5)
    # and the gradient really is straight-through: 1 inside the range, 0 outside, at T = 1
    if c["x"].shape[0] == 1 and not ceiling:
        h = c["v"] + c["x"][0]
        lam = c["lam"]
        top = c["n"] if c["levels"] is None else c["levels"][-1]
        hi = F.broadcast_threshold(c["tp"] * lam, h, 1) * top
        lo = 0 if c["tn"] is None else -F.broadcast_threshold(c["tn"] * lam, h, 1) * top
        m = ((h >= lo) & (h <= hi)).float()
        dv_dh = 1.0 if detach_reset else 1.0 - m  # v = h - o
        expect = gs[0] * m + (gv + gvs[0]) * dv_dh
        torch.testing.assert_close(x2.grad[0], expect, rtol=1e-6, atol=1e-6)


def test_mtn_op_gradient_equals_reference_autograd(rng):
    x1 = torch.randn(4, 30, generator=rng).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(4, 30, generator=rng)
    F.mtn_multi_step(x1, 0.0, 0.2, 3).spike_seq.backward(g)
    torch.ops.sj_sfn.mtn_forward(x2, torch.zeros(30), 0.2, 3, False, False, False, "torch")[0].backward(g)
    assert torch.equal(x1.grad, x2.grad)


# -- torch.compile ------------------------------------------------------------------------
def _compile_recording(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def test_torch_compile_traces_the_op_with_its_fake_impl(rng):
    torch._dynamo.reset()
    c = _sfn_case(rng, True, True, True, True)
    lam = torch.tensor(c["lam"])

    def f(x, v):
        return ops.sfn(x, v, c["tp"], c["tn"], lam, c["n"], c["levels"], c["offset"], c["ceiling"], 1,
                       return_count=True, store_v_seq=True, backend="torch")  # fmt: skip

    compiled, graphs = _compile_recording(f)
    out = compiled(c["x"], c["v"])
    ref = _reference(c)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    code = "\n".join(g.code for g in graphs)
    assert "torch.ops.sj_sfn.sfn_forward" in code


def test_torch_compile_of_a_node_with_gradient(rng):
    torch._dynamo.reset()
    node = MTNode(0.3, 4, step_mode="m")
    x = torch.randn(3, 4, 5, generator=rng)

    def f(x):
        return node(x)

    compiled, graphs = _compile_recording(f)
    x1 = x.clone().requires_grad_(True)
    sjf.reset_net(node)  # outside the compiled function: older torch versions cannot trace SpikingJelly's reset
    y = compiled(x1)
    y.sum().backward()
    x2 = x.clone().requires_grad_(True)
    ref = F.mtn_multi_step(x2, 0.0, 0.3, 4).spike_seq
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(x1.grad, x2.grad)
    assert any("sj_sfn.mtn_forward" in g.code for g in graphs)


def test_torch_compile_with_changing_python_float_parameters(rng):
    """The entry-point checks are skipped while tracing: a float traced as symbolic on recompile must not break the graph."""
    torch._dynamo.reset()
    compiled, _ = _compile_recording(lambda x, lam, th: ops.sfn(x, 0.0, th, None, lam, 4, backend="torch").spike_seq)
    x = torch.randn(2, 5, generator=rng)
    for lam, th in ((0.5, 0.3), (0.7, 0.2), (0.9, 0.4)):
        assert torch.equal(compiled(x, lam, th), ops.sfn(x, 0.0, th, None, lam, 4).spike_seq)


# -- implementation choice and diagnostics -------------------------------------------------
def test_implementation_on_cpu():
    impl = sj_sfn.implementation("cpu")
    assert impl.name == "torch" and impl.error is None and "cupy" in impl.unavailable
    assert "cpu" in str(impl)


def test_implementation_on_cuda_without_a_device(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ok, why = sj_sfn.cuda.cupy_status()
    impl = sj_sfn.implementation("cuda:0")
    if ok:
        assert impl.name == "cupy" and impl.error is None
    else:
        assert impl.name == "torch" and impl.unavailable["cupy"] == why and why


@pytest.mark.parametrize("choice", ["auto", "cupy", "torch", " CuPy "])
def test_env_var(choice, monkeypatch):
    monkeypatch.setenv(ENV, choice)
    ok, why = sj_sfn.cuda.cupy_status()
    impl = sj_sfn.implementation(torch.device("cuda", 0))
    assert sj_sfn.implementation("cpu").name == "torch"
    c = choice.strip().lower()
    if c == "torch":
        assert impl.name == "torch" and f"{ENV}=torch" in impl.unavailable["cupy"]
    elif c == "cupy":
        assert impl.name == "cupy" and (impl.error is None) == ok
        if not ok:
            assert why in impl.error
    else:
        assert impl.name == ("cupy" if ok else "torch")


def test_bad_env_var_is_a_clear_error(monkeypatch, rng):
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(ValueError, match=ENV):
        sj_sfn.implementation("cuda")
    with pytest.raises(ValueError, match=ENV):
        MTNode(0.5, 3, step_mode="m")(torch.randn(2, 3, generator=rng))


def test_implementation_of_modules(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    sfn = SFNode(torch.ones(3), channel_dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), MTNode(0.5, 3), torch.nn.Sequential(sfn))
    report = sj_sfn.implementation(model)
    assert set(report) == {"1", "2.0"}
    assert all(r.name == "torch" and r.device == "cpu" for r in report.values())
    assert sj_sfn.implementation(sfn).name == "torch"
    on_cuda = sj_sfn.implementation(sfn, device="cuda")  # backend='auto' by default: the kernel where usable
    if sj_sfn.cuda.cupy_status()[0]:
        assert on_cuda.name == "cupy" and "torch" in on_cuda.unavailable
    else:
        assert on_cuda.name == "torch" and "cupy" in on_cuda.unavailable
    sfn.backend = "torch"
    on_cuda = sj_sfn.implementation(sfn, device="cuda")
    assert on_cuda.name == "torch" and "cupy" in on_cuda.unavailable
    with pytest.raises(TypeError, match="module or a device"):
        sj_sfn.implementation(3.5)


@pytest.mark.skipif(sj_sfn.cuda.cupy_status()[0], reason="CuPy and CUDA are usable here")
def test_backend_cupy_without_cuda_is_a_clear_error(rng):
    for make in (lambda: MTNode(0.5, 3, backend="cupy"), lambda: SFNode(0.5, backend="cupy")):
        with pytest.raises(RuntimeError, match="CuPy kernels are unavailable"):
            make()
    with pytest.raises(RuntimeError, match="CuPy kernels are unavailable"):
        ops.require_cupy()


def test_backend_cupy_on_cpu_input_is_a_clear_error(monkeypatch, rng):
    monkeypatch.delenv(ENV, raising=False)
    node = SFNode(0.5, step_mode="m")
    node.backend = "cupy"  # as if built on a GPU machine, then run on CPU
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        node(torch.randn(2, 4, generator=rng))
    assert sj_sfn.implementation(node).error
    monkeypatch.setenv(ENV, "torch")  # the kill switch wins
    assert node(torch.randn(2, 4, generator=rng)).shape == (2, 4)


def test_bad_inputs_are_clear_errors(rng):
    with pytest.raises(ValueError, match="T >= 1"):
        ops.sfn(torch.randn(0, 3), 0.0, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        ops.mtn(torch.ones(2, 3, dtype=torch.long), 0.0, 0.5, 3)
    with pytest.raises(ValueError, match="backend"):
        ops.mtn(torch.randn(2, 3, generator=rng), 0.0, 0.5, 3, backend="triton")
    with pytest.raises(ValueError, match="channels"):
        ops.sfn(torch.randn(2, 3, 4, generator=rng), 0.0, torch.ones(5), channel_dim=1)


def test_choice_for_cuda_is_a_compile_time_constant():
    """On CUDA the choice (which may import CuPy) is made once at trace time, without a graph break."""
    torch._dynamo.reset()

    def f(x):
        return x + (1.0 if ops._choose_on(torch.device("cuda"), "torch") == "torch" else 2.0)

    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3)), torch.ones(3))


# -- the fused torch path (eager, no autograd) -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
def test_fused_torch_path_equals_reference(dtype, signed, rng):
    """In-place torch ops give the reference's spikes, v, counts and v_seq exactly."""
    for per_channel, ceiling, v_kind in [(False, False, "tensor"), (True, False, "float"), (False, True, "tensor"), (True, True, "scalar")]:
        c = _sfn_case(rng, signed, per_channel, False, ceiling, dtype)
        v = {"tensor": c["v"], "float": 0.25, "scalar": torch.tensor(-0.1)}[v_kind]
        ref = _reference({**c, "v": v})
        with torch.no_grad():
            out = ops.sfn(c["x"], v, c["tp"], c["tn"], torch.tensor(c["lam"]), c["n"], None, c["offset"], c["ceiling"], 1,
                          return_count=True, store_v_seq=True, backend="torch")  # fmt: skip
        for name, a, b in zip(out._fields, out, ref):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs ({per_channel=}, {ceiling=}, {v_kind=})"
    x = (torch.randn(3, 4, 9, generator=rng) * 2).to(dtype)
    ref = F.mtn_multi_step(x, 0.05, 0.37, 6, return_count=True, store_v_seq=True)
    out = ops.mtn(x, 0.05, 0.37, 6, return_count=True, store_v_seq=True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_eager_torch_path_keeps_autograd(rng):
    """With inputs that need gradients the eager path is the reference itself (straight-through)."""
    x1 = torch.randn(2, 40, generator=rng).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    ops.sfn(x1, 0.0, 0.3, 0.2, 0.5, 4, backend="torch").spike_seq.sum().backward()
    F.sfn_multi_step(x2, 0.0, 0.3, 0.2, 0.5, 4).spike_seq.sum().backward()
    assert torch.equal(x1.grad, x2.grad) and x1.grad.abs().sum() > 0


# -- NaN and bad parameters -----------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
def test_nan_and_inf_inputs_on_every_torch_path(signed, rng):
    """NaN/±Inf inputs: the op, the eager fused path and the autograd path all equal the reference,
    NaN in the same places (custom levels included: a NaN potential is a NaN spike), count 0 at NaN."""
    for per_channel, custom, ceiling in [(p, lv, ce) for p in (False, True) for lv in (False, True) for ce in (False, True)]:
        c = _sfn_case(rng, signed, per_channel, custom, ceiling, steps=3)
        pick = torch.rand(c["x"].shape, generator=rng)
        x = torch.where(pick < 0.1, float("nan"), c["x"])
        x = torch.where((pick >= 0.1) & (pick < 0.15), float("inf"), x)
        c["x"] = torch.where((pick >= 0.15) & (pick < 0.2), float("-inf"), x)
        case = f"{per_channel=}, {custom=}, {ceiling=}"
        ref = _reference(c)
        nan = ref.v_seq.isnan()
        assert nan.any() and torch.equal(ref.spike_seq.isnan(), nan) and (ref.count_seq[nan] == 0).all(), case
        lam = torch.tensor(c["lam"])
        args = (c["x"], c["v"], c["tp"], c["tn"], lam, c["n"], c["levels"], c["offset"], c["ceiling"], 1)
        with torch.no_grad():
            eager = ops.sfn(*args, return_count=True, store_v_seq=True, backend="torch")
        v_grad = c["v"].clone().requires_grad_(True)
        grad = ops.sfn(c["x"], v_grad, *args[2:], return_count=True, store_v_seq=True, backend="torch")
        ref_grad = _reference({**c, "v": v_grad})  # straight-through (h + (o - h).detach()) rounds as the reference does
        op = F.SeqOutput(*torch.ops.sj_sfn.sfn_forward(*_op_args(c)))
        for out, r in ((eager, ref), (grad, ref_grad), (op, ref)):
            for name in ("spike_seq", "v", "v_seq"):
                torch.testing.assert_close(getattr(out, name), getattr(r, name), rtol=0, atol=0, equal_nan=True, msg=case)
            assert torch.equal(out.count_seq, r.count_seq), case
    # MTN, fused path (no autograd)
    x = torch.randn(3, 40, generator=rng)
    x[1, :10] = float("nan")
    with torch.no_grad():
        out = ops.mtn(x, 0.0, 0.3, 5, return_count=True, store_v_seq=True)
    ref = F.mtn_multi_step(x, 0.0, 0.3, 5, return_count=True, store_v_seq=True)
    assert out.spike_seq[1:, :10].isnan().all() and (out.count_seq[1:, :10] == 0).all()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _expected_error(max_spikes) -> type[Exception]:
    """A non-integer N is a TypeError (as the nodes raise), every other bad parameter a ValueError."""
    return TypeError if isinstance(max_spikes, (bool, float)) else ValueError


@pytest.mark.parametrize(
    "bad,match",
    [(dict(lam=-0.5), "lam"), (dict(lam=0.0), "lam"), (dict(lam=torch.tensor(-0.5)), "lam"),
     (dict(max_spikes=0), "max_spikes"), (dict(max_spikes=3.0), "max_spikes"),
     (dict(theta_pos=0.0), "theta_pos"), (dict(theta_pos=-1.0), "theta_pos"),
     (dict(theta_pos=torch.tensor([0.5, -0.5, 0.5])), "theta_pos"), (dict(theta_neg=0.0), "theta_neg"),
     (dict(theta_neg=torch.tensor([0.5, float("inf"), 0.5])), "theta_neg"), (dict(ceiling=-6.0), "ceiling"),
     (dict(offset=1.5), "offset"), (dict(levels=F.power_levels(5)), "levels"),
     (dict(levels=torch.tensor([1.0, 2.0, 2.0, 3.0])), "strictly increasing")],
)  # fmt: skip
@pytest.mark.parametrize("grad", [False, True])
def test_sfn_entry_point_rejects_bad_parameters(bad, match, grad, rng):
    """``ops.sfn(x, 0.0, 1.0, lam=-0.5)`` used to return negative spikes on a positive-only site."""
    x = torch.randn(2, 4, 3, generator=rng).requires_grad_(grad)
    kw = dict(theta_pos=0.5, theta_neg=None, lam=0.5, max_spikes=4, channel_dim=1, backend="torch")
    kw.update(bad)
    with pytest.raises(_expected_error(kw["max_spikes"]), match=match):
        ops.sfn(x, 0.0, **kw)


@pytest.mark.parametrize(
    "threshold,max_spikes,match",
    [(0.0, 4, "v_threshold"), (-0.3, 4, "v_threshold"), (float("inf"), 4, "v_threshold"),
     (0.3, 0, "max_spikes"), (0.3, -1, "max_spikes"), (0.3, 2.0, "max_spikes")],
)  # fmt: skip
def test_mtn_entry_point_rejects_bad_parameters(threshold, max_spikes, match, rng):
    with pytest.raises(_expected_error(max_spikes), match=match):
        ops.mtn(torch.randn(2, 3, generator=rng), 0.0, threshold, max_spikes)


def test_nodes_skip_the_entry_point_checks(monkeypatch, rng):
    """The nodes validate at construction; their forwards (every path) never rerun the checks."""

    def fail(*args, **kwargs):
        raise AssertionError("a node forward ran the public parameter checks")

    monkeypatch.setattr(checks, "check_fire_params", fail)
    x = torch.randn(3, 2, 4, generator=rng)
    nodes = [MTNode(0.3, 4, step_mode="m"), SFNode(0.5, 0.4, lam=0.5, max_spikes=4, step_mode="m"),
             SFNode(0.5, lam=0.5, levels=F.power_levels(4), step_mode="m")]  # fmt: skip
    for node in nodes:
        for xi in (x, x.clone().requires_grad_(True)):
            sjf.reset_net(node)
            assert node(xi).shape == x.shape
    with pytest.raises(AssertionError, match="public parameter checks"):
        ops.mtn(x, 0.0, 0.3, 4)


def test_gradients_reach_lambda_and_thresholds_under_torch_compile(rng):
    """The op's backward serves x and v; a trainable λ/θ routes the call to the reference, compiled or not."""
    torch._dynamo.reset()
    c = _sfn_case(rng, True, True, False, False)

    def f(x, v, tp, tn, lam):
        return ops.sfn(x, v, tp, tn, lam, c["n"], None, c["offset"], None, 1, backend="torch").spike_seq.square().sum()

    grads = []
    for fn in (f, _compile_recording(f)[0]):
        tp, tn = c["tp"].clone().requires_grad_(True), c["tn"].clone().requires_grad_(True)
        lam = torch.tensor(c["lam"], requires_grad=True)
        x = (c["x"] * 10).requires_grad_(True)  # well past the full scale N·λ·θ in places: the bounds matter
        fn(x, c["v"], tp, tn, lam).backward()
        assert all(g is not None for g in (x.grad, tp.grad, tn.grad, lam.grad))
        grads.append((x.grad, tp.grad, tn.grad, lam.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert grads[0][3].abs() > 0  # λ moves the clamp bounds of the straight-through gradient: not trivially zero
