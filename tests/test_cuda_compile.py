"""Every CUDA kernel variant compiles from the real source (NVRTC, no GPU needed).

The raw NVRTC API (``cupy.cuda.nvrtc``) compiles CUDA C++ to PTX without a device, so these
tests run in a CPU-only CI. A second group shows that the check fails on a broken source.
"""

from __future__ import annotations

import dataclasses
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


def test_ptx_is_ieee_exact(ptx_per_variant):
    """Round-to-nearest division, no fused multiply-add, no approximate math, no flush-to-zero."""
    for v, (ptx, _) in ptx_per_variant.items():
        assert "div.rn.f32" in ptx, v
        for bad in ("fma.rn.f32", "div.approx", "div.full", ".ftz.f32", "mad.f32"):
            assert bad not in ptx, f"{v}: PTX contains {bad}"


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
    broken = cuda.source().replace("v = __fsub_rn(h, o);", "v = __fsub_rn(h, o)", 1)
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
    broken = cuda.source().replace("floorf(u)", "floor_f(u)", 1)
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
