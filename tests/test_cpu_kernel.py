"""The one-pass CPU fire kernel (``sj_sfn.cpu``): build, cache, fallback, the gather-free float levels.

Its results are compared with the reference bit for bit in ``test_functional_fast.py`` (every fast-path
test runs on the kernel and on the torch fast path); here: what happens around it.
"""

from __future__ import annotations

import pytest
import torch

import sj_sfn
from sj_sfn import SFNode, cpu
from sj_sfn import functional as F
from sj_sfn.cpu import kernels as K
from sj_sfn.neuron import reference_fire

needs_compiler = pytest.mark.skipif(K._compiler() is None, reason="no C compiler: the CPU fire kernel cannot be built")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty kernel cache and no loaded kernel (restored afterwards)."""
    monkeypatch.setenv("SJ_SFN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    K._load.cache_clear()
    yield tmp_path
    K._load.cache_clear()


@needs_compiler
def test_builds_once_into_the_cache_and_reuses_it(fresh_build) -> None:
    ok, why = cpu.status()
    assert ok, why
    built = list((fresh_build / "cpu").glob("fire-*.so"))
    assert len(built) == 1 and str(fresh_build) in why
    stamp = built[0].stat().st_mtime_ns
    K._load.cache_clear()
    assert cpu.status()[0]
    assert [p.stat().st_mtime_ns for p in (fresh_build / "cpu").glob("fire-*.so")] == [stamp]  # loaded, not rebuilt


def test_a_broken_compiler_leaves_the_torch_path_with_the_reason(fresh_build, monkeypatch: pytest.MonkeyPatch, rng) -> None:
    monkeypatch.setattr(K, "_compiler", lambda: "false")  # runs, prints nothing, fails
    ok, why = cpu.status()
    assert not ok and why.startswith("the build failed")
    assert "unusable" in " ".join(sj_sfn.implementation("cpu").notes)
    node = SFNode(torch.tensor(0.3), torch.tensor(0.2), levels=F.float_levels(3, 4), offset=0.5, stateful=False)
    x = torch.randn(3, 50, generator=rng)
    with torch.no_grad():
        fast = node(x)
        assert "cpu" not in node.__dict__["_fast_cache"][1]  # the torch fast path fired
        with reference_fire():
            assert torch.equal(fast, node(x))


def test_no_compiler_is_reported(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "_compiler", lambda: None)
    assert cpu.status() == (False, "no C compiler found (set CC, or install gcc/clang)")


@needs_compiler
@pytest.mark.parametrize("value", ["0", "off", "torch"])
def test_the_environment_variable_disables_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(K.ENV_VAR, value)
    ok, why = cpu.status()
    assert not ok and K.ENV_VAR in why and not cpu.available()
    monkeypatch.delenv(K.ENV_VAR)
    assert cpu.available()


@needs_compiler
@pytest.mark.parametrize("m,octaves,subnormal", [(1, 6, False), (2, 8, False), (3, 4, False), (2, 7, True), (3, 3, True), (1, 4, True)])
@pytest.mark.parametrize("offset", [0.0, 0.25, 0.5, 0.75])
def test_float_levels_take_the_gather_free_function_and_match_the_table(m: int, octaves: int, subnormal: bool, offset: float) -> None:
    """Float levels (with or without subnormal levels) and a dyadic offset are computed from the bits, equal to the
    table on every float32 that marks a bucket boundary (both signs, NaN and infinities included); the guard
    compares exactly that."""
    levels = F.float_levels(m, octaves, subnormal=subnormal)
    for signed in (False, True):
        table = F.level_table(levels, offset, signed=signed)
        assert table is not None
        plan = K.FirePlan(False, False, levels.numel(), offset, table, None, levels)
        assert plan.flags & K.FLOAT and bool(plan.flags & K.SUBNORMAL) == subnormal
        u = K._bucket_probe(table)
        as_table = K.FirePlan(False, False, levels.numel(), offset, table)
        assert not as_table.flags & K.FLOAT
        a, b = as_table(u, torch.ones(())), plan(u, torch.ones(()))
        nan = torch.isnan(a)
        assert torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@needs_compiler
def test_the_float_function_is_refused_where_it_would_differ() -> None:
    levels = F.float_levels(3, 4)
    table = F.level_table(levels, 0.5, signed=False)
    # a non-dyadic offset has no exact bit form; levels that are not float levels have none either
    odd = F.level_table(levels, 0.3, signed=False)
    assert odd is None or not K.FirePlan(False, False, 32, 0.3, odd, None, levels).flags & K.FLOAT
    other = F.float_levels(2, 8)
    assert not K.FirePlan(False, False, 32, 0.5, F.level_table(other, 0.5, signed=False), None, other * 1.5).flags & K.FLOAT
    # powers of two (m = 0): the truncation to no mantissa bit would turn a NaN into ±inf, so the table stays
    powers = F.float_levels(0, 6)
    plan = K.FirePlan(False, False, 6, 0.5, F.level_table(powers, 0.5, signed=True), None, powers)
    assert plan.flags == K.TABLE
    u = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0, -40.0, 0.4])
    assert torch.equal(plan(u, torch.ones(())).isnan(), u.isnan())
    # r = 1 is no node's offset: its rounding would carry ±inf past y_top (the float form caps with one min)
    assert not K.FirePlan(False, False, 32, 1.0, F.level_table(levels, 1.0, signed=True), None, levels).flags & K.FLOAT
    sub = F.float_levels(3, 3, subnormal=True)
    assert not K.FirePlan(False, False, 31, 0.5, F.level_table(sub, 0.5, signed=False), None, sub[1:]).flags & K.FLOAT
    # a table that is not the levels' own: the equality check on the bucket boundaries refuses the float form
    values = table.values.clone()
    values[torch.tensor([1.3]).view(torch.int32).long() >> int(table.shift)] = 7.0  # the bucket of u = 1.3
    wrong = table._replace(values=values)
    assert not K.FirePlan(False, False, 32, 0.5, wrong, None, levels).flags & K.FLOAT
    sub_table = F.level_table(sub, 0.5, signed=False)  # the same in the subnormal range (u = 0.3)
    values = sub_table.values.clone()
    values[torch.tensor([0.3]).view(torch.int32).long() >> int(sub_table.shift)] = 7.0
    assert not K.FirePlan(False, False, 31, 0.5, sub_table._replace(values=values), None, sub).flags & K.FLOAT


@needs_compiler
def test_thresholds_that_do_not_fit_the_input_are_refused() -> None:
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="do not broadcast"):
        cpu.fire(x, torch.ones(1, 4, 1), None, 8, 0.5)
    with pytest.raises(ValueError, match="same shape and layout"):
        cpu.fire(x, torch.ones(1, 5, 1), torch.ones(1, 1, 3), 8, 0.5)
    node = SFNode(torch.rand(4) + 0.1, max_spikes=8, channel_dim=1, stateful=False)
    with pytest.raises(ValueError, match="has 4 channels"):  # the node's own check names the problem
        with torch.no_grad():
            node(x)


@needs_compiler
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SJ_SFN_CACHE_DIR", str(blocked / "cache"))  # cannot be created: a file is in the way
    monkeypatch.setattr(K.tempfile, "tempdir", str(tmp_path / "tmp"))
    K._load.cache_clear()
    try:
        ok, why = cpu.status()
        assert ok and str(tmp_path / "tmp") in why
    finally:
        K._load.cache_clear()


def test_a_node_that_fired_copies_and_pickles(rng: torch.Generator) -> None:
    """The plan cached by a forward (the kernel's ctypes handles) is not part of the state: deepcopy and torch.save work."""
    import copy
    import io

    node = SFNode(torch.tensor(0.3), torch.tensor(0.2), levels=F.float_levels(3, 4), offset=0.5, stateful=False)
    x = torch.randn(3, 40, generator=rng)
    with torch.no_grad():
        out = node(x)
        assert "_fast_cache" in node.__dict__
        twin = copy.deepcopy(node)
        buf = io.BytesIO()
        torch.save(node, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert "_fast_cache" not in twin.__dict__ and "_fast_cache" not in loaded.__dict__
        assert torch.equal(twin(x), out) and torch.equal(loaded(x), out)
