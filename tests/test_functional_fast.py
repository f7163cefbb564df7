"""The fast inference fire of a stateless SFNode equals the reference fire rule bit for bit.

Both fast paths — the one-pass C kernel (``sj_sfn.cpu``) and the torch ops of ``functional.fast_fire``,
each with the lookup tables of ``functional.level_table`` — run every test (the ``fast_path`` fixture), and are
compared with the same node inside ``neuron.reference_fire()`` (``functional.multi_threshold_fire``):
float32 bit patterns equal (the sign of zero included) wherever the reference is not NaN, NaN where
it is NaN. Inputs hold exact level edges, zeros of both signs, infinities, NaN and tiny values.
"""

from __future__ import annotations

import pytest
import torch

from sj_sfn import SFNode, cpu
from sj_sfn import functional as F
from sj_sfn.neuron import reference_fire


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the C kernel (the torch fast path then must not run) and on the torch fast path."""
    if request.param == "torch":
        monkeypatch.setenv(cpu.kernels.ENV_VAR, "0")
        return "torch"
    monkeypatch.delenv(cpu.kernels.ENV_VAR, raising=False)
    if cpu.kernels._compiler() is None:
        pytest.skip("no C compiler: the CPU fire kernel cannot be built")
    ok, why = cpu.status()
    assert ok, f"a C compiler is present but the CPU fire kernel is unusable: {why}"

    def torch_path_taken(*args, **kwargs):
        raise AssertionError("the torch fast path ran where the C kernel should have")

    monkeypatch.setattr(F, "fast_fire", torch_path_taken)
    return "kernel"

LEVELS = {
    "uniform": None,
    "float_m3": F.float_levels(3, 4),
    "float_m2": F.float_levels(2, 8),
    "pow2": F.float_levels(0, 6),
    "float_m3_subnormal": F.float_levels(3, 3, subnormal=True),  # the default level sets
    "float_m2_subnormal": F.float_levels(2, 7, subnormal=True),
}


def _assert_bitwise_equal(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(fast), nan)
    fb, rb = fast.masked_fill(nan, 0.0).view(torch.int32), ref.masked_fill(nan, 0.0).view(torch.int32)
    bad = (fb != rb).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}: {fast[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"


def _input(shape: tuple[int, ...], node: SFNode, rng: torch.Generator) -> torch.Tensor:
    """Gaussian values over the whole range plus exact edges, level values, ±0, ±inf, NaN and tiny numbers."""
    x = torch.randn(shape, generator=rng) * 3.0
    flat = x.view(-1)
    tp = (node.theta_pos * node.lam).reshape(-1)[0]
    levels = torch.arange(1, node.max_spikes + 1, dtype=torch.float32) if node.levels is None else node.levels
    edges = F.level_edges(levels, node.offset) if node.levels is not None else levels - node.offset
    special = torch.cat([edges * tp, levels * tp, -edges * tp, torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                            float("nan"), 1e-30, -1e-30, 1e30])])
    k = min(special.numel(), flat.numel())
    flat[:k] = special[:k]
    return x


def _fire_both(node: SFNode, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fast = node(x)
        with reference_fire():
            ref = node(x)
    return fast, ref


@pytest.mark.parametrize("levels", list(LEVELS))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("ceiling", [None, 2.5])
@pytest.mark.parametrize("layout", ["tensor", "channel_first", "channel_last"])
def test_fast_fire_equals_reference_bit_for_bit(levels: str, signed: bool, ceiling, layout: str, rng: torch.Generator) -> None:
    lv = LEVELS[levels]
    shape, channel_dim = {"tensor": ((3, 5, 7, 9), None), "channel_first": ((3, 5, 7, 9), 1),
                          "channel_last": ((4, 6, 11), -1)}[layout]  # fmt: skip
    c = 1 if channel_dim is None else shape[channel_dim]
    tp = torch.rand(c, generator=rng) + 0.2
    tn = torch.rand(c, generator=rng) + 0.2 if signed else None
    node = SFNode(tp, tn, lam=0.7, levels=lv, max_spikes=None if lv is not None else 16, offset=0.5, ceiling=ceiling,
                  channel_dim=channel_dim, stateful=False)  # fmt: skip
    x = _input(shape, node, rng)
    fast, ref = _fire_both(node, x)
    assert node.__dict__["_fast_cache"][1] is not None, "the fast path was not taken"
    _assert_bitwise_equal(fast, ref)


@pytest.mark.parametrize("offset", [0.0, 0.5])
@pytest.mark.parametrize("equal_thresholds", [False, True])
def test_fast_fire_signed_tables_and_offsets(offset: float, equal_thresholds: bool, rng: torch.Generator) -> None:
    tp = torch.rand(4, generator=rng) + 0.3
    tn = tp.clone() if equal_thresholds else torch.rand(4, generator=rng) + 0.3
    for lv in (None, F.float_levels(3, 4)):
        node = SFNode(tp, tn, lam=1.3, levels=lv, max_spikes=None if lv is not None else 8, offset=offset, channel_dim=1,
                      stateful=False)  # fmt: skip
        fast, ref = _fire_both(node, _input((2, 4, 5, 5), node, rng))
        _assert_bitwise_equal(fast, ref)


def test_fast_fire_chunks_large_inputs(rng: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs larger than a chunk (rows of many channels, and single channels larger than a chunk)."""
    monkeypatch.setattr(F, "FAST_CHUNK", 64)
    for shape, channel_dim in (((3, 4, 50), 1), ((2, 3, 10), 1), ((300,), None), ((7, 40), -1)):
        c = 1 if channel_dim is None else shape[channel_dim]
        for lv in (None, F.float_levels(2, 8)):
            node = SFNode(torch.rand(c, generator=rng) + 0.2, torch.rand(c, generator=rng) + 0.2, levels=lv,
                          max_spikes=None if lv is not None else 12, offset=0.5, ceiling=3.0, channel_dim=channel_dim,
                          stateful=False)  # fmt: skip
            fast, ref = _fire_both(node, _input(shape, node, rng))
            _assert_bitwise_equal(fast, ref)


def test_level_table_refuses_levels_it_cannot_resolve() -> None:
    """Levels whose edges fall inside a bucket get no table (the reference fires), and the node still agrees."""
    assert F.level_table(F.power_levels(16, 2.0), 0.5, signed=False) is None
    table = F.level_table(F.float_levels(3, 4), 0.5, signed=True)
    assert table is not None and table.values.numel() == 1 << (32 - int(table.shift))
    node = SFNode(torch.tensor(0.3), levels=F.power_levels(16, 2.0), offset=0.5, stateful=False)
    x = torch.linspace(-2, 8, 1001)
    fast, ref = _fire_both(node, x)
    assert node.__dict__["_fast_cache"][1] is None
    _assert_bitwise_equal(fast, ref)


def test_fast_path_follows_buffer_changes_and_is_skipped_when_counts_are_needed(rng: torch.Generator) -> None:
    node = SFNode(torch.tensor(0.5), torch.tensor(0.4), levels=F.float_levels(3, 4), offset=0.5, stateful=False)
    x = torch.randn(2, 100, generator=rng)
    node(x)
    node.set_lambda(0.3)  # in place: the cached plan must be rebuilt
    _assert_bitwise_equal(*_fire_both(node, x))
    node.store_counts = True
    out = node(x)
    assert node.last_counts is not None and node.last_counts.shape == x.shape
    _assert_bitwise_equal(out, _fire_both(node, x)[1])


@pytest.mark.parametrize("levels", ["uniform", "float_m3"])
def test_fast_fire_reads_permuted_views_in_place(levels: str, rng: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-contiguous input (attention's q/k/v are permuted views) fires without a copy, as the reference."""
    monkeypatch.setattr(F, "FAST_CHUNK", 100)
    lv = LEVELS[levels]
    for tn in (None, torch.tensor(0.21), torch.tensor(0.37)):
        node = SFNode(torch.tensor(0.37), tn, levels=lv, max_spikes=None if lv is not None else 16, offset=0.5, stateful=False)
        x = _input((2, 9, 3, 4, 8), node, rng).permute(2, 0, 3, 1, 4)[1]  # [2, 4, 9, 8], strided
        assert not x.is_contiguous()
        fast, ref = _fire_both(node, x)
        _assert_bitwise_equal(fast, ref)


def test_fast_fire_empty_inputs_and_reloaded_thresholds(rng: torch.Generator) -> None:
    node = SFNode(torch.rand(3, generator=rng) + 0.2, levels=F.float_levels(3, 4), offset=0.5, channel_dim=1, stateful=False)
    assert node(torch.randn(0, 3, 4)).shape == (0, 3, 4)
    x = torch.randn(2, 3, 4, generator=rng)
    node(x)
    other = SFNode(torch.rand(3, generator=rng) + 0.2, levels=F.float_levels(3, 4), offset=0.5, channel_dim=1, stateful=False)
    node.load_state_dict(other.state_dict())  # new threshold values: the cached plan must not be reused
    _assert_bitwise_equal(node(x), _fire_both(other, x)[1])


def test_channel_first_thresholds_follow_the_batch_size(fast_path: str):
    """Per-channel thresholds on a channel-first input are repeated per row once per batch size and kept: a change of
    batch size between calls (2, 3, 2, 5) still fires exactly as the reference."""
    import sj_sfn

    g = torch.Generator().manual_seed(0)
    node = SFNode(torch.rand(4, generator=g) + 0.1, torch.rand(4, generator=g) + 0.1, max_spikes=8, offset=0.5,
                  channel_dim=1)
    sj_sfn.set_stateful(node, False)
    with torch.no_grad():
        for batch in (2, 3, 2, 5):
            x = torch.randn(batch, 4, 3, 3, generator=g) * 3
            fast = node(x)
            with reference_fire():
                assert torch.equal(fast, node(x)), batch
    if fast_path == "torch":  # the torch fast path ran, with the last batch size (the kernel reads strided thresholds)
        assert list(node.__dict__["_fast_cache"][1]["repeated"]) == [5]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_splits_any_layout_across_threads(threads: int, fast_path: str, rng: torch.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every thread's share starts and ends mid-row (odd sizes, a tiny share per thread): the result is the reference's."""
    if fast_path != "kernel":
        pytest.skip("the thread split is the C kernel's")
    monkeypatch.setattr(cpu.kernels, "MIN_PER_THREAD", 5)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, channel_dim, permute in (((3, 7, 5, 11), 1, None), ((4, 13, 9), -1, None), ((5, 3, 7, 6), None, (2, 0, 3, 1)),
                                            ((3, 6, 5, 4), 1, (0, 2, 1, 3))):  # fmt: skip
            seen = shape if permute is None else tuple(shape[i] for i in permute)
            c = 1 if channel_dim is None else seen[channel_dim]
            for lv in (None, F.float_levels(3, 4)):
                for ceiling in (None, 2.0):
                    node = SFNode(torch.rand(c, generator=rng) + 0.2, torch.rand(c, generator=rng) + 0.2, lam=0.9, levels=lv,
                                  max_spikes=None if lv is not None else 16, offset=0.5, ceiling=ceiling,
                                  channel_dim=channel_dim, stateful=False)  # fmt: skip
                    x = _input(shape, node, rng)
                    if permute is not None:
                        x = x.permute(*permute)  # a strided view: the kernel reads it in place
                    _assert_bitwise_equal(*_fire_both(node, x))
    finally:
        torch.set_num_threads(old)


def test_kernel_refuses_layouts_it_cannot_walk_and_the_node_falls_back(fast_path: str, rng: torch.Generator,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A view with five dimensions that do not merge is refused with a ValueError; the node then takes the torch fast path."""
    if fast_path != "kernel":
        pytest.skip("the layout check is the C kernel's")
    monkeypatch.undo()  # the torch fast path is the fallback here
    node = SFNode(torch.tensor(0.4), torch.tensor(0.3), levels=F.float_levels(3, 4), offset=0.5, stateful=False)
    x = _input((2, 3, 4, 5, 6, 7), node, rng)[:, :, :, :, :, ::2]  # every dimension strided differently
    x = x.permute(5, 4, 3, 2, 1, 0)
    tp = torch.tensor(0.4)
    with pytest.raises(ValueError, match="more than 4 non-mergeable"):
        cpu.fire(x, tp, None, 32, 0.5)
    _assert_bitwise_equal(*_fire_both(node, x))
    contiguous = x.contiguous()  # the same values as a flat run: the kernel takes it
    _assert_bitwise_equal(cpu.fire(contiguous, tp * node.lam, torch.tensor(0.3) * node.lam, 32, 0.5,
                                   table=F.level_table(node.levels, 0.5, signed=False)), _fire_both(node, x)[1].contiguous())  # fmt: skip
