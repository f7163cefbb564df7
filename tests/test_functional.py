"""The torch reference against hand-written formulas (docs/method.md: MTN and SFN)."""

from __future__ import annotations

import pytest
import torch

from sj_sfn import functional as F
from sj_sfn.checks import check_fire_params


def _signed_mtn(h: torch.Tensor, tp: torch.Tensor, tn: torch.Tensor, n: int) -> torch.Tensor:
    """The SFN of docs/method.md written out independently: o = +λθ+·clip(floor(h/λθ+),0,N) (h>=0), -λθ-·clip(floor(-h/λθ-),0,N) (h<0)."""
    pos = tp * torch.clamp(torch.floor(h / tp), 0, n)
    neg = -tn * torch.clamp(torch.floor(-h / tn), 0, n)
    return torch.where(h >= 0, pos, neg)


def _draw(rng: torch.Generator, shape=(7, 33), scale: float = 3.0) -> torch.Tensor:
    return (torch.rand(shape, generator=rng) * 2 - 1) * scale


def test_sfn_even_levels_equal_signed_mtn(rng: torch.Generator) -> None:
    for _ in range(20):
        x = _draw(rng)
        theta_p, theta_n = 0.1 + torch.rand(2, generator=rng)
        lam = float(0.05 + torch.rand((), generator=rng))
        n = int(torch.randint(1, 40, (), generator=rng))
        out = F.sfn_step(x, 0.0, theta_p, theta_n, lam, n, return_count=True)
        tp, tn = (theta_p * lam).float(), (theta_n * lam).float()
        torch.testing.assert_close(out.spike, _signed_mtn(x, tp, tn, n), rtol=0, atol=0)
        assert out.count.abs().max() <= n


def test_positive_only_sfn_equals_mtn_with_scaled_threshold(rng: torch.Generator) -> None:
    x = _draw(rng, (64, 17))
    theta, lam, n = 0.37, 0.21, 12
    sfn = F.sfn_step(x, 0.0, theta, None, lam, n)
    mtn = F.mtn_step(x, 0.0, torch.tensor(theta) * torch.tensor(lam), n)
    torch.testing.assert_close(sfn.spike, mtn.spike, rtol=0, atol=0)
    assert (sfn.spike >= 0).all()


def test_outputs_are_exact_multiples_and_counts_bounded(rng: torch.Generator) -> None:
    x = _draw(rng, (5, 8, 9), scale=10.0)
    tp = torch.tensor(0.3)
    tn = torch.tensor(0.7)
    n = 5
    out = F.sfn_step(x, 0.0, tp, tn, 0.5, n, return_count=True)
    step_p, step_n = tp * 0.5, tn * 0.5
    expected = torch.where(out.count >= 0, out.count.float() * step_p, out.count.float() * step_n)
    torch.testing.assert_close(out.spike, expected, rtol=0, atol=0)
    assert out.count.dtype == torch.int8
    assert out.count.abs().max().item() <= n
    assert out.count.max().item() == n and out.count.min().item() == -n  # the inputs saturate both branches


def test_soft_reset_keeps_residual(rng: torch.Generator) -> None:
    x = _draw(rng)
    out = F.sfn_step(x, 0.0, 0.2, 0.3, 1.0, 4)
    torch.testing.assert_close(out.v, x - out.spike)


def test_per_channel_thresholds_match_per_tensor_slices(rng: torch.Generator) -> None:
    x = _draw(rng, (4, 6, 5, 5))
    tp = 0.1 + torch.rand(6, generator=rng)
    tn = 0.1 + torch.rand(6, generator=rng)
    tpb = F.broadcast_threshold(tp, x, 1)
    tnb = F.broadcast_threshold(tn, x, 1)
    out = F.sfn_step(x, 0.0, tpb, tnb, 0.3, 8).spike
    for c in range(6):
        ref = F.sfn_step(x[:, c], 0.0, tp[c], tn[c], 0.3, 8).spike
        torch.testing.assert_close(out[:, c], ref, rtol=0, atol=0)


def test_broadcast_threshold_errors() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="3 channels|has 5 channels"):
        F.broadcast_threshold(torch.ones(5), x, 1)
    with pytest.raises(ValueError, match="out of range"):
        F.broadcast_threshold(torch.ones(3), x, 5)
    with pytest.raises(ValueError, match="channel_dim is None"):
        F.broadcast_threshold(torch.ones(3), x, None)


def test_power_levels_gamma_one_is_uniform(rng: torch.Generator) -> None:
    x = _draw(rng, (50, 20))
    levels = F.power_levels(16, 1.0)
    torch.testing.assert_close(levels, torch.arange(1, 17, dtype=torch.float32))
    a = F.sfn_step(x, 0.0, 0.2, 0.2, 0.5, 16, levels=levels).spike
    b = F.sfn_step(x, 0.0, 0.2, 0.2, 0.5, 16).spike
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_levels_snap_down_to_a_level(rng: torch.Generator) -> None:
    x = torch.rand(2000, generator=rng) * 40
    levels = F.power_levels(8, 2.0)  # denser near zero, full scale 8
    theta = 1.0
    out = F.sfn_step(x, 0.0, theta, None, 1.0, 8, levels=levels, return_count=True)
    table = torch.cat([torch.zeros(1), levels])
    torch.testing.assert_close(out.spike, table[out.count.long()], rtol=0, atol=0)
    # the chosen level is the largest one <= x
    assert (out.spike <= x + 1e-6).all()
    nxt = table[(out.count.long() + 1).clamp(max=8)]
    assert ((x < nxt) | (out.count == 8)).all()
    # monotone in the input
    xs, order = torch.sort(x)
    assert (out.spike[order][1:] >= out.spike[order][:-1]).all()


def test_half_threshold_offset_rounds(rng: torch.Generator) -> None:
    x = (torch.rand(5000, generator=rng) * 2 - 1) * 3
    t = 0.25
    out = F.sfn_step(x, 0.0, t, t, 1.0, 100, offset=0.5).spike
    expected = torch.round(x / t) * t  # ties have probability ~0 with random floats
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_ceiling_caps_the_output(rng: torch.Generator) -> None:
    x = torch.rand(3000, generator=rng) * 10
    out = F.sfn_step(x, 0.0, 0.5, None, 1.0, 32, ceiling=6.0).spike
    assert out.max().item() <= 6.0
    below = x < 5.5
    torch.testing.assert_close(out[below], torch.floor(x[below] / 0.5) * 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_fp32_membrane(dtype: torch.dtype, rng: torch.Generator) -> None:
    x = _draw(rng).to(dtype)
    out = F.sfn_step(x, 0.0, 0.1, 0.2, 0.5, 16, return_count=True)
    ref = F.sfn_step(x.float(), 0.0, 0.1, 0.2, 0.5, 16, return_count=True)
    assert out.spike.dtype == dtype and out.v.dtype == torch.float32
    assert torch.equal(out.count, ref.count)
    torch.testing.assert_close(out.spike, ref.spike.to(dtype), rtol=0, atol=0)


def test_multi_step_equals_loop(rng: torch.Generator) -> None:
    x_seq = _draw(rng, (6, 4, 9))
    seq = F.sfn_multi_step(x_seq, 0.0, 0.3, 0.4, 0.5, 4, return_count=True, store_v_seq=True)
    v = torch.zeros(4, 9)
    for t in range(6):
        step = F.sfn_step(x_seq[t], v, 0.3, 0.4, 0.5, 4, return_count=True)
        v = step.v
        torch.testing.assert_close(seq.spike_seq[t], step.spike, rtol=0, atol=0)
        torch.testing.assert_close(seq.v_seq[t], v, rtol=0, atol=0)
        assert torch.equal(seq.count_seq[t], step.count)
    torch.testing.assert_close(seq.v, v)


def test_straight_through_gradient_mask(rng: torch.Generator) -> None:
    x = _draw(rng, (200,), scale=5.0).requires_grad_(True)
    tp, tn, lam, n = 0.3, 0.2, 0.5, 8
    out = F.sfn_step(x, 0.0, tp, tn, lam, n).spike
    g = torch.randn(200, generator=rng)
    (out * g).sum().backward()
    inside = (x.detach() >= -n * tn * lam) & (x.detach() <= n * tp * lam)
    torch.testing.assert_close(x.grad, torch.where(inside, g, torch.zeros_like(g)))


def test_non_float_input_is_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        F.mtn_step(torch.ones(3, dtype=torch.long), 0.0, 1.0, 4)


def test_level_validation() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        F.check_levels(torch.tensor([1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="positive"):
        F.check_levels(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="max_spikes"):
        F.power_levels(0)


def _with_specials(rng: torch.Generator, shape) -> torch.Tensor:
    """Random inputs with NaN, +Inf and -Inf at random places (each about 7% of the entries)."""
    x = _draw(rng, shape)
    pick = torch.rand(shape, generator=rng)
    x = torch.where(pick < 0.07, float("nan"), x)
    x = torch.where((pick >= 0.07) & (pick < 0.14), float("inf"), x)
    return torch.where((pick >= 0.14) & (pick < 0.21), float("-inf"), x)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("ceiling", [None, 2.5])
def test_nan_propagates_with_custom_levels_as_with_uniform_levels(signed: bool, ceiling, rng: torch.Generator) -> None:
    """A NaN potential gives a NaN spike and membrane (count 0) with custom levels too.

    searchsorted sorts NaN after every level, so a NaN used to count as crossing all N levels
    (full scale on a positive-only site, 0 on a signed one). ±Inf saturate at ±θ·y_N.
    """
    n = int(torch.randint(2, 20, (), generator=rng))
    x = _with_specials(rng, (4, 6, 11))
    tn = 0.3 if signed else None
    for levels in (F.power_levels(n, 1.0), F.power_levels(n, 2.0)):
        custom = F.sfn_multi_step(x, 0.0, 0.2, tn, 0.5, n, levels, 0.0, ceiling, return_count=True, store_v_seq=True)
        uniform = F.sfn_multi_step(x, 0.0, 0.2, tn, 0.5, n, None, 0.0, ceiling, return_count=True, store_v_seq=True)
        nan = uniform.v_seq.isnan()
        assert nan.any() and (~nan).any()
        for a, b in ((custom.spike_seq, uniform.spike_seq), (custom.v_seq, uniform.v_seq), (custom.v, uniform.v)):
            assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(custom.spike_seq.isnan(), nan)
        assert (custom.count_seq[nan] == 0).all() and (uniform.count_seq[nan] == 0).all()
        if torch.equal(levels, torch.arange(1.0, n + 1)):  # evenly spaced levels: the same numbers
            torch.testing.assert_close(custom.spike_seq, uniform.spike_seq, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(custom.v_seq, uniform.v_seq, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(custom.count_seq, uniform.count_seq)
    # one step, the repro: NaN in, NaN out; +Inf saturates at the full scale λθ·y_N
    lv = F.power_levels(4)
    out = F.sfn_step(torch.tensor([float("nan"), 0.5, 2.0, float("inf")]), 0.0, 1.0, 1.0 if signed else None, 1.0, 4, lv)
    torch.testing.assert_close(out.spike, torch.tensor([float("nan"), 0.25, 1.0, 4.0]), rtol=0, atol=0, equal_nan=True)
    assert out.v[0].isnan()


def _expected_error(max_spikes) -> type[Exception]:
    """A non-integer N is a TypeError (as the nodes raise), every other bad parameter a ValueError."""
    return TypeError if isinstance(max_spikes, (bool, float)) else ValueError


BAD_PARAMETERS = [
    (dict(lam=0.0), "lam"),
    (dict(lam=-0.5), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(lam=torch.tensor(-0.5)), "lam"),
    (dict(max_spikes=0), "max_spikes"),
    (dict(max_spikes=-3), "max_spikes"),
    (dict(max_spikes=2.5), "max_spikes"),
    (dict(max_spikes=True), "max_spikes"),
    (dict(theta_pos=0.0), "theta_pos"),
    (dict(theta_pos=-1.0), "theta_pos"),
    (dict(theta_pos=float("inf")), "theta_pos"),
    (dict(theta_pos=torch.tensor([0.5, 0.0, 0.5])), "theta_pos"),
    (dict(theta_neg=-0.2), "theta_neg"),
    (dict(theta_neg=torch.tensor(float("nan"))), "theta_neg"),
    (dict(ceiling=0.0), "ceiling"),
    (dict(offset=1.0), "offset"),
    (dict(offset=-0.1), "offset"),
    (dict(levels=F.power_levels(3)), "levels"),  # max_spikes=4
    (dict(levels=torch.tensor([1.0, 3.0, 2.0, 4.0])), "strictly increasing"),
]


@pytest.mark.parametrize("bad,match", BAD_PARAMETERS)
@pytest.mark.parametrize("multi", [False, True])
def test_sfn_entry_points_reject_bad_parameters(bad: dict, match: str, multi: bool, rng: torch.Generator) -> None:
    x = _draw(rng, (2, 3, 5))
    kw = dict(theta_pos=torch.full((3,), 0.5), theta_neg=0.4, lam=0.5, max_spikes=4, levels=None, offset=0.0, ceiling=None)
    kw.update(bad)
    tp = kw.pop("theta_pos")
    tp = F.broadcast_threshold(tp, x[0], 0) if isinstance(tp, torch.Tensor) and tp.dim() == 1 else tp
    with pytest.raises(_expected_error(kw["max_spikes"]), match=match):
        (F.sfn_multi_step if multi else F.sfn_step)(x if multi else x[0], 0.0, tp, **kw)


@pytest.mark.parametrize(
    "threshold,max_spikes,match",
    [(0.0, 4, "v_threshold"), (-0.3, 4, "v_threshold"), (float("nan"), 4, "v_threshold"),
     (torch.tensor(-1.0), 4, "v_threshold"), (0.3, 0, "max_spikes"), (0.3, 1.0, "max_spikes")],
)  # fmt: skip
@pytest.mark.parametrize("multi", [False, True])
def test_mtn_entry_points_reject_bad_parameters(threshold, max_spikes, match: str, multi: bool, rng: torch.Generator) -> None:
    x = _draw(rng, (2, 3, 5))
    with pytest.raises(_expected_error(max_spikes), match=match):
        (F.mtn_multi_step if multi else F.mtn_step)(x if multi else x[0], 0.0, threshold, max_spikes)


def test_good_parameters_pass_and_only_cpu_tensors_are_checked(rng: torch.Generator) -> None:
    """Valid numbers and tensors pass; a tensor off the CPU is not inspected (no device sync)."""
    x = _draw(rng, (2, 3, 5))
    F.sfn_multi_step(x, 0.0, torch.tensor(0.5), torch.tensor(0.2), torch.tensor(0.5), 4, F.power_levels(4), 0.5, 1.0)
    F.mtn_multi_step(x, 0.0, torch.tensor(0.3), 1)
    check_fire_params(4, lam=torch.tensor(-1.0, device="meta"), theta_pos=torch.zeros(3, device="meta"))
