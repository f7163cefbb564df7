"""Every CUDA kernel variant compiles from the real source (NVRTC, no GPU needed).

The raw NVRTC API (``cupy.cuda.nvrtc``) compiles CUDA C++ to PTX without a device, so these
tests run in a CPU-only CI. A second group shows that the check fails on a broken source.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("cupy")

from sj_sfn import cuda  # noqa: E402

ARCHS = ("compute_75", "compute_90")


@pytest.fixture(scope="session")
def ptx_per_variant() -> dict:
    """PTX of each variant compiled on its own (as the runtime compiles it), for sm_90."""
    out = {}
    for v in cuda.all_variants():
        ptx, lowered = cuda.compile_ptx([v], arch="compute_90")
        out[v] = (ptx, lowered[v])
    return out


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\S+?)\s*\(", ptx))


def test_variant_table_is_complete():
    variants = cuda.all_variants()
    assert len(variants) == 3 * 2**4 == len(set(variants))
    assert {v.dtype for v in variants} == {torch.float32, torch.float16, torch.bfloat16}
    assert len({v.name_expression for v in variants}) == len(variants)


def test_every_variant_compiles_on_its_own(ptx_per_variant):
    for v, (ptx, name) in ptx_per_variant.items():
        assert _entries(ptx) == {name}, f"{v}: expected one entry {name}"


@pytest.mark.parametrize("arch", ARCHS)
def test_all_variants_compile_in_one_program(arch):
    ptx, lowered = cuda.compile_ptx(arch=arch)
    assert set(lowered.values()) == _entries(ptx)
    assert len(lowered) == len(cuda.all_variants())
    assert f".target sm_{arch.split('_')[1]}" in ptx


# CuPy's RawModule appends these to every NVRTC compilation (cupy/cuda/compiler.py)
CUPY_ADDED_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")
INEXACT = ("fma.rn", "mad.", "div.approx", "div.full", "add.rn.ftz", "sub.rn.ftz", "mul.rn.ftz", "div.rn.ftz",
           "cvt.rmi.ftz", "add.ftz", "sub.ftz", "mul.ftz", "neg.ftz")  # fmt: skip


def _arith_lines(ptx: str) -> list[str]:
    return [ln.strip() for ln in ptx.splitlines() if ".f32" in ln and not ln.strip().startswith("//")]


def test_ptx_is_ieee_exact(ptx_per_variant):
    """Round-to-nearest division, no fused multiply-add, no approximate math, no flush-to-zero."""
    for v, (ptx, _) in ptx_per_variant.items():
        assert "div.rn.f32" in ptx, v
        for line in _arith_lines(ptx):
            assert not any(bad in line for bad in INEXACT), f"{v}: {line}"


def test_ptx_stays_exact_with_the_flags_cupy_adds():
    """CuPy compiles with -ftz=true (and NVRTC's default --fmad=true): the arithmetic must not change."""
    for options in (cuda.NVRTC_OPTIONS + CUPY_ADDED_OPTIONS, ("--std=c++17", "--fmad=true", "-ftz=true", "--use_fast_math")):
        ptx, lowered = cuda.compile_ptx(options=options)
        assert len(_entries(ptx)) == len(lowered)
        for line in _arith_lines(ptx):
            assert not any(bad in line for bad in INEXACT), f"{options}: {line}"


def test_variant_specialisation_shows_in_ptx(ptx_per_variant):
    """Each template flag changes the code the way it should (a wrong dispatch would not)."""
    for v, (ptx, _) in ptx_per_variant.items():
        if v.dtype == torch.float16:
            assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx, v
        has_rem = bool(re.search(r"\b(rem|div)\.[su]64\b", ptx))
        assert has_rem == v.per_channel, f"{v}: channel indexing present={has_rem}"
        assert ("cvt.rmi.f32.f32" in ptx) == (not v.levels), f"{v}: floor present with custom levels={v.levels}"
        if v.signed:
            twin = ptx_per_variant[dataclasses.replace(v, signed=False)][0]
            assert ptx.count("div.rn.f32") > twin.count("div.rn.f32"), f"{v}: no second branch"
        if v.one_step:
            twin = ptx_per_variant[dataclasses.replace(v, one_step=False)][0]
            assert ptx.count("div.rn.f32") < twin.count("div.rn.f32"), f"{v}: time loop not removed"


def test_source_is_packaged():
    from importlib.resources import files

    assert files("sj_sfn.cuda").joinpath(cuda.SOURCE_FILE).is_file()
    assert "sj_sfn_fire" in cuda.source()


# -- the check can fail ------------------------------------------------------------------
def test_syntax_error_is_caught():
    broken = cuda.source().replace("v = f_sub(h, o);", "v = f_sub(h, o)", 1)
    assert broken != cuda.source()
    with pytest.raises(cuda.CompileError) as info:
        cuda.compile_ptx(cuda.all_variants()[:1], code=broken)
    assert "error" in info.value.log


def test_error_in_one_instantiation_is_caught():
    """A bug that only the bfloat16 instance hits is found because every variant is instantiated."""
    marker = "const float n_max = (float)max_spikes;"
    broken = cuda.source().replace(marker, marker + ' static_assert(DT != 2, "bf16 broken");', 1)
    assert broken != cuda.source()
    fp32 = [v for v in cuda.all_variants() if v.dtype == torch.float32]
    cuda.compile_ptx(fp32, code=broken)  # fine without the bf16 instance
    with pytest.raises(cuda.CompileError, match="bf16 broken"):
        cuda.compile_ptx(code=broken)


def test_unknown_identifier_is_caught():
    broken = cuda.source().replace("f_floor(u)", "floor_f(u)", 1)
    with pytest.raises(cuda.CompileError, match="floor_f"):
        cuda.compile_ptx(cuda.all_variants()[:1], code=broken)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_nvcc_compiles_every_variant(tmp_path):
    """A second compiler (nvcc -ptx) accepts the same source with every instance made explicit."""
    src = tmp_path / "all.cu"
    insts = "\n".join(
        f"template __global__ void {v.name_expression}("
        "const io<" + str(cuda.KERNEL_DTYPES[v.dtype]) + ">::storage*, const float*, io<"
        + str(cuda.KERNEL_DTYPES[v.dtype]) + ">::storage*, float*, signed char*, float*, const float*, float, "
        "const float*, const float*, const float*, float, int, long long, int, long long, int);"
        for v in cuda.all_variants()
    )
    src.write_text(cuda.source() + "\n" + insts + "\n")
    res = subprocess.run(
        ["nvcc", "-ptx", "-arch=compute_90", "--fmad=false", "-o", str(tmp_path / "all.ptx"), str(src)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(_entries((tmp_path / "all.ptx").read_text())) == len(cuda.all_variants())


def test_import_does_not_import_cupy():
    code = "import sys, sj_sfn, sj_sfn.ops, sj_sfn.cuda; sj_sfn.implementation('cpu'); assert 'cupy' not in sys.modules, 'cupy imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# -- the kernel's arithmetic, run on the host ----------------------------------------------
# The real fire.cu is compiled as C++ for the CPU with a small shim (CUDA intrinsics mapped to
# IEEE float operations, one "thread" that strides over every element) and called through
# ctypes with the very arguments that sj_sfn.cuda.kernels.plan() builds for a launch. This
# checks the per-element math, the channel indexing and the argument marshalling against the
# reference without a GPU. The source's PTX helpers (SJ_SFN_HOST) become plain C++ float ops.
_SHIM = r"""
#include <math.h>
#include <cstring>
#include <cstddef>
#define SJ_SFN_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
struct sj_dim3 { unsigned int x; };
static sj_dim3 blockIdx, blockDim, gridDim, threadIdx;
template <class T> static inline T __ldg(const T* p) { return *p; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float f_add(float a, float b) { return a + b; }
static inline float f_sub(float a, float b) { return a - b; }
static inline float f_mul(float a, float b) { return a * b; }
static inline float f_div(float a, float b) { return a / b; }
static inline float f_floor(float a) { return floorf(a); }
static inline float f16_to_f32(unsigned short h) { return (float)__builtin_bit_cast(_Float16, h); }
static inline unsigned short f32_to_f16(float f) { return __builtin_bit_cast(unsigned short, (_Float16)f); }
"""


def _host_source() -> str:
    src = cuda.source()
    assert "#ifndef SJ_SFN_HOST" in src
    wrappers = []
    for i, v in enumerate(cuda.all_variants()):
        st = f"io<{cuda.KERNEL_DTYPES[v.dtype]}>::storage"
        wrappers.append(
            f'extern "C" void run_{i}(const {st}* x, const float* v, {st}* s, float* vo, signed char* c, float* vs, '
            "const float* tp, float tpv, const float* tn, const float* lv, const float* ce, float r, int N, "
            "long long n, int T, long long inner, int C) {\n"
            "  blockIdx.x = 0; threadIdx.x = 0; blockDim.x = 1; gridDim.x = 1;\n"
            f"  {v.name_expression}(x, v, s, vo, c, vs, tp, tpv, tn, lv, ce, r, N, n, T, inner, C);\n}}"
        )
    return _SHIM + src + "\n" + "\n".join(wrappers) + "\n"


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    import ctypes

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on the PATH")
    d = tmp_path_factory.mktemp("host_kernel")
    (d / "fire_host.cpp").write_text(_host_source())
    res = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
         "-o", str(d / "fire_host.so"), str(d / "fire_host.cpp")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    lib = ctypes.CDLL(str(d / "fire_host.so"))
    index = {v: i for i, v in enumerate(cuda.all_variants())}
    return lib, index


def _host_fire(host_kernels, *args, **kwargs):
    import ctypes

    import numpy as np

    lib, index = host_kernels
    p = cuda.kernels.plan(*args, **kwargs)
    conv = {np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong}
    fn = getattr(lib, f"run_{index[p.variant]}")
    fn.restype = None
    fn(*(conv[type(a)](a.item()) for a in p.args))
    return p


def _reference(x_seq, v, tp, tn, lam, max_spikes, levels, offset, ceiling, channel_dim):
    from sj_sfn import functional as F

    x0 = x_seq[0]
    tp_b = F.broadcast_threshold(tp, x0, channel_dim)
    tn_b = None if tn is None else F.broadcast_threshold(tn, x0, channel_dim)
    return F.sfn_multi_step(x_seq, v, tp_b, tn_b, lam, max_spikes, levels, offset, ceiling, False, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_build_of_the_kernel_matches_the_reference(host_kernels, dtype, rng):
    """Every variant, fresh random inputs: spikes, counts, every v and the final v bit for bit."""
    from sj_sfn import functional as F

    seen = set()
    for signed, per_channel, custom, steps, ceil, offset in [
        (False, False, False, 1, None, 0.0), (False, False, False, 4, None, 0.3),
        (True, False, False, 1, None, 0.7), (True, False, False, 16, None, 0.25),
        (False, True, False, 1, 1.5, 0.0), (False, True, False, 4, None, 0.0),
        (True, True, False, 1, None, 0.5), (True, True, False, 4, 2.0, 0.0),
        (False, False, True, 1, None, 0.0), (False, False, True, 4, 1.0, 0.5),
        (True, False, True, 1, None, 0.0), (True, False, True, 16, None, 0.0),
        (False, True, True, 1, None, 0.5), (False, True, True, 4, None, 0.0),
        (True, True, True, 1, 0.7, 0.0), (True, True, True, 4, None, 0.25),
    ]:  # fmt: skip
        n_max = int(torch.randint(1, 40, (), generator=rng))
        shape = (steps, 3, 5, 7)
        channel_dim = 1
        x = (torch.randn(shape, generator=rng) * 2).to(dtype)
        v0 = torch.randn(shape[1:], generator=rng) * 0.3
        c = shape[1 + channel_dim]
        tp = (torch.rand(c if per_channel else (), generator=rng) + 0.05) * 2
        tn = (torch.rand(c if per_channel else (), generator=rng) + 0.05) * 2 if signed else None
        lam = torch.rand((), generator=rng) * 0.5 + 0.05
        levels = F.power_levels(n_max, 1.0 + float(torch.rand((), generator=rng)) * 2) if custom else None
        ceiling = None if ceil is None else torch.tensor(ceil)
        ref = _reference(x, v0, tp, tn, lam, n_max, levels, offset, ceiling, channel_dim)
        tp_s, tn_s = tp.float() * lam, None if tn is None else tn.float() * lam
        p = _host_fire(host_kernels, x, v0, tp_s, tn_s, n_max, levels, offset, ceiling, channel_dim, True, True)
        seen.add(p.variant)
        case = f"{p.variant}, N={n_max}, r={offset}, ceiling={ceil}"
        assert torch.equal(p.spike_seq, ref.spike_seq), case
        assert torch.equal(p.count_seq, ref.count_seq), case
        assert torch.equal(p.v, ref.v), case
        assert torch.equal(p.v_seq, ref.v_seq), case
    assert seen == {v for v in cuda.all_variants() if v.dtype == dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_build_of_the_kernel_propagates_nan_like_the_reference(host_kernels, dtype, rng):
    """NaN and ±Inf inputs (and a NaN initial membrane) through every variant.

    Spikes, every v and the final v equal the reference with NaN in the same places (custom
    levels included: the binary search alone gave count 0 for NaN). Counts are compared
    everywhere: both write 0 where the potential is NaN (float -> int of NaN is undefined in
    C++ and in torch, so both make it 0 explicitly).
    """
    from sj_sfn import functional as F

    seen = set()
    for signed, per_channel, custom, one_step in itertools.product((False, True), repeat=4):
        n_max = int(torch.randint(1, 40, (), generator=rng))
        shape = (1 if one_step else 4, 3, 5, 7)
        channel_dim = 1
        x = torch.randn(shape, generator=rng) * 2
        pick = torch.rand(shape, generator=rng)
        x = torch.where(pick < 0.08, float("nan"), x)
        x = torch.where((pick >= 0.08) & (pick < 0.14), float("inf"), x)
        x = torch.where((pick >= 0.14) & (pick < 0.2), float("-inf"), x).to(dtype)
        v0 = torch.randn(shape[1:], generator=rng) * 0.3
        v0[0, 0, :2] = float("nan")
        c = shape[1 + channel_dim]
        tp = (torch.rand(c if per_channel else (), generator=rng) + 0.05) * 2
        tn = (torch.rand(c if per_channel else (), generator=rng) + 0.05) * 2 if signed else None
        lam = torch.rand((), generator=rng) * 0.5 + 0.05
        levels = F.power_levels(n_max, 1.0 + float(torch.rand((), generator=rng)) * 2) if custom else None
        ceiling = torch.tensor(1.5) if signed == per_channel else None
        offset = float(torch.rand((), generator=rng)) * 0.9
        ref = _reference(x, v0, tp, tn, lam, n_max, levels, offset, ceiling, channel_dim)
        nan = ref.v_seq.isnan()
        assert nan.any() and (~nan).any() and torch.equal(ref.spike_seq.isnan(), nan)
        tp_s, tn_s = tp.float() * lam, None if tn is None else tn.float() * lam
        p = _host_fire(host_kernels, x, v0, tp_s, tn_s, n_max, levels, offset, ceiling, channel_dim, True, True)
        seen.add(p.variant)
        case = f"{p.variant}, N={n_max}, r={offset:.3f}, ceiling={ceiling}"
        for name in ("spike_seq", "v", "v_seq"):
            torch.testing.assert_close(getattr(p, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True, msg=f"{case}: {name}")
        assert torch.equal(p.count_seq, ref.count_seq), case
        assert (p.count_seq[nan] == 0).all(), case
    assert seen == {v for v in cuda.all_variants() if v.dtype == dtype}


@pytest.mark.parametrize("scalar_side", ["theta_pos", "theta_neg"])
def test_host_build_one_threshold_per_tensor_and_the_other_per_channel(host_kernels, rng, scalar_side):
    """θ+ for the whole tensor with θ- per channel (or the reverse) runs as torch broadcasts it."""
    x = torch.randn(3, 2, 5, 4, generator=rng) * 2
    v0 = torch.randn(2, 5, 4, generator=rng) * 0.3
    one, per = torch.rand((), generator=rng) + 0.1, torch.rand(5, generator=rng) + 0.1
    tp, tn = (one, per) if scalar_side == "theta_pos" else (per, one)
    ref = _reference(x, v0, tp, tn, torch.tensor(1.0), 9, None, 0.0, None, 1)
    p = _host_fire(host_kernels, x, v0, tp, tn, 9, None, 0.0, None, 1, True, True)
    assert p.variant.per_channel
    assert torch.equal(p.spike_seq, ref.spike_seq) and torch.equal(p.count_seq, ref.count_seq)
    assert torch.equal(p.v, ref.v) and torch.equal(p.v_seq, ref.v_seq)


def test_host_build_mtn_scalar_threshold_and_strided_input(host_kernels, rng):
    """MTN passes θ as a float argument; a non-contiguous input is made contiguous first."""
    from sj_sfn import functional as F

    x = torch.randn(6, 9, 4, generator=rng).transpose(1, 2)  # [T, 4, 9], not contiguous
    theta = float(torch.rand((), generator=rng)) + 0.1
    ref = F.mtn_multi_step(x, 0.05, theta, 7, return_count=True, store_v_seq=True)
    theta32 = torch.tensor(theta, dtype=torch.float32).item()
    p = _host_fire(host_kernels, x, torch.full((4, 9), 0.05), theta32, None, 7, return_count=True, store_v_seq=True)
    assert torch.equal(p.spike_seq, ref.spike_seq) and torch.equal(p.count_seq, ref.count_seq)
    assert torch.equal(p.v, ref.v) and torch.equal(p.v_seq, ref.v_seq)


def test_host_build_catches_a_wrong_formula(host_kernels, rng, tmp_path):
    """The host comparison fails when the kernel's math is changed (floor → round)."""
    import ctypes

    src = _host_source().replace("float k = f_floor(u);", "float k = f_floor(u + 0.5f);", 1)
    (tmp_path / "bad.cpp").write_text(src)
    cxx = shutil.which("g++") or shutil.which("c++")
    res = subprocess.run([cxx, "-std=c++20", "-O0", "-shared", "-fPIC", "-o", str(tmp_path / "bad.so"), str(tmp_path / "bad.cpp")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    bad = (ctypes.CDLL(str(tmp_path / "bad.so")), host_kernels[1])
    x = torch.randn(2, 50, generator=rng) * 3
    p = _host_fire(bad, x, torch.zeros(50), torch.tensor(0.3), None, 10, return_count=True)
    ref = _reference(x, torch.zeros(50), torch.tensor(0.3), None, 1.0, 10, None, 0.0, None, None)
    assert not torch.equal(p.spike_seq, ref.spike_seq)


def test_exactness_check_catches_plain_float_ops_under_ftz():
    """Written as plain C++ (a + b, a * b) the same helpers flush denormals under CuPy's -ftz=true."""
    src = cuda.source()
    for op, sym in (("add", "+"), ("mul", "*")):
        asm = f'{{ float r; asm("{op}.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }}'
        assert asm in src
        src = src.replace(asm, f"{{ return a {sym} b; }}")
    ptx, _ = cuda.compile_ptx(cuda.all_variants()[:1], code=src, options=cuda.NVRTC_OPTIONS + CUPY_ADDED_OPTIONS)
    assert any(any(bad in line for bad in INEXACT) for line in _arith_lines(ptx))
