"""Pure-torch reference of the Multi-Threshold (MTN) and Scale-and-Fire (SFN) neurons.

This module is the truth that every kernel and every converted model is tested against.
All functions are stateless: the membrane potential is passed in and returned.

One step of a multi-threshold neuron with soft reset (charge, fire, reset)::

    h = v + x
    k = clip(floor(h / θ+ + r), 0, N)            for h >= 0   (positive branch)
    k = -clip(floor(-h / θ- + r), 0, N)          for h <  0   (negative branch, signed only)
    o = θ+ · k  (k >= 0)   or   θ- · k  (k < 0)
    v = h - o

``θ±`` are the *scaled* thresholds (``λ·θ`` for an SFN), ``N`` the maximum number of spikes
per sign, ``r ∈ [0, 1)`` a threshold offset (``r = 0.5`` turns floor into round-to-nearest;
it is the same as starting the membrane at ``r·θ``). With non-uniform ``levels``
``y_1 < ... < y_N`` the count is the number of level edges crossed,
``k = #{i : e_i <= h/θ+}`` with ``e_i = y_i - r·(y_i - y_{i-1})`` (``y_0 = 0``; ``r = 0.5`` puts every
edge half-way between two levels: round to the nearest level), and the output is ``θ+ · y_k``.
For ``y_i = i`` the edges are ``i - r``, the evenly spaced rule above.

The membrane and the comparison are computed in float32 (or float64 for float64 inputs);
outputs are cast back to the input dtype. The gradient is straight-through on the neuron's
range: ``∂o/∂x = 1`` for ``-N·θ- <= h <= N·θ+`` and 0 outside. A NaN potential gives a NaN
spike and membrane (with any levels) and an integer count of 0.

The public step functions validate their parameters (``N`` an int >= 1; thresholds, ``λ`` and
the ceiling finite and > 0; ``0 <= r < 1``; ``len(levels) == N``) in eager mode, not while
``torch.compile`` traces. Python numbers are always checked; tensors only when they live on the
CPU, so a forward on a GPU never synchronises the device for a check. The neurons validate their parameters once,
at construction, and call the ``*_unchecked`` functions.
The checks themselves live in :mod:`sj_sfn.checks`.

:func:`fast_fire` is the inference fast path of a stateless node (one step from rest, spike only,
float32 on the CPU): the same arithmetic in cache-sized chunks, with custom levels looked up by the
float bits of ``h/θ`` (:func:`level_table`) instead of searched; it is tested bit for bit against
:func:`multi_threshold_fire`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .checks import check_fire_params, check_levels

__all__ = [
    "FireOutput",
    "StepOutput",
    "SeqOutput",
    "compute_dtype",
    "count_dtype",
    "multi_threshold_fire",
    "mtn_step",
    "mtn_multi_step",
    "mtn_multi_step_unchecked",
    "sfn_step",
    "sfn_multi_step",
    "sfn_multi_step_unchecked",
    "power_levels",
    "float_levels",
    "level_edges",
    "level_terms",
    "check_levels",
    "broadcast_threshold",
    "LevelTable",
    "level_table",
    "fast_fire",
]


class FireOutput(NamedTuple):
    """Result of :func:`multi_threshold_fire`: spike value ``o`` and signed integer count ``k``."""

    spike: torch.Tensor
    count: torch.Tensor


class StepOutput(NamedTuple):
    """Result of one neuron step: spike value, next membrane potential, signed spike count."""

    spike: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor | None


class SeqOutput(NamedTuple):
    """Result of a multi-step run over ``[T, ...]`` inputs."""

    spike_seq: torch.Tensor
    v: torch.Tensor
    count_seq: torch.Tensor | None
    v_seq: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Membrane dtype for inputs of ``dtype``: float32 for 16-bit floats, else unchanged."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not dtype.is_floating_point:
        raise TypeError(f"neuron input must be a floating-point tensor, got dtype {dtype}")
    return dtype


def count_dtype(max_spikes: int) -> torch.dtype:
    """Smallest signed integer dtype that holds counts in ``[-max_spikes, max_spikes]``."""
    if max_spikes <= 127:
        return torch.int8
    if max_spikes <= 32767:
        return torch.int16
    return torch.int32


def power_levels(max_spikes: int, gamma: float = 2.0) -> torch.Tensor:
    """Non-uniform levels denser near zero: ``y_i = N · (i / N)^γ`` for ``i = 1..N``.

    ``γ = 1`` gives the evenly spaced levels ``y_i = i``; ``γ > 1`` packs more thresholds
    near zero while keeping the same full scale ``y_N = N``.
    """
    if not isinstance(max_spikes, int) or max_spikes < 1:
        raise ValueError(f"max_spikes must be an integer >= 1, got {max_spikes!r}")
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
    i = torch.arange(1, max_spikes + 1, dtype=torch.float64)
    return (max_spikes * (i / max_spikes) ** gamma).to(torch.float32)


def float_levels(mantissa_bits: int, octaves: int, subnormal: bool = False) -> torch.Tensor:
    """Floating-point-like levels: ``y = (1 + j/2^m)·2^e`` for ``e = 0..octaves-1``, ``j = 0..2^m-1``.

    ``m = 0`` gives powers of two (``1, 2, 4, ...``): every level is one graded spike, a shift and an
    add in the layer it feeds; with ``m`` mantissa bits a level is the sum of at most ``m + 1`` powers
    of two (:func:`level_terms`). ``2^m · octaves`` levels, the smallest ``1``, the largest
    ``(2 - 2^{-m})·2^{octaves-1}``: constant relative resolution over ``octaves`` octaves.
    ``subnormal=True`` puts the ``2^m - 1`` levels ``j/2^m`` (``j = 1..2^m-1``) below ``1``, as IEEE
    subnormal numbers do: the first octave's spacing continues down to zero, so small values are
    rounded to a multiple of ``2^{-m}`` instead of to zero (``2^m·(octaves + 1) - 1`` levels).
    """
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= 4:
        raise ValueError(f"mantissa_bits must be an integer in [0, 4], got {mantissa_bits!r}")
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ValueError(f"octaves must be an integer >= 1, got {octaves!r}")
    m = 1 << mantissa_bits
    e = torch.arange(octaves, dtype=torch.float64).repeat_interleave(m)
    j = torch.arange(m, dtype=torch.float64).repeat(octaves)
    y = (1 + j / m) * torch.pow(2.0, e)
    if subnormal:
        y = torch.cat([torch.arange(1, m, dtype=torch.float64) / m, y])
    return y.to(torch.float32)


def level_edges(levels: torch.Tensor, offset: float) -> torch.Tensor:
    """Where each level starts: ``e_i = y_i - r·(y_i - y_{i-1})`` (``y_0 = 0``), in float32."""
    y = levels.to(torch.float32)
    gap = torch.diff(y, prepend=y.new_zeros(1))
    return y - gap * float(offset)


def level_terms(levels: torch.Tensor, max_terms: int = 4) -> torch.Tensor:
    """Powers of two whose sum is each level (1 for ``2^e``, 2 for ``1.5·2^e``, ...); 0 where more than ``max_terms``.

    A level of ``t`` terms is ``t`` graded spikes (each a shift and an add in the consumer); 0 marks a
    level that is no short sum of powers of two (it costs a multiply).
    """
    mantissa, _ = torch.frexp(levels.to(torch.float64))
    bits = torch.round(mantissa * 2.0**53).to(torch.int64)  # the 53-bit mantissa as an integer
    terms = torch.zeros_like(bits)
    for _ in range(max_terms + 1):
        nz = bits != 0
        terms = terms + nz.to(torch.int64)
        bits = torch.where(nz, bits & (bits - 1), bits)  # clear the lowest set bit
    return torch.where(terms > max_terms, torch.zeros_like(terms), terms).to(torch.int32)


def broadcast_threshold(theta: torch.Tensor, x: torch.Tensor, channel_dim: int | None, name: str = "threshold") -> torch.Tensor:
    """Shape a scalar or per-channel threshold so that it broadcasts against ``x``.

    ``channel_dim`` indexes the dimensions of ``x`` (negative values count from the end).
    A 0-d threshold is returned as is.
    """
    if theta.dim() == 0:
        return theta
    if theta.dim() != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D per-channel tensor, got shape {tuple(theta.shape)}")
    if channel_dim is None:
        if theta.numel() == 1:
            return theta.reshape(())
        raise ValueError(f"{name} has {theta.numel()} channels but channel_dim is None")
    dim = channel_dim + x.dim() if channel_dim < 0 else channel_dim
    if not 0 <= dim < x.dim():
        raise ValueError(f"channel_dim={channel_dim} is out of range for an input with {x.dim()} dimensions")
    if x.shape[dim] != theta.numel():
        raise ValueError(
            f"{name} has {theta.numel()} channels but the input of shape {tuple(x.shape)} "
            f"has {x.shape[dim]} at channel_dim={channel_dim}"
        )
    shape = [1] * x.dim()
    shape[dim] = theta.numel()
    return theta.reshape(shape)


def _branch_count(u: torch.Tensor, max_spikes: int, levels: torch.Tensor | None) -> torch.Tensor:
    """Number of thresholds crossed by the normalised potential ``u`` (float, in [0, N]).

    Uniform levels: ``clip(floor(u), 0, N)`` (``u`` includes the offset). Custom levels: ``levels``
    are the edges ``e_i`` to compare ``u`` with (:func:`level_edges`, or the levels themselves for a cap).
    """
    if levels is None:
        return torch.clamp(torch.floor(u), 0, max_spikes)
    k = torch.searchsorted(levels.to(u.dtype).contiguous(), u.contiguous(), right=True).to(u.dtype)
    # searchsorted sorts NaN after every level (k = N): keep NaN, as floor/clamp do for uniform levels
    return torch.where(torch.isnan(u), u, k)


def _level_value(k: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """Level multiplier ``y_k`` of a count (``y_k = k`` for evenly spaced levels)."""
    if levels is None:
        return k
    table = torch.cat([levels.new_zeros(1), levels]).to(k.dtype)
    nan = torch.isnan(k)  # a NaN count (NaN potential) has the value NaN
    return torch.where(nan, k, table[torch.where(nan, 0.0, k).long()])


def multi_threshold_fire(
    h: torch.Tensor,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | float | None = None,
    max_spikes: int = 32,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | float | None = None,
) -> FireOutput:
    """Fire a multi-threshold neuron at potential ``h`` (no gradient; see the module doc).

    ``k+ = clip(floor(h/θ+ + r), 0, N)``, ``k- = clip(floor(-h/θ- + r), 0, N)``,
    ``o = θ+·y(k+) - θ-·y(k-)``; the signed count is ``k+ - k-`` (at most one is non-zero
    for ``r < 1``). Custom levels: ``k+ = #{i : e_i <= h/θ+}`` (:func:`level_edges`).
    ``ceiling`` caps the positive output: ``k+ <= max(1, floor(ceiling/θ+))``, or the number of
    levels ``<= ceiling/θ+`` (a ReLU6 or ``clamp(max=c)`` site).
    """
    edges = None if levels is None else level_edges(levels, offset).to(h.device)
    u_pos = h / theta_pos + offset if levels is None else h / theta_pos
    k_pos = _branch_count(u_pos, max_spikes, edges)
    if ceiling is not None:
        cap = torch.clamp(torch.floor(torch.as_tensor(ceiling, dtype=h.dtype, device=h.device) / theta_pos), min=1)
        if levels is not None:
            cap_levels = _branch_count(torch.as_tensor(ceiling, dtype=h.dtype, device=h.device) / theta_pos, max_spikes, levels)
            cap = torch.clamp(cap_levels, min=1)
        k_pos = torch.minimum(k_pos, cap)
    spike = theta_pos * _level_value(k_pos, levels)
    count = k_pos
    if theta_neg is not None:
        u_neg = -h / theta_neg + offset if levels is None else -h / theta_neg
        k_neg = _branch_count(u_neg, max_spikes, edges)
        spike = spike - theta_neg * _level_value(k_neg, levels)
        count = k_pos - k_neg
    return FireOutput(spike, count)


def _straight_through(h: torch.Tensor, spike: torch.Tensor, lo, hi) -> torch.Tensor:
    """``spike`` in the forward pass, identity gradient for ``lo <= h <= hi``, zero outside."""
    if not h.requires_grad:
        return spike
    h_clamped = torch.clamp(h, min=lo, max=hi)
    return h_clamped + (spike - h_clamped).detach()


def _step(
    x: torch.Tensor,
    v: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    max_spikes: int,
    levels: torch.Tensor | None,
    offset: float,
    ceiling,
    detach_reset: bool,
    return_count: bool,
) -> StepOutput:
    h = v + x.to(v.dtype)
    with torch.no_grad():
        spike_hard, count = multi_threshold_fire(h, theta_pos, theta_neg, max_spikes, levels, offset, ceiling)
    top = max_spikes if levels is None else levels[-1].item()
    hi = theta_pos * top
    if ceiling is not None:
        hi = torch.minimum(torch.as_tensor(hi, dtype=h.dtype, device=h.device), torch.as_tensor(ceiling, dtype=h.dtype, device=h.device))
    lo = torch.zeros((), dtype=h.dtype, device=h.device) if theta_neg is None else -theta_neg * top
    spike = _straight_through(h, spike_hard, torch.as_tensor(lo, dtype=h.dtype, device=h.device), torch.as_tensor(hi, dtype=h.dtype, device=h.device))
    v_next = h - (spike.detach() if detach_reset else spike)
    # A NaN potential has a NaN count; as an integer it is 0 (float -> int of NaN is undefined)
    count_out = torch.nan_to_num(count, nan=0.0).to(count_dtype(max_spikes)) if return_count else None
    return StepOutput(spike.to(x.dtype), v_next, count_out)


def _prepare(x: torch.Tensor, v: torch.Tensor | float, *thresholds):
    dtype = compute_dtype(x.dtype)
    if isinstance(v, torch.Tensor):
        v = v.to(device=x.device, dtype=dtype)
    else:
        v = torch.full_like(x, float(v), dtype=dtype)
    out = [
        None if t is None else t.to(device=x.device, dtype=dtype) if isinstance(t, torch.Tensor)
        else torch.tensor(float(t), device=x.device, dtype=dtype)
        for t in thresholds
    ]
    return v, out


def mtn_step(
    x: torch.Tensor,
    v: torch.Tensor | float,
    v_threshold: float | torch.Tensor,
    max_spikes: int,
    detach_reset: bool = False,
    return_count: bool = False,
) -> StepOutput:
    """One MTN step: ``h = v + x``, ``k = clip(floor(h/θ), 0, N)``, ``o = θ·k``, ``v' = h - o``."""
    check_fire_params(max_spikes, v_threshold=v_threshold)
    v, (theta,) = _prepare(x, v, v_threshold)
    return _step(x, v, theta, None, max_spikes, None, 0.0, None, detach_reset, return_count)


def mtn_multi_step(
    x_seq: torch.Tensor,
    v: torch.Tensor | float,
    v_threshold: float | torch.Tensor,
    max_spikes: int,
    detach_reset: bool = False,
    return_count: bool = False,
    store_v_seq: bool = False,
) -> SeqOutput:
    """Run :func:`mtn_step` over the first dimension of ``x_seq`` (``[T, ...]``)."""
    check_fire_params(max_spikes, v_threshold=v_threshold)
    return mtn_multi_step_unchecked(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq)


def mtn_multi_step_unchecked(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq) -> SeqOutput:
    """:func:`mtn_multi_step` without the parameter checks (for callers that validated them)."""
    v, (theta,) = _prepare(x_seq[0], v, v_threshold)
    return _run_seq(x_seq, v, theta, None, max_spikes, None, 0.0, None, detach_reset, return_count, store_v_seq)


def _scaled(theta: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    return theta * lam


def sfn_step(
    x: torch.Tensor,
    v: torch.Tensor | float,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | float | None = None,
    lam: torch.Tensor | float = 1.0,
    max_spikes: int = 32,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | float | None = None,
    detach_reset: bool = False,
    return_count: bool = False,
) -> StepOutput:
    """One SFN step: an MTN with thresholds ``λ·θ+`` (and ``λ·θ-`` when signed).

    ``θ±`` must already broadcast against ``x`` (see :func:`broadcast_threshold`).
    """
    check_fire_params(max_spikes, offset, levels, theta_pos=theta_pos, theta_neg=theta_neg, lam=lam, ceiling=ceiling)
    v, (tp, tn, lam_t, lv) = _prepare(x, v, theta_pos, theta_neg, lam, levels)
    tn = None if tn is None else _scaled(tn, lam_t)
    return _step(x, v, _scaled(tp, lam_t), tn, max_spikes, lv, offset, ceiling, detach_reset, return_count)


def sfn_multi_step(
    x_seq: torch.Tensor,
    v: torch.Tensor | float,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | float | None = None,
    lam: torch.Tensor | float = 1.0,
    max_spikes: int = 32,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | float | None = None,
    detach_reset: bool = False,
    return_count: bool = False,
    store_v_seq: bool = False,
) -> SeqOutput:
    """Run :func:`sfn_step` over the first dimension of ``x_seq`` (``[T, ...]``)."""
    check_fire_params(max_spikes, offset, levels, theta_pos=theta_pos, theta_neg=theta_neg, lam=lam, ceiling=ceiling)
    return sfn_multi_step_unchecked(
        x_seq, v, theta_pos, theta_neg, lam, max_spikes, levels, offset, ceiling, detach_reset, return_count, store_v_seq
    )


def sfn_multi_step_unchecked(
    x_seq, v, theta_pos, theta_neg, lam, max_spikes, levels, offset, ceiling, detach_reset, return_count, store_v_seq
) -> SeqOutput:
    """:func:`sfn_multi_step` without the parameter checks (for callers that validated them)."""
    v, (tp, tn, lam_t, lv) = _prepare(x_seq[0], v, theta_pos, theta_neg, lam, levels)
    tn = None if tn is None else _scaled(tn, lam_t)
    return _run_seq(x_seq, v, _scaled(tp, lam_t), tn, max_spikes, lv, offset, ceiling, detach_reset, return_count, store_v_seq)


def _run_seq(x_seq, v, tp, tn, max_spikes, levels, offset, ceiling, detach_reset, return_count, store_v_seq) -> SeqOutput:
    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(f"multi-step input must have shape [T, ...] with T >= 1, got {tuple(x_seq.shape)}")
    spikes, counts, vs = [], [], []
    for x in x_seq:
        out = _step(x, v, tp, tn, max_spikes, levels, offset, ceiling, detach_reset, return_count)
        v = out.v
        spikes.append(out.spike)
        if return_count:
            counts.append(out.count)
        if store_v_seq:
            vs.append(v)
    return SeqOutput(
        torch.stack(spikes),
        v,
        torch.stack(counts) if return_count else None,
        torch.stack(vs) if store_v_seq else None,
    )


# ---------------------------------------------------------------------------------------
# Fast inference fire: one step from rest, spike value only (no counts, no membrane)
# ---------------------------------------------------------------------------------------
#: elements per chunk and thread of the fast fire: its scratch stays in cache and is reused, so a site allocates only its output
FAST_CHUNK = 1 << 16
_TABLE_SHIFTS = range(22, 15, -1)  # 2^10 .. 2^16 buckets


class LevelTable(NamedTuple):
    """Level multipliers by float32 bit pattern: ``y = values[(bits(u) >> shift) & mask]`` (:func:`level_table`).

    ``shift`` and ``mask`` are 0-d int32 tensors (an in-place shift by a Python int copies its operand).
    """

    values: torch.Tensor
    shift: torch.Tensor
    mask: torch.Tensor


def _bucket_bounds(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest magnitude (float32) of every bucket of the non-negative half."""
    lo = torch.arange(1 << (31 - shift), dtype=torch.int64) << shift
    hi = lo + ((1 << shift) - 1)
    return lo.to(torch.int32).view(torch.float32), hi.to(torch.int32).view(torch.float32)


def level_table(levels: torch.Tensor, offset: float, signed: bool, part: str = "both") -> LevelTable | None:
    """A lookup table that gives the level multiplier of the fire rule from the bits of ``u = h/θ``, or ``None``.

    Every float32 ``u`` falls in the bucket ``b = (bits(u) >> s) & (2^{32-s} - 1)`` (its sign, exponent and
    top ``23 - s`` mantissa bits). The table holds ``y(k(|u|))`` with ``k(u) = #{i : e_i <= u}``
    (:func:`level_edges`), ``+y`` on the non-negative half, ``-y`` on the negative half when ``signed``
    (``0`` otherwise), ``+0`` for ``k = 0`` and NaN on the NaN buckets (a quotient ``h/θ`` is always a quiet
    NaN). ``part`` keeps one half of a signed table (``'pos'``/``'neg'``, the other half 0) for sites whose
    two thresholds differ. The largest ``s`` in ``[16, 22]`` for which no edge falls strictly inside a finite
    bucket is used (then the table is exact: it equals the searchsorted rule bit for bit); ``None`` when
    there is none (the caller keeps the reference).
    """
    edges = level_edges(levels, offset)
    y = torch.cat([levels.new_zeros(1), levels]).to(torch.float32)
    for shift in _TABLE_SHIFTS:
        lo, hi = _bucket_bounds(shift)
        finite = torch.isfinite(hi) | torch.isinf(lo)  # the +inf bucket also holds signalling NaNs: never a quotient
        k_lo = torch.searchsorted(edges, lo, right=True)
        k_hi = torch.searchsorted(edges, hi, right=True)
        if bool((k_lo[finite] != k_hi[finite]).any()):
            continue
        pos = y[k_lo]
        neg = -pos if signed else torch.zeros_like(pos)
        neg = torch.where(k_lo == 0, torch.zeros_like(neg), neg)  # +0 for k = 0, as the reference's θ·0
        if part == "pos":
            neg = torch.zeros_like(neg)
        elif part == "neg":
            pos = torch.zeros_like(pos)
        values = torch.cat([pos, neg])
        nan = torch.cat([~finite, ~finite])
        values[nan] = float("nan")
        i32 = torch.int32
        return LevelTable(values.contiguous(), torch.tensor(shift, dtype=i32), torch.tensor((1 << (32 - shift)) - 1, dtype=i32))
    return None


def _lookup(u: torch.Tensor, table: LevelTable, out: torch.Tensor) -> torch.Tensor:
    """``out = table.values[bucket(u)]`` (``u`` float32, contiguous, overwritten by its bucket index)."""
    idx = u.view(torch.int32)
    idx.bitwise_right_shift_(table.shift).bitwise_and_(table.mask)
    return torch.index_select(table.values, 0, idx.view(-1), out=out.view(-1))


def fast_fire(
    h: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    max_spikes: int,
    offset: float,
    cap: torch.Tensor | None = None,
    table: LevelTable | None = None,
    table_neg: LevelTable | None = None,
) -> torch.Tensor:
    """The spike of :func:`multi_threshold_fire` (one step from rest, no gradient), in cache-sized chunks.

    ``h`` is a float32 tensor: with 0-d thresholds of any layout (read in chunks along its first dimension,
    or flat when 1-D), else a contiguous ``[R, L]`` with thresholds (``θ±`` *scaled*, and ``cap``) of shape
    ``[1, L]`` or ``[R, 1]``. The output is contiguous and the only allocation; every
    intermediate lives in reused scratch chunks. Per chunk, bit for bit the reference's result:

    * evenly spaced levels (``table is None``): ``o = θ+·min(clip(floor(h/θ+ + r), 0, N), cap)``, signed
      ``o -= θ-·clip(floor(-(h/θ-) + r), 0, N)`` (``cap`` the count cap);
    * custom levels: ``o = θ+·min(T[h/θ+], cap)`` with the table of :func:`level_table` (``theta_neg`` None:
      an unsigned table or a signed one for ``θ- = θ+``); ``table_neg`` given: ``o += θ-·T-[h/θ-]``;
    * signed without a cap (and no ``table_neg``): one branch per element, ``s = θ+`` where ``h >= 0``
      and ``-θ-`` elsewhere, ``o = s·f(h/s) + 0`` with ``f`` the count (or, with a table, the level of
      the unsigned table): ``h/(-θ-) = -h/θ-`` exactly, the other branch's term is 0, and ``+ 0`` turns
      the ``-0`` of ``0·(-θ-)`` into the reference's ``+0``.
    """
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    chunk = FAST_CHUNK * torch.get_num_threads()  # every thread gets a chunk's worth per op (fewer parallel regions)
    if h.dim() == 1:
        step, row_thresholds = chunk, False
    else:
        row = math.prod(h.shape[1:])
        step, row_thresholds = max(1, chunk // max(row, 1)), theta_pos.dim() == 2 and theta_pos.shape[0] > 1
    n_max = min(h.numel(), step * (math.prod(h.shape[1:]) if h.dim() > 1 else 1))
    select = theta_neg is not None and table_neg is None and (table is not None or cap is None)
    # scratch only where a mode needs it: u the quotient to look up, w the second branch or the
    # per-element threshold, ge the sign mask
    u = torch.empty(n_max, dtype=h.dtype, device=h.device) if table is not None else None
    w = None if theta_neg is None else torch.empty(n_max, dtype=h.dtype, device=h.device)
    ge = torch.empty(n_max, dtype=torch.bool, device=h.device) if select else None
    r = torch.tensor(offset, dtype=h.dtype)
    neg = None if theta_neg is None else -theta_neg
    tp, tn, ntn, cp = theta_pos, theta_neg, neg, cap
    for i in range(0, h.shape[0], step):
        hc, o = h[i:i + step], out[i:i + step]
        if row_thresholds:
            tp = theta_pos[i:i + step]
            tn = None if theta_neg is None else theta_neg[i:i + step]
            ntn = None if neg is None else neg[i:i + step]
            cp = None if cap is None else cap[i:i + step]
        n = hc.numel()
        if select:  # s = θ+ where h >= 0, -θ- elsewhere
            s = w[:n].view(hc.shape)
            torch.where(torch.ge(hc, 0, out=ge[:n].view(hc.shape)), tp, ntn, out=s)
            if table is None:
                torch.div(hc, s, out=o)
                o.add_(r).floor_().clamp_(0, max_spikes)
            else:
                uc = u[:n].view(hc.shape)
                torch.div(hc, s, out=uc)
                _lookup(uc, table, o)
            o.mul_(s).add_(0.0)
            continue
        if table is None:
            torch.div(hc, tp, out=o)
            o.add_(r).floor_().clamp_(0, max_spikes)
            if cp is not None:
                torch.minimum(o, cp, out=o)
            if tn is not None:
                wc = w[:n].view(hc.shape)
                torch.div(hc, tn, out=wc)
                wc.neg_().add_(r).floor_().clamp_(0, max_spikes)
                o.mul_(tp).sub_(wc.mul_(tn))
            else:
                o.mul_(tp)
            continue
        uc = u[:n].view(hc.shape)
        torch.div(hc, tp, out=uc)
        _lookup(uc, table, o)
        if cp is not None:
            torch.minimum(o, cp, out=o)
        o.mul_(tp)
        if table_neg is not None:
            torch.div(hc, tn, out=uc)
            wc = w[:n].view(hc.shape)
            _lookup(uc, table_neg, wc)
            o.add_(wc.mul_(tn))
    return out
