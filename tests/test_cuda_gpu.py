"""Parity of the CuPy kernels with the torch reference on a CUDA device (skipped without one).

Inputs are fresh random tensors in every test; the reference runs on the CPU (the truth). In
float32 spikes, the final v, every stored v and the counts must be equal bit for bit; float16
and bfloat16 outputs too, because the kernel rounds exactly as ``tensor.to(dtype)``.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from spikingjelly.activation_based import functional as sjf

import sj_sfn
from sj_sfn import MTNode, SFNode, ops
from sj_sfn import functional as F
from sj_sfn.neuron import reference_fire

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 17, 33), (5, 7, 11, 13), (1, 1), (2, 129, 3)]  # [B, C, ...] with channel_dim=1; odd sizes


@pytest.fixture(scope="module", autouse=True)
def _cupy_usable():
    ok, why = sj_sfn.cuda.cupy_status()
    if not ok:
        pytest.skip(why)


@pytest.fixture
def cuda_rng() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


def _case(rng, dtype, signed, per_channel, custom, steps, shape, ceiling=False, channel_dim=1):
    n_max = int(torch.randint(1, 100, (), generator=rng))
    x = (torch.randn((steps, *shape), generator=rng) * 2).to(dtype)
    v = torch.randn(shape, generator=rng) * 0.3
    c = shape[channel_dim]
    size = (c,) if per_channel else ()
    tp = torch.rand(size, generator=rng) + 0.05
    tn = torch.rand(size, generator=rng) + 0.05 if signed else None
    lam = torch.rand((), generator=rng) * 0.5 + 0.02
    levels = F.power_levels(n_max, 1.0 + 2.0 * float(torch.rand((), generator=rng))) if custom else None
    ceil = torch.rand((), generator=rng) * 2 + 0.3 if ceiling else None
    offset = float(torch.rand((), generator=rng)) * 0.9
    return dict(x=x, v=v, tp=tp, tn=tn, lam=lam, n=n_max, levels=levels, ceiling=ceil, offset=offset, channel_dim=channel_dim)


def _cpu_reference(c):
    x0 = c["x"][0]
    tp = F.broadcast_threshold(c["tp"], x0, c["channel_dim"])
    tn = None if c["tn"] is None else F.broadcast_threshold(c["tn"], x0, c["channel_dim"])
    return F.sfn_multi_step(c["x"], c["v"], tp, tn, c["lam"], c["n"], c["levels"], c["offset"], c["ceiling"], False, True, True)


def _on_cuda(c, x=None):
    dev = torch.device("cuda")
    out = ops.sfn(
        (c["x"] if x is None else x).to(dev), c["v"].to(dev), c["tp"].to(dev), None if c["tn"] is None else c["tn"].to(dev),
        c["lam"].to(dev), c["n"], None if c["levels"] is None else c["levels"].to(dev), c["offset"],
        None if c["ceiling"] is None else c["ceiling"].to(dev), c["channel_dim"], return_count=True, store_v_seq=True,
        backend="cupy",
    )  # fmt: skip
    torch.cuda.synchronize()
    return out


def _assert_equal(out, ref, what):
    for name, a, b in zip(("spike", "v", "count", "v_seq"), out, ref):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b):
            bad = (a.float() != b.float()).sum().item()
            pytest.fail(f"{what}: {name} differs in {bad} of {a.numel()} elements")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_every_variant_matches_the_reference(dtype, steps, cuda_rng):
    for signed, per_channel, custom in itertools.product((False, True), repeat=3):
        for shape in SHAPES:
            for ceiling in (False, True):
                c = _case(cuda_rng, dtype, signed, per_channel, custom, steps, shape, ceiling)
                _assert_equal(_on_cuda(c), _cpu_reference(c), f"{dtype} signed={signed} per_channel={per_channel} "
                              f"levels={custom} T={steps} shape={shape} ceiling={ceiling} N={c['n']}")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input_and_negative_channel_dim(dtype, cuda_rng):
    c = _case(cuda_rng, dtype, True, True, False, 4, (6, 9, 5), channel_dim=-1)
    strided = c["x"].transpose(1, 2).contiguous().transpose(1, 2).cuda()  # same values, other strides
    assert not strided.is_contiguous()
    _assert_equal(_on_cuda(c, strided), _cpu_reference(c), f"{dtype} non-contiguous")
    sliced = (torch.randn(4, 6, 18, 5, generator=cuda_rng) * 2).to(dtype)
    c["x"] = sliced[:, :, ::2]
    _assert_equal(_on_cuda(c, sliced.cuda()[:, :, ::2]), _cpu_reference(c), f"{dtype} sliced")


def test_nodes_with_backend_cupy(cuda_rng):
    x = torch.randn(8, 4, 16, 7, 7, generator=cuda_rng)
    cpu = SFNode(torch.rand(16, generator=cuda_rng) + 0.1, torch.rand(16, generator=cuda_rng) + 0.1, lam=0.2,
                 max_spikes=12, channel_dim=1, v_init=0.5, step_mode="m", store_counts=True, store_v_seq=True)  # fmt: skip
    gpu = SFNode(cpu.theta_pos, cpu.theta_neg, lam=0.2, max_spikes=12, channel_dim=1, v_init=0.5, step_mode="m",
                 backend="cupy", store_counts=True, store_v_seq=True).cuda()  # fmt: skip
    assert sj_sfn.implementation(gpu).name == "cupy"
    for _ in range(2):  # the state carries over between calls
        y_cpu, y_gpu = cpu(x), gpu(x.cuda())
        assert torch.equal(y_gpu.cpu(), y_cpu) and torch.equal(gpu.v.cpu(), cpu.v)
        assert torch.equal(gpu.last_counts.cpu(), cpu.last_counts) and torch.equal(gpu.v_seq.cpu(), cpu.v_seq)
    mtn_cpu = MTNode(0.3, 8, v_init=0.1, step_mode="s", store_counts=True)
    mtn_gpu = MTNode(0.3, 8, v_init=0.1, step_mode="s", backend="cupy", store_counts=True)
    for t in range(3):
        assert torch.equal(mtn_gpu(x[t].cuda()).cpu(), mtn_cpu(x[t]))
        assert torch.equal(mtn_gpu.last_counts.cpu(), mtn_cpu.last_counts)
    sjf.reset_net(mtn_gpu)
    assert not isinstance(mtn_gpu.v, torch.Tensor) or not mtn_gpu.v.any()


def test_env_var_switches_every_node(monkeypatch, cuda_rng):
    cpu = SFNode(0.4, 0.3, lam=0.5, max_spikes=5, step_mode="m", store_counts=True)
    node = SFNode(0.4, 0.3, lam=0.5, max_spikes=5, step_mode="m", store_counts=True).cuda()  # backend='torch'
    x = torch.randn(3, 1000, generator=cuda_rng)
    y_ref = cpu(x)
    monkeypatch.setenv(ops.ENV_VAR, "cupy")
    assert sj_sfn.implementation(node).name == "cupy"
    assert torch.equal(node(x.cuda()).cpu(), y_ref) and torch.equal(node.last_counts.cpu(), cpu.last_counts)
    sjf.reset_net(node)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert sj_sfn.implementation(node).name == "torch"
    torch.testing.assert_close(node(x.cuda()).cpu(), y_ref, rtol=1e-6, atol=1e-6)  # torch's own CUDA kernels


def test_fallbacks_for_unsupported_configurations(cuda_rng):
    x = torch.randn(2, 300, generator=cuda_rng, dtype=torch.float64)
    out = ops.sfn(x.cuda(), 0.0, 0.01, 0.02, 1.0, 200, return_count=True, backend="cupy")  # float64, N > 127
    ref = F.sfn_multi_step(x, 0.0, 0.01, 0.02, 1.0, 200, return_count=True)
    assert out.count_seq.dtype == torch.int16 and out.spike_seq.dtype == torch.float64
    torch.testing.assert_close(out.spike_seq.cpu(), ref.spike_seq, rtol=1e-12, atol=1e-12)
    out = ops.sfn(x.float().cuda(), 0.0, 0.01, None, 1.0, 200, return_count=True, backend="cupy")
    ref = F.sfn_multi_step(x.float(), 0.0, 0.01, None, 1.0, 200, return_count=True)
    assert out.count_seq.dtype == torch.int16  # the reference's dtype, not the kernel's int8
    assert (out.count_seq.cpu().int() - ref.count_seq.int()).abs().max() <= 1  # torch's CUDA kernels, not ours


def test_gradient_through_the_kernel_equals_reference_autograd(cuda_rng):
    c = _case(cuda_rng, torch.float32, True, True, False, 4, (3, 17, 33))
    dev = torch.device("cuda")
    g = torch.randn(c["x"].shape, generator=cuda_rng)
    x1 = c["x"].clone().requires_grad_(True)
    ref = _cpu_reference({**c, "x": x1})
    ref.spike_seq.backward(g)
    x2 = c["x"].to(dev).requires_grad_(True)
    out = ops.sfn(x2, c["v"].to(dev), c["tp"].to(dev), c["tn"].to(dev), c["lam"].to(dev), c["n"], None, c["offset"], None,
                  c["channel_dim"], backend="cupy")  # fmt: skip
    out.spike_seq.backward(g.to(dev))
    assert torch.equal(x2.grad.cpu(), x1.grad)
    torch.testing.assert_close(out.spike_seq.detach().cpu(), ref.spike_seq.detach(), rtol=1e-6, atol=1e-5)


def test_runs_on_the_current_stream_and_compiles(cuda_rng):
    c = _case(cuda_rng, torch.float16, False, False, False, 4, (64, 1000))
    ref = _cpu_reference(c)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = c["x"].cuda(non_blocking=False)
        out = ops.sfn(x, c["v"].cuda(), c["tp"].cuda(), None, c["lam"].cuda(), c["n"], None, c["offset"], None, 1,
                      return_count=True, store_v_seq=True, backend="cupy")  # fmt: skip
        spike = out.spike_seq * 1  # queued behind the kernel on the same stream
    s.synchronize()
    assert torch.equal(spike.cpu(), ref.spike_seq)

    torch._dynamo.reset()

    def f(x, v):
        return ops.sfn(x, v, c["tp"].cuda(), None, c["lam"].cuda(), c["n"], None, c["offset"], None, 1, backend="cupy")

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(c["x"].cuda(), c["v"].cuda())
    assert torch.equal(y.spike_seq.cpu(), ref.spike_seq)


def test_empty_input():
    out = ops.sfn(torch.empty(3, 0, 4, device="cuda"), 0.0, 0.5, 0.5, backend="cupy", return_count=True)
    assert out.spike_seq.shape == (3, 0, 4) and out.count_seq.shape == (3, 0, 4)


def test_64_bit_offsets(cuda_rng):
    """T·n > 2^31 elements: the last elements of the last step are still right."""
    steps, n = 9, 2**28
    need = steps * n * (2 + 2 + 1) + 2 * n * 4
    if torch.cuda.get_device_properties(0).total_memory < 2 * need:
        pytest.skip("not enough device memory")
    x = torch.empty(steps, n, dtype=torch.float16, device="cuda").normal_(0, 2)
    out = ops.sfn(x, 0.0, 0.3, 0.2, 0.5, 10, return_count=True, backend="cupy")
    tail = slice(n - 4096, n)
    ref = F.sfn_multi_step(x[:, tail].cpu(), 0.0, 0.3, 0.2, 0.5, 10, return_count=True)
    assert torch.equal(out.spike_seq[:, tail].cpu(), ref.spike_seq) and torch.equal(out.count_seq[:, tail].cpu(), ref.count_seq)
    del x, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_inputs_match_the_reference(dtype, cuda_rng):
    """NaN gives NaN spikes and membranes (count 0) with uniform and custom levels; ±Inf saturate as in torch."""
    for signed, per_channel, custom in itertools.product((False, True), repeat=3):
        c = _case(cuda_rng, dtype, signed, per_channel, custom, 4, (3, 17, 33))
        x = c["x"].clone()
        pick = torch.rand(x.shape, generator=cuda_rng)
        x[pick < 0.05] = float("nan")
        x[(pick >= 0.05) & (pick < 0.08)] = float("inf")
        x[(pick >= 0.08) & (pick < 0.11)] = float("-inf")
        c["x"] = x
        out, ref = _on_cuda(c), _cpu_reference(c)
        what = f"{dtype} signed={signed} per_channel={per_channel} levels={custom}"
        for name, a, b in zip(("spike", "v", "count", "v_seq"), out, ref):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True, msg=f"{what}: {name}")
        assert torch.isnan(ref.spike_seq).any(), what  # the case is not vacuous


def _small_models():
    from fixtures_small_nets import InvertedResidualNet, he_init_

    yield "cnn", he_init_(InvertedResidualNet(), torch.Generator().manual_seed(0)).eval(), (3, 16, 16)
    try:
        import timm
    except ImportError:
        return
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
    yield "vit", vit.eval(), (3, 32, 32)


def test_default_conversion_runs_on_cuda_and_every_site_fires_as_the_reference():
    """``sj_sfn.convert`` with its defaults (budget calibration, reconstruction) runs on CUDA end to end, every
    site takes the CuPy kernel, and each site's output in a forward of the converted network equals the torch
    reference fire of the same input on the CPU, bit for bit. (The networks' outputs themselves are not compared
    across devices: cuDNN's TF32 convolutions and other summation orders move values across fire boundaries, and
    a small random ViT's output moves by 5% under a 1e-5 input perturbation.) The energy count runs on CUDA."""
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    for name, ann, shape in _small_models():
        ann = ann.to(dev)
        calib = [torch.randn((8, *shape), generator=g).to(dev) for _ in range(4)]
        snn = sj_sfn.convert(ann, calib, reconstruct=5, progress=False)
        impl = {n: i.name for n, i in sj_sfn.implementation(snn).items()}
        assert impl and set(impl.values()) == {"cupy"}, f"{name}: {impl}"
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            m.register_forward_hook(lambda mod, inp, out, _n=n, _s=seen: _s.__setitem__(_n, (inp[0].detach(), out.detach())))
            for n, m in snn.named_modules()
            if isinstance(m, SFNode)
        ]
        with torch.no_grad():
            snn(torch.randn((16, *shape), generator=g).to(dev))
        for h in hooks:
            h.remove()
        assert set(seen) == set(impl), f"{name}: sites that did not fire: {set(impl) - set(seen)}"
        for n, (x, out) in seen.items():
            node = copy.deepcopy(snn.get_submodule(n)).cpu()
            with torch.no_grad(), reference_fire():
                ref = node(x.cpu())
            if not torch.equal(out.cpu(), ref):
                bad = (out.cpu() != ref).sum().item()
                pytest.fail(f"{name}: site {n} differs from the reference in {bad} of {ref.numel()} elements")
        report = sj_sfn.energy.measure_energy(snn, calib, ann=ann)
        assert 0 < report.ratio < 5, f"{name}: energy ratio {report.ratio}"
