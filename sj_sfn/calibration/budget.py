r"""Energy-budget threshold allocation: every SFN site's step chosen to minimise the output error.

A fixed ``p``-quantile times one global ``λ`` gives every site the same *relative* resolution,
whatever the site costs and however much its error matters. On real pretrained networks that
is neither faithful nor cheap: a depthwise convolution's input is cheap to spike finely (fan-out
9) and a 1×1 expansion's is not (fan-out in the hundreds); one layer's error is amplified to the
logits, another's is not. This module chooses the step ``Δ_s`` (the first threshold ``λθ`` of
site ``s``; per channel where that pays) by a rate–distortion allocation on calibration data:

.. math::

    \min_{\{\Delta_s\}} \sum_s \sum_c n_c\,S_{s,c}\,\mathrm{MSE}_{s,c}(\Delta_s)
    \quad\text{s.t.}\quad E_\text{analog} + e_{AC}\sum_s f_s \sum_c n_c\,\bar k_{s,c}(\Delta_s)
    \le \beta\,E_\text{ANN}

- ``MSE_{s,c}(Δ)``: the mean squared difference between the SFN output at step ``Δ`` (the site's
  own fire rule: offset, ``N`` levels, ceiling) and the ANN activation it replaces, over the
  calibration activations of channel ``c``; ``k̄_{s,c}(Δ)`` the mean spike count;
  ``n_c`` the elements of channel ``c`` per sample;
- ``S_{s,c} = E[(J_s^\top v)^2]``: how much unit noise at the site moves the network output,
  relative to the output's norm (Hutchinson estimate with Rademacher ``v / ‖z‖`` per sample, one
  backward pass per probe gives every site at once), so the objective predicts
  ``Σ_i ‖z_snn,i − z_ann,i‖² / ‖z_ann,i‖²`` to first order;
- ``f_s``: the fan-out of the site's consumers (ACs per unit spike); ``e_AC = 0.9`` pJ,
  ``E_ANN`` = 4.6 pJ per MAC of every weight layer, ``E_analog`` = the MACs of the weight layers
  whose input stays analog (the image into the first layer).

The Lagrangian ``Σ D_s(Δ) + μ C_s(Δ)`` separates per site (per channel), so each site picks its
step from a grid, and ``μ`` is bisected until the predicted energy meets the budget ``β``. A site
is given per-channel steps when that lowers its Lagrangian by more than ``per_channel_gain``
(channels whose scales differ by orders of magnitude). The chosen step becomes the site's
threshold ``θ`` with ``λ = 1``: "1 = as calibrated", and ``set_lambda`` still rescales every
site at once.

Each site also chooses its level set (``level_sets``): evenly spaced levels cost ``k`` unit spikes,
float levels ``Δ·(1 + j/2^m)·2^e`` one graded spike per power of two (:func:`level_set`); the
tables hold every (level set, step) pair and the Lagrangian picks among all of them. Sites
converted with custom levels keep those levels; only their step is chosen. One more pass
(``correlation_passes``) corrects each site's error table for rounding errors that are
correlated between elements (:func:`_correlation_factors`) before the final allocation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..functional import float_levels, level_edges, level_terms, multi_threshold_fire
from ..neuron import SFNode
from ..utils import batches_total, call_model, model_device, output_tensors
from .observers import CalibrationError

__all__ = ["allocate_thresholds", "check_budget", "quantization_table", "level_set", "LEVEL_SETS", "DEFAULT_LEVEL_SETS", "Allocation", "SiteAllocation",
           "E_AC_PJ", "E_MAC_PJ"]

#: Energy per accumulate and per multiply-accumulate, 45 nm (Horowitz, ISSCC 2014), pJ.
E_AC_PJ, E_MAC_PJ = 0.9, 4.6

_PASSTHROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
                nn.Dropout, nn.Identity, nn.Unflatten)
# product operands inside attention: (partner site kind, dimension of the partner counted per element)
_PRODUCT_PARTNER = {"q": "k", "k": "q", "v": "attn", "attn": "v"}


@dataclass
class SiteAllocation:
    """The step chosen for one site and what it is predicted to cost and contribute."""

    name: str
    kind: str
    signed: bool
    per_channel: bool
    step: float  # the mean step over channels for per-channel sites
    levels: str  # the level set chosen: a name of LEVEL_SETS, or 'custom'
    fanout: float
    mean_count: float  # spikes per element
    error: float  # predicted contribution to the mean squared relative output error
    correlation: float  # ρ: measured effect of the site's rounding error over the uncorrelated prediction
    energy_share: float  # of the ANN's energy


@dataclass
class Allocation:
    """Result of :func:`allocate_thresholds`."""

    energy_budget: float
    predicted_ratio: float
    predicted_rel_error: float
    analog_share: float
    sites: list[SiteAllocation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_layer_types() -> tuple[type, ...]:
    """Module types whose input is a weight layer's input (a site's consumer)."""
    types: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except Exception:  # transformers is optional
        pass
    return tuple(types)


@torch.no_grad()
def _fanout(m: nn.Module, x: torch.Tensor) -> float:
    """Output elements an input element reaches, averaged over the input (ACs per unit spike).

    For a convolution: the (output position, kernel tap) pairs that land on the input, borders,
    strides and dilation included (a convolution of ones), times ``C_out / groups``, per input position.
    """
    if isinstance(m, nn.Linear):
        return float(m.out_features)
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        d = len(m.kernel_size)
        spatial = tuple(x.shape[-d:])
        if isinstance(m.padding, str) or getattr(m, "padding_mode", "zeros") != "zeros":
            taps = math.prod(m.kernel_size) / math.prod(m.stride)  # interior estimate
        else:
            conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[d - 1]
            ones = torch.ones((1, 1, *spatial))
            hits = conv(ones, torch.ones((1, 1, *m.kernel_size)), stride=m.stride, padding=m.padding, dilation=m.dilation)
            taps = hits.sum().item() / math.prod(spatial)
        return m.out_channels / m.groups * taps
    return float(m.weight.shape[1])  # transformers Conv1D: weight [in, out]


def _macs(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """Multiply-accumulates of one call, per sample (dim 0 is the batch)."""
    b = max(1, x.shape[0])
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return out.numel() / b * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return out.numel() / b * x.shape[-1]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _outlier_aware_sample(rows: torch.Tensor, keep: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` of the ``m`` entries of each row, with weights that keep every row sum unbiased.

    The ``t = keep/8`` entries of largest magnitude in each row are kept exactly (weight 1): the
    rare outliers (a few tokens in a few channels of a LayerNorm output) decide what a step
    clips, and a uniform sample misses them. The other ``keep − t`` are drawn uniformly with
    replacement, weight ``(m − t)/(keep − t)`` scaled to the non-outliers they stand for (0 when a
    draw hits an outlier, already counted): ``E[Σ_j w_j f(x_j)] = Σ_i f(x_i)``.
    """
    c, m = rows.shape
    top = max(1, keep // 8)
    g = torch.Generator(device=rows.device).manual_seed(seed)
    top_idx = rows.abs().topk(top, dim=1).indices  # [C, t]
    draws = keep - top
    rnd_idx = torch.randint(0, m, (draws,), generator=g, device=rows.device).expand(c, draws)
    is_top = torch.zeros(c, m, dtype=torch.bool, device=rows.device)
    is_top.scatter_(1, top_idx, True)
    w_rnd = (~is_top.gather(1, rnd_idx)).float() * (m / draws)
    idx = torch.cat([top_idx, rnd_idx], 1)
    weights = torch.cat([torch.ones(c, top, device=rows.device), w_rnd], 1)
    return rows.gather(1, idx), weights


class _Probe(nn.Module):
    """Stands in for an SFN site during allocation: computes the ANN activation, records its input.

    In the sensitivity pass a zero leaf is added to the output, so its ``.grad`` is the
    vector-Jacobian product of the network output with respect to this site's activation.
    """

    def __init__(self, node: SFNode, name: str, per_batch: int):
        super().__init__()
        self.node, self.name, self.per_batch = node, name, per_batch
        self.rows: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []  # per row entry: how many activations it stands for (see _record)
        self.sens_sum: torch.Tensor | None = None
        self.sens_n = 0
        self.numel_per_sample = 0.0
        self.cdim: int | None = None
        self.shape: tuple[int, ...] = ()
        self.out: torch.Tensor | None = None
        self.record = True
        self.grad_mode = False
        self.initial_levels = node.levels is not None  # custom levels given before allocation
        self.n_uniform = int(node.max_spikes)
        # correlation pass: the chosen quantiser (step per channel, levels), its error and the sums of (g·e)² and g²e²
        self.quant: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.err: torch.Tensor | None = None
        self.dot2, self.diag = 0.0, 0.0
        self.cdim_confirmed = False
        self.pending: torch.Tensor | None = None  # this batch's input until a consumer confirms the channel dimension
        self.shared = False  # one site module called on tensors of different shapes (a reused activation): per tensor
        self.batch_numel = 0.0  # elements per sample over this batch's calls

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.node.signed:
            return x
        y = x.clamp_min(0)
        return y if self.node.ceiling is None else y.clamp_max(float(self.node.ceiling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(x)
        if self.record:
            self._record(x.detach())
        if self.quant is not None:
            self.err = self._quantize(x.detach()) - y.detach()
        if self.grad_mode:  # y + 0 with a leaf 0: its gradient is ∂out/∂y through everything downstream
            self.out = torch.zeros_like(y, requires_grad=True)
            y = y + self.out
        return y

    def confirm_channel_dim(self, cdim: int) -> None:
        """The channel dimension as the consuming layer reads it (a Linear: the last; a convolution: 1).

        The guess from the site's kind is only that; on the first batch the consumer's type decides,
        and the rows of that batch are recorded again along the right dimension.
        """
        if self.cdim_confirmed or self.shared:
            return
        self.cdim_confirmed = True
        if cdim != self.cdim and self.pending is not None and self.rows:
            self.rows.pop()
            self.weights.pop()
            self.cdim = cdim
            self._record(self.pending)
        self.pending = None

    @torch.no_grad()
    def _record(self, x: torch.Tensor) -> None:
        if self.cdim is None:
            self.cdim = _site_channel_dim(x, self.node.kind)
            self.shape = tuple(x.shape)
        if not self.cdim_confirmed:
            self.pending = x
        if not self.shared and self.rows and (x.dim() != len(self.shape) or x.shape[self.cdim] != self.rows[0].shape[0]):
            self.shared = True  # channels differ between calls: one row, per-tensor steps only
            self.rows = [r.reshape(1, -1) for r in self.rows]
            self.weights = [w.reshape(1, -1) for w in self.weights]
            if self.sens_sum is not None:
                self.sens_sum = self.sens_sum.mean().reshape(1)
        c = 1 if self.shared else x.shape[self.cdim]
        rows = x.reshape(1, -1).float() if self.shared else x.movedim(self.cdim, 0).reshape(c, -1).float()
        self.batch_numel += x.numel() / max(1, x.shape[0])
        self.numel_per_sample = self.batch_numel
        m, keep = rows.shape[1], max(16, self.per_batch // c)
        if m > keep:
            rows, weights = _outlier_aware_sample(rows, keep, seed=len(self.rows) * 7919 + 17)
        else:
            weights = torch.ones_like(rows)
        self.rows.append(rows.cpu())
        self.weights.append(weights.cpu())

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every recorded batch: ``x`` ``[C, M]`` and its weights, normalised per channel (each row sums to 1)."""
        x, w = torch.cat(self.rows, dim=1), torch.cat(self.weights, dim=1)
        return x, w / w.sum(1, keepdim=True).clamp_min(1e-30)

    @torch.no_grad()
    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The SFN output of ``x`` under the quantiser in :attr:`quant` (the node's own fire rule)."""
        step, levels = self.quant
        shape = [1] * x.dim()
        shape[self.cdim] = -1
        theta = step.to(x).reshape(shape) if step.numel() > 1 else step.to(x).reshape(())
        node = self.node
        n = self.n_uniform if levels is None else levels.numel()
        ceiling = None if node.ceiling is None else float(node.ceiling)
        lv = None if levels is None else levels.to(x.device)
        return multi_threshold_fire(x.float(), theta, theta if node.signed else None, n, lv, float(node.offset), ceiling).spike

    def add_correlation(self) -> None:
        """Accumulate ``Σ_b (g_b·e_b)²`` and ``Σ_b Σ_i g_{b,i}² e_{b,i}²`` (``g = J^T v``, ``e`` the quantisation error)."""
        g = self.out.grad if self.out is not None else None
        if g is None or self.err is None:
            return
        b = g.shape[0]
        g, e = g.detach().double().reshape(b, -1), self.err.double().reshape(b, -1)
        self.dot2 += (g * e).sum(1).pow(2).sum().item()
        self.diag += (g * g * e * e).sum().item()

    def add_sensitivity(self) -> None:
        g = self.out.grad if self.out is not None else None
        if g is None:
            return
        if self.shared:
            s = g.detach().double().pow(2).mean().reshape(1).cpu()
        else:
            c = g.shape[self.cdim]
            s = g.detach().movedim(self.cdim, 0).reshape(c, -1).double().pow(2).mean(1).cpu()
        self.sens_sum = s if self.sens_sum is None else self.sens_sum + s
        self.sens_n += 1


_TOKEN_KINDS = ("qkv_in", "proj_in", "fc1_in", "fc2_in", "head_in", "q", "k", "v", "attn")


def _site_channel_dim(x: torch.Tensor, kind: str) -> int:
    """The channel dimension of a site's input: 1 for conv feature maps, the last for tokens and vectors."""
    if kind == "attn":  # [B, H, L, S] attention probabilities: the heads (L and S vary with the input)
        return 1 if x.dim() == 4 else x.dim() - 1
    if x.dim() >= 4 and kind not in _TOKEN_KINDS or x.dim() == 3 and not (kind in _TOKEN_KINDS or kind.endswith("_in")):
        return 1
    return x.dim() - 1


def quantization_table(
    x: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    node: SFNode,
    mean_error: bool = False,
    levels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel and step: mean squared error to ``target`` and mean cost of the site's fire rule.

    With ``weights`` (``[C, M]``, each row summing to 1) the means are weighted: ``Σ_j w_j·f(x_j)``.

    ``x``: ``[C, M]`` site inputs; ``steps``: ``[G]`` (or ``[G, C, 1]``, per channel); returns two ``[G, C]``
    tensors (with ``mean_error=True`` the first is the signed mean error instead of the squared one).
    Evenly spaced levels (``levels=None``): ``k = clip(⌊x/Δ + r⌋, 0, N)`` (capped at ``max(1, ⌊c/Δ⌋)``
    under a ceiling ``c``), and the same on ``-x`` for signed sites; the cost is ``|k|`` unit spikes.
    Custom levels ``y``: ``k = #{i : e_i ≤ x/Δ}`` with the edges ``e_i = y_i − r·(y_i − y_{i−1})``, output
    ``Δ·y_k``, cost the graded spikes of ``y_k`` (:func:`sj_sfn.functional.level_terms`).
    """
    if levels is not None and (level_terms(levels) == 0).any():
        raise ValueError("allocation needs levels that are short sums of powers of two (functional.level_terms)")
    if not bool(torch.isfinite(x).all()):  # NaN/inf: the elementwise rule says what they give
        return _quantization_table_elementwise(x, target, steps, node, mean_error, levels, weights)
    return _quantization_table_sorted(_sorted_samples(x, target, weights), steps, node, mean_error, levels)


def _quantization_table_elementwise(x, target, steps, node, mean_error, levels, weights):
    """:func:`quantization_table` by firing every element at every step (the reference)."""
    r = float(node.offset)
    n = int(node.max_spikes) if levels is None else levels.numel()
    ceiling = None if node.ceiling is None else float(node.ceiling)
    cost_of = None if levels is None else torch.cat([levels.new_zeros(1, dtype=torch.int32), level_terms(levels)]).float()
    errs, cnts = [], []
    for d in steps:
        d = d.reshape(-1, 1) if d.dim() else d
        out, k = multi_threshold_fire(x, d, d if node.signed else None, n, levels, r, ceiling)  # the node's fire rule
        cnt = (k.abs() if cost_of is None else cost_of[k.abs().long()]).float()
        err = (out - target) if mean_error else (out - target).pow(2)
        if weights is None:
            errs.append(err.mean(1))
            cnts.append(cnt.mean(1))
        else:
            errs.append((err * weights).sum(1))
            cnts.append((cnt * weights).sum(1))
    return torch.stack(errs), torch.stack(cnts)


def _sorted_samples(x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Each channel's samples sorted, with the prefix sums of ``w``, ``w·t`` and ``w·t²`` (``[C, M + 1]``, float64).

    Computed once per site and shared by every level set's table (:func:`_quantization_table_sorted`).
    """
    c, m = x.shape
    xs, order = x.float().sort(dim=1)
    ts = target.gather(1, order).double()
    ws = torch.full_like(ts, 1.0 / m) if weights is None else weights.gather(1, order).double()
    zero = ts.new_zeros(c, 1)
    pw = torch.cat([zero, ws.cumsum(1)], 1)
    pt = torch.cat([zero, (ws * ts).cumsum(1)], 1)
    pt2 = torch.cat([zero, (ws * ts * ts).cumsum(1)], 1)
    return xs.contiguous(), pw, pt, pt2


def _quantization_table_sorted(samples: tuple[torch.Tensor, ...], steps, node, mean_error, levels):
    """:func:`quantization_table` from each channel's sorted samples and prefix sums (:func:`_sorted_samples`).

    The fire rule is a staircase in ``x``: count ``k`` on ``[Δ·a_k, Δ·a_{k+1})`` (``a_k = k − r`` for evenly spaced
    levels, the edges ``e_k`` otherwise; mirrored for the negative side), so a step's table is, per channel, a
    sum over ``2N + 1`` runs of the sorted samples: ``Σ w (v − t)² = v²·ΣW − 2v·Σwt + Σwt²`` with the prefix sums
    of ``w``, ``w·t`` and ``w·t²``. ``O(M log M)`` once, then ``O(N log M)`` per step, instead of ``O(M)`` per step.
    """
    xs, pw, pt, pt2 = samples
    c, m = xs.shape
    zero = pw.new_zeros(c, 1)
    r = float(node.offset)
    if levels is None:
        n = int(node.max_spikes)
        a = torch.arange(1, n + 1, dtype=torch.float32) - r  # x/Δ + r >= k
        b = torch.arange(1, n + 1, dtype=torch.float32)
        cost = b.double()
    else:
        lv = levels.detach().float().cpu()
        n = lv.numel()
        a, b = level_edges(lv, r), lv
        cost = level_terms(lv).double()
    a, b = a.to(xs.device), b.to(xs.device)
    cost = cost.to(xs.device)
    ceiling = None if node.ceiling is None else float(node.ceiling)
    k_idx = torch.arange(n, device=xs.device)
    errs, cnts = [], []
    for d in steps:
        dc = d.reshape(-1).float().to(xs.device).expand(c) if d.numel() == 1 else d.reshape(c).float().to(xs.device)
        tau = dc[:, None] * a[None, :]  # [C, N] where count k starts
        starts = torch.searchsorted(xs, tau.contiguous())  # first sample with x >= τ_k
        ends = torch.cat([starts[:, 1:], starts.new_full((c, 1), m)], 1)
        kk = k_idx.expand(c, n)
        if ceiling is not None:  # counts above the cap give the cap's level
            cap_val = torch.tensor(ceiling, dtype=torch.float32, device=xs.device) / dc
            cap = torch.floor(cap_val) if levels is None else (b[None, :] <= cap_val[:, None]).sum(1).float()
            kk = torch.minimum(kk, (cap.clamp(min=1) - 1).long()[:, None])
        vals = dc[:, None].double() * b.double()[kk]
        costs = cost[kk]
        lo = starts[:, :1]
        run_lo, run_hi, run_v, run_c = [starts], [ends], [vals], [costs]
        if node.signed:  # x <= −τ_k: count −k, no cap
            neg_ends = torch.searchsorted(xs, (-tau).contiguous(), right=True)  # samples with x <= −τ_k
            neg_starts = torch.cat([neg_ends[:, 1:], neg_ends.new_zeros(c, 1)], 1)
            run_lo.append(neg_starts)
            run_hi.append(neg_ends)
            run_v.append(-dc[:, None].double() * b.double()[k_idx].expand(c, n))
            run_c.append(cost[k_idx].expand(c, n))
            zero_lo = neg_ends[:, :1]
        else:
            zero_lo = lo.new_zeros(c, 1)
        run_lo.append(zero_lo)
        run_hi.append(lo)
        run_v.append(zero.expand(c, 1))
        run_c.append(zero.expand(c, 1))
        i, j = torch.cat(run_lo, 1), torch.cat(run_hi, 1)
        v, cst = torch.cat(run_v, 1), torch.cat(run_c, 1)
        sw = pw.gather(1, j) - pw.gather(1, i)
        st = pt.gather(1, j) - pt.gather(1, i)
        if mean_error:
            e = (v * sw - st).sum(1)
        else:
            st2 = pt2.gather(1, j) - pt2.gather(1, i)
            e = (v * v * sw - 2 * v * st + st2).sum(1).clamp_min(0)
        errs.append(e.float())
        cnts.append((cst * sw).sum(1).float())
    return torch.stack(errs), torch.stack(cnts)


@dataclass
class _SiteTable:
    name: str
    node: SFNode
    probe: _Probe
    cdim: int
    steps: list[torch.Tensor]  # per level set: [G]
    dist: list[torch.Tensor]  # per level set: [G, C]  predicted error contribution per sample
    count: list[torch.Tensor]  # per level set: [G, C]  ACs per fan-out (spikes) per sample
    fanout: float
    levels: list[torch.Tensor | None] = field(default_factory=list)  # per level set; None = evenly spaced
    per_channel: bool = False
    budget_weight: float = 1.0  # 1/2 for both operands of a spike×spike product: its ACs are counted once
    correlation: float = 1.0  # ρ: the measured error effect over the uncorrelated-error prediction

    level_names: list[str] = field(default_factory=list)  # per level set: its name ('custom' for the node's own)
    _sums: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def add(self, name: str, levels: torch.Tensor | None, steps: torch.Tensor, dist: torch.Tensor, count: torch.Tensor) -> None:
        self.level_names.append(name)
        self.levels.append(levels)
        self.steps.append(steps)
        self.dist.append(dist)
        self.count.append(count)
        self._sums = None

    def scale_errors(self, r: float) -> None:
        self.dist = [d * r for d in self.dist]
        self.correlation *= r
        self._sums = None

    def sums(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(Σ_c dist, Σ_c count)`` per level set, ``[G]`` each (the per-tensor choice), cached."""
        if self._sums is None:
            self._sums = ([d.sum(1) for d in self.dist], [c.sum(1) for c in self.count])
        return self._sums


#: Level sets that :func:`allocate_thresholds` may choose per site (``level_sets=`` names them).
LEVEL_SETS = ("uniform", "log2", "float1", "float2", "float3", "float2s", "float3s")
_SUBNORMAL = {"float2s": "float2", "float3s": "float3"}  # the sets with subnormal levels, and their plain sets
_MANTISSA_BITS = {"log2": 0, "float1": 1, "float2": 2, "float3": 3}
_MANTISSA_BITS.update({s: _MANTISSA_BITS[plain] for s, plain in _SUBNORMAL.items()})
#: What each site chooses from by default. Measured on MobileNetV2 and MiniLM (docs/calibration.md): with the
#: subnormal sets offered, ``float2``/``float3`` were (almost) never chosen, nor ``log2``/``float1`` before them.
DEFAULT_LEVEL_SETS = ("uniform", "float2s", "float3s")


def level_set(name: str, max_spikes: int) -> torch.Tensor | None:
    """The normalised levels of a named set with at most ``max_spikes`` levels (``None`` = evenly spaced).

    ``log2``: ``2^e`` (one graded spike each); ``float1`` / ``float2`` / ``float3``: ``(1 + j/2^m)·2^e`` with
    ``m`` = 1 / 2 / 3 mantissa bits (at most ``m + 1`` graded spikes); at most 16 octaves, ``2^m·octaves ≤ N``.
    ``float2s`` / ``float3s``: the same with subnormal levels ``j/2^m`` below the first octave
    (:func:`~sj_sfn.functional.float_levels`), ``2^m·(octaves + 1) - 1 ≤ N``.
    """
    if name == "uniform":
        return None
    bits = _MANTISSA_BITS.get(name)
    if bits is None:
        raise ValueError(f"unknown level set {name!r}; choose from {LEVEL_SETS}")
    subnormal = name in _SUBNORMAL
    octaves = min(16, (max_spikes + 1 >> bits) - 1 if subnormal else max_spikes >> bits)
    if octaves < 2:
        raise ValueError(f"level set {name!r} needs N >= {_min_levels(name)} levels, the site has {max_spikes}")
    return float_levels(bits, octaves, subnormal=subnormal)


def _min_levels(name: str) -> int:
    """The fewest levels per sign a named set needs (two octaves)."""
    bits = _MANTISSA_BITS[name]
    return (3 << bits) - 1 if name in _SUBNORMAL else 2 << bits


def _check_level_sets(requested: Iterable[str] | str, what: str = "level_sets") -> tuple[str, ...]:
    sets = LEVEL_SETS if requested == "all" else (requested,) if isinstance(requested, str) else tuple(requested)
    if not sets or any(ls not in LEVEL_SETS for ls in sets):
        raise ValueError(f"{what} must be 'all' or names from {LEVEL_SETS}, got {requested!r}")
    return sets


#: Site kinds whose spikes multiply each other's (``q·kᵀ``). Their energy depends on both operands' spike counts at
#: once, and the allocation models it by iterating the two fan-outs to a fixed point. With subnormal levels on both
#: operands that iteration missed the budget of a causal LM (energy 0.69 measured against 0.49 predicted at budget
#: 0.5; 0.50 against 0.50 with the plain float sets on q and k): unless ``level_sets`` names these kinds, they are
#: offered the plain float sets in place of the subnormal ones.
_MUTUAL_PRODUCT_KINDS = ("q", "k")


def _sets_for(kind: str, sets_by_kind: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The level sets a site of ``kind`` is offered (see :data:`_MUTUAL_PRODUCT_KINDS`)."""
    if kind in sets_by_kind:
        return sets_by_kind[kind]
    sets = sets_by_kind["*"]
    if kind in _MUTUAL_PRODUCT_KINDS:
        sets = tuple(dict.fromkeys(_SUBNORMAL.get(ls, ls) for ls in sets))
    return sets


def _level_sets_by_kind(requested: Any) -> dict[str, tuple[str, ...]]:
    """``level_sets`` as ``{kind: sets}`` with the key ``'*'`` for every kind not named."""
    if isinstance(requested, Mapping):
        out = {str(k): _check_level_sets(v, f"level_sets[{k!r}]") for k, v in requested.items()}
        out.setdefault("*", DEFAULT_LEVEL_SETS)
        return out
    return {"*": _check_level_sets(requested)}


def _tables(probes: dict[str, _Probe], fanouts: dict[str, float], grid: int,
            sets_by_kind: dict[str, tuple[str, ...]]) -> list[_SiteTable]:
    tables = []
    for name, pr in probes.items():
        if not pr.rows or pr.sens_n == 0:
            continue
        x, w = pr.samples()  # [C, M], weights summing to 1 per channel
        target = pr.activation(x)
        scale = (target.pow(2) * w).sum(1).mean().sqrt().item()
        if not math.isfinite(scale) or scale <= 0:
            scale = max(x.abs().max().item(), 1e-6)
        c = x.shape[0]
        n_c = pr.numel_per_sample / c
        sens = (pr.sens_sum / pr.sens_n).float()
        if pr.node.levels is not None and pr.initial_levels:  # levels the user gave: keep them, choose the step
            sets: list[tuple[str, torch.Tensor | None]] = [("custom", pr.node.levels.detach().cpu().float())]
        else:
            sets = [(ls, level_set(ls, pr.n_uniform)) for ls in _sets_for(pr.node.kind, sets_by_kind)
                    if ls == "uniform" or pr.n_uniform >= _min_levels(ls)]
        t = _SiteTable(name, pr.node, pr, pr.cdim, [], [], [], fanouts[name])
        mag = target.abs()
        ch_rms = (mag.pow(2) * w).sum(1).sqrt()
        lo_val = ch_rms[ch_rms > 0].min().item() if (ch_rms > 0).any() else scale
        hi_val = max(mag.max().item(), scale)
        sorted_once = _sorted_samples(x, target, w) if bool(torch.isfinite(x).all()) else None
        for set_name, levels in sets:
            if levels is None:
                j = torch.arange(-grid, grid // 3 + 1, dtype=torch.float32)
            else:  # graded levels: the top level between half the smallest channel rms and twice the largest value
                if (level_terms(levels) == 0).any():  # user levels that cost multiplies
                    continue
                top = float(levels[-1])
                j_lo = math.floor(4 * math.log2(lo_val / (2 * top * scale)))
                j_hi = math.ceil(4 * math.log2(2 * hi_val / (top * scale)))
                j = torch.arange(max(j_lo, -grid - 4 * int(math.log2(top) + 1)), max(j_hi, j_lo) + 1, dtype=torch.float32)
            steps = scale * torch.pow(2.0, j / 4)
            if sorted_once is None:
                mse, cnt = quantization_table(x, target, steps, pr.node, levels=levels, weights=w)
            else:  # the samples sorted once for every level set
                mse, cnt = _quantization_table_sorted(sorted_once, steps, pr.node, False, levels)
            t.add(set_name, levels, steps, n_c * sens * mse, n_c * cnt)
        if t.steps:
            tables.append(t)
    return tables


def _choose(t: _SiteTable, mu: float, per_channel: bool) -> tuple[int, torch.Tensor, float, float, float]:
    """Level set, step index per channel (or one for all), the site's distortion, cost and Lagrangian at ``μ``."""
    best = None
    unit = E_AC_PJ * t.fanout
    dist_sums, count_sums = t.sums()
    for f, (dist, count) in enumerate(zip(t.dist, t.count)):
        if per_channel:
            cost = unit * count
            j = (dist + mu * cost).argmin(0)  # [C]
            idx = torch.arange(dist.shape[1])
            d, e = dist[j, idx].sum().item(), cost[j, idx].sum().item()
        else:
            j0 = int((dist_sums[f] + (mu * unit) * count_sums[f]).argmin())
            d, e = dist_sums[f][j0].item(), unit * count_sums[f][j0].item()
            j = torch.full((dist.shape[1],), j0, dtype=torch.long)
        value = d + mu * e
        if best is None or value < best[4]:
            best = (f, j, d, e * t.budget_weight, value)
    return best


def _solve(tables: list[_SiteTable], budget_pj: float) -> float:
    """The smallest ``μ`` whose allocation meets the spiking energy budget (bisection in log μ)."""

    def energy(mu: float) -> float:
        return sum(_choose(t, mu, t.per_channel)[3] for t in tables)

    lo, hi = -40.0, 40.0
    if energy(math.exp(hi)) > budget_pj:
        return math.exp(hi)
    if energy(math.exp(lo)) <= budget_pj:
        return math.exp(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if energy(math.exp(mid)) > budget_pj:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def _broadcast_from_rank0(snn: nn.Module) -> None:
    """Under ``torchrun``: every process takes rank 0's allocation (thresholds, per-channel layouts, corrected
    biases), so all ranks hold the same network; rank 0 allocated on its own shard of the calibration data."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    state = [snn.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0)
    snn.load_state_dict(state[0])


@torch.no_grad()
def _mean_error(x: torch.Tensor, target: torch.Tensor, node: SFNode, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``E[SFN(x) − act(x)]`` per channel (rows of ``x``, weighted by ``weights``) at the node's current thresholds."""
    theta = node.theta_pos.float().cpu() * float(node.lam)
    steps = theta.reshape(1, -1, 1) if theta.numel() > 1 else theta.reshape(1)
    levels = None if node.levels is None else node.levels.detach().float().cpu()
    return quantization_table(x, target, steps, node, mean_error=True, levels=levels, weights=weights)[0][0]


@torch.no_grad()
def _fold_input_error(layer: nn.Module, err: torch.Tensor) -> None:
    """``b ← b − W·e`` for a per-input-channel error ``e`` of a Linear / Conv / transformers Conv1D input.

    A per-tensor error (one value: a site shared by calls on different shapes) is the same on every input channel.
    """
    w = layer.weight.detach()
    if err.numel() == 1:
        c_in = w.shape[0] if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) else (
            layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)
        err = err.reshape(1).expand(c_in)
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        g = layer.groups
        wsum = w.flatten(2).sum(2)  # [O, C/g]
        e = err.to(w).reshape(g, -1)  # [g, C/g]
        shift = (wsum.reshape(g, -1, wsum.shape[1]) * e[:, None, :]).sum(-1).reshape(-1)
    elif isinstance(layer, nn.Linear):
        shift = w @ err.to(w)
    else:  # transformers Conv1D: weight [in, out]
        shift = err.to(w) @ w
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift))
    layer.bias.sub_(shift)


def _product_pairs(probes: dict[str, _Probe], fanouts: dict[str, float]) -> list[tuple[str, str, float, float]]:
    r"""Attention operands (sites ``…sfn_q/k/v/attn`` that feed no weight layer): ``(site, partner, m, ann_macs)``.

    Every unit spike of ``q[i, d]`` meets ``Σ_j |k_k[j, d]| ≈ L_k·k̄_k`` spikes of ``k`` (one AC each), so its
    fan-out is ``m·k̄_partner`` with ``m = L_k`` (``q``), ``L_q·H_q/H_k`` (``k``), ``D_v`` (``attn``) and
    ``L_q·H_q/H_v`` (``v``). ``ann_macs = H·L_q·L_k·D`` per sample for each of the two products.
    """
    out = []
    for name, pr in probes.items():
        prefix, sep, kind = name.rpartition("sfn_")
        if not sep or kind not in _PRODUCT_PARTNER or fanouts.get(name, 0) > 0 or not pr.shape:
            continue
        partner = probes.get(f"{prefix}sfn_{_PRODUCT_PARTNER[kind]}")
        if partner is None or not partner.shape or len(pr.shape) < 3:
            continue
        a, b = pr.shape, partner.shape
        heads = a[-3] if len(a) >= 4 else 1
        if kind == "q":
            m, macs = b[-2], heads * a[-2] * b[-2] * a[-1]
        elif kind == "k":
            m, macs = probes[f"{prefix}sfn_q"].shape[-2] * max(1, b[-3] // max(1, heads)) if len(b) >= 4 else b[-2], 0.0
        elif kind == "attn":
            m, macs = b[-1], heads * a[-2] * a[-1] * b[-1]
        else:  # v
            m, macs = b[-2] * max(1, b[-3] // max(1, heads)) if len(b) >= 4 else b[-2], 0.0
        out.append((name, f"{prefix}sfn_{_PRODUCT_PARTNER[kind]}", float(m), float(macs)))
    return out


def _update_product_fanouts(tables: dict[str, _SiteTable], products: list[tuple[str, str, float, float]], mu: float) -> None:
    """Fan-out of each attention operand = ``m ×`` its partner's spikes per element at the current ``μ``."""
    for name, partner, m, _ in products:
        t, tp = tables.get(name), tables.get(partner)
        if t is None or tp is None:
            continue
        f, j, _, _, _ = _choose(tp, mu, tp.per_channel)
        per_element = tp.count[f][j, torch.arange(tp.count[f].shape[1])].sum().item() / max(1.0, tp.probe.numel_per_sample)
        t.fanout = max(m * per_element, 1e-3)


def _probe_passes(snn: nn.Module, loader: Iterable, probes_by_name: dict[str, _Probe], probes: int, seed: int,
                  device: torch.device, num_batches: int | None, progress: bool, desc: str, accumulate: str,
                  scratch: tuple = ()) -> int:
    """Forward every batch through the probed network and back-propagate ``probes`` Rademacher vectors
    ``v/‖z‖`` per output; after each, every probe's ``accumulate`` method reads its gradient. Returns the batches seen."""
    gen = torch.Generator().manual_seed(seed)
    seen = 0
    for batch in tqdm(loader, total=batches_total(loader, num_batches), desc=desc, disable=not progress, leave=False):
        for c in scratch:
            c.clear()
        for pr in probes_by_name.values():
            pr.grad_mode = True
        with torch.enable_grad():
            outs = output_tensors(call_model(snn, batch, device))
            if not outs:
                raise CalibrationError("the model returned no floating-point tensor to measure fidelity on")
            for t in outs:
                if not torch.isfinite(t).all():
                    raise CalibrationError(f"non-finite model output on calibration batch {seen}")
            for i in range(probes):
                grads = []
                for t in outs:
                    b = t.shape[0]
                    norm = t.detach().reshape(b, -1).norm(dim=1).clamp_min(1e-12)
                    v = (torch.randint(0, 2, t.shape, generator=gen).to(t) * 2 - 1)
                    grads.append(v / norm.reshape((b,) + (1,) * (t.dim() - 1)))
                for pr in probes_by_name.values():
                    if pr.out is not None:
                        pr.out.grad = None
                torch.autograd.backward(outs, grads, retain_graph=i + 1 < probes)
                for pr in probes_by_name.values():
                    getattr(pr, accumulate)()
        for pr in probes_by_name.values():
            pr.out, pr.err, pr.pending, pr.batch_numel = None, None, None, 0.0
            pr.cdim_confirmed = pr.cdim_confirmed or pr.cdim is not None  # no direct consumer: keep the guess
        for c in scratch:
            c.clear()
        seen += 1
        if num_batches is not None and seen >= num_batches:
            break
    return seen


def _correlation_factors(snn: nn.Module, tables: list[_SiteTable], mu: float, loader: Iterable, probes: int, seed: int,
                         device: torch.device, num_batches: int | None, progress: bool) -> dict[str, float]:
    r"""Per site, ``ρ_s = E[(g·e)²] / E[Σ_i g_i² e_i²]`` at the chosen quantiser (``g = J^T v``, ``e`` its error).

    The error tables assume the quantisation error of a site is uncorrelated between elements, so its
    effect on the output is ``Σ_i S_i e_i²``. Neighbouring pixels of a smooth image, or the tokens of a
    sentence, round alike: the error is correlated and moves the output by ``‖J e‖²``, often several
    times more (early convolutions low-pass the error) or less. ``(v^T J e)²`` with Rademacher ``v`` is an
    unbiased estimate of ``‖J e‖²``, from the same backward passes as the sensitivities.
    """
    probes_by_name = {t.name: t.probe for t in tables}
    for t in tables:
        f, j, _, _, _ = _choose(t, mu, t.per_channel)
        t.probe.quant = (t.steps[f][j], t.levels[f])
        t.probe.record, t.probe.dot2, t.probe.diag = False, 0.0, 0.0
        _set_parent(snn, t.name, t.probe)
    was_training = snn.training
    snn.eval()
    try:
        _probe_passes(snn, loader, probes_by_name, probes, seed + 1, device, num_batches, progress,
                      "correlation of rounding errors", "add_correlation")
    finally:
        for t in tables:
            t.probe.quant, t.probe.err, t.probe.out = None, None, None
            _set_parent(snn, t.name, t.node)
        snn.train(was_training)
    return {t.name: t.probe.dot2 / t.probe.diag for t in tables if t.probe.diag > 0}


def check_budget(energy_budget: Any) -> float:
    """``energy_budget`` as a float, or a ``ValueError`` naming it."""
    if isinstance(energy_budget, bool) or not isinstance(energy_budget, int | float) or not math.isfinite(energy_budget) \
            or energy_budget <= 0:
        raise ValueError(f"energy_budget (E_SNN/E_ANN) must be a finite number > 0, got {energy_budget!r}")
    return float(energy_budget)


def _set_parent(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def allocate_thresholds(
    snn: nn.Module,
    loader: Iterable,
    energy_budget: float = 0.35,
    *,
    num_batches: int | None = None,
    per_channel: bool | str = "auto",
    per_channel_gain: float = 0.1,
    probes: int = 2,
    samples_per_batch: int = 1 << 16,
    grid: int = 40,
    level_sets: Iterable[str] | str | Mapping[str, Iterable[str] | str] = DEFAULT_LEVEL_SETS,
    correlation_passes: int = 1,
    bias_correction: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Allocation:
    """Set every uniform-level SFN site's step for the energy budget ``β = E_SNN/E_ANN`` (see the module doc).

    :param snn: a converted network (its :class:`~sj_sfn.SFNode` sites are re-thresholded in place)
    :param loader: calibration batches (tensors, ``(x, y)`` pairs, or dicts for Hugging Face models)
    :param energy_budget: the target energy ratio ``β``
    :param per_channel: ``'auto'`` (per site, when it lowers the Lagrangian by more than
        ``per_channel_gain``), ``True`` or ``False``
    :param probes: Rademacher probes per batch for the sensitivities
    :param samples_per_batch: activations kept per site and batch for the error tables
    :param grid: candidate steps per site: ``rms·2^{j/4}``, ``j ∈ [-grid, grid/3]`` (lower for wider level sets)
    :param level_sets: the level sets each site may take (:data:`LEVEL_SETS`): ``'uniform'`` (``Δ·k``, ``k``
        unit spikes), ``'log2'`` (``Δ·2^e``: one graded spike), ``'float1'``/``'float2'``/``'float3'``
        (``Δ·(1 + j/2^m)·2^e``: one graded spike per power of two), ``'float2s'``/``'float3s'`` (the same with
        subnormal levels ``Δ·j/2^m`` below ``Δ``), or ``'all'``; each site takes the set and step with the lowest
        Lagrangian. A mapping gives the sets per site kind (``{'attn': 'all', '*': 'uniform'}``; ``'*'``: every
        other kind, default :data:`DEFAULT_LEVEL_SETS`). The operands of ``q·kᵀ`` (kinds ``q``, ``k``) are offered
        the plain float sets in place of the subnormal ones unless the mapping names them (the energy of a
        product of two spike tensors is modelled less well; see ``_MUTUAL_PRODUCT_KINDS``). Sites converted with
        custom levels keep them (only their step is chosen)
    :param correlation_passes: passes over ``loader`` that measure how much each site's actual rounding error
        moves the output against the uncorrelated-error prediction (``ρ_s``, see :func:`_correlation_factors`)
        and re-allocate with the corrected errors; 0 = the first-order allocation alone
    :param bias_correction: fold the mean quantisation error of each site, per channel, into the bias
        of the weight layers that read it: ``b ← b − W·E[SFN(x) − act(x)]`` (the error of rounding is
        not zero-mean: values under half a step all become 0). Valid for the allocated thresholds; a
        later ``set_lambda`` leaves the correction as it was
    :returns: an :class:`Allocation` (predicted energy ratio and relative output error, per-site steps)
    :raises ValueError: for a budget below the energy of the layers whose input stays analog
    """
    energy_budget = check_budget(energy_budget)
    if per_channel not in (True, False, "auto"):
        raise ValueError(f"per_channel must be True, False or 'auto', got {per_channel!r}")
    if isinstance(correlation_passes, bool) or not isinstance(correlation_passes, int) or correlation_passes < 0:
        raise ValueError(f"correlation_passes must be an integer >= 0, got {correlation_passes!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be an integer >= 1 or None, got {num_batches!r}")
    sets_by_kind = _level_sets_by_kind(level_sets)
    sites = [(n, m) for n, m in snn.named_modules() if isinstance(m, SFNode)]
    if not sites:
        raise ValueError("the model has no SFNode sites: convert it first (sj_sfn.convert)")
    unknown = set(sets_by_kind) - {"*"} - {m.kind for _, m in sites}
    if unknown:
        raise ValueError(f"level_sets names site kinds the model does not have: {sorted(unknown)}; its kinds are "
                         f"{sorted({m.kind for _, m in sites})}")
    device = model_device(snn) if device is None else torch.device(device)
    was_training = snn.training
    snn.eval()
    probes_by_name = {n: _Probe(m, n, max(16, samples_per_batch)) for n, m in sites}
    for n, pr in probes_by_name.items():
        _set_parent(snn, n, pr)
    weight_types = weight_layer_types()
    site_of: dict[int, str] = {}  # storage of a site output (or a spike-preserving view of it) -> site
    consumers: dict[str, dict[str, float]] = {}  # site -> {consumer: fan-out}
    macs: dict[str, float] = {}
    analog: dict[str, float] = {}
    hooks = []

    direct: set[tuple[str, str]] = set()  # (site, consumer) pairs where the consumer reads the site's values as they are
    site_out: dict[str, int] = {}

    alive: list[torch.Tensor] = []  # site outputs of the current forward: their storage is never reused meanwhile

    def probe_hook(name):
        def hook(m, inp, out):
            site_of[_storage(out)] = name
            site_out[name] = _storage(out)
            alive.append(out)
        return hook

    scale: dict[int, float] = {}  # storage -> (spikes reaching it) / (spikes of the site), e.g. < 1 after a max-pool

    def pass_hook(m, inp, out):
        if inp and torch.is_tensor(inp[0]) and torch.is_tensor(out) and _storage(inp[0]) in site_of:
            src = _storage(inp[0])
            site_of[_storage(out)] = site_of[src]
            with torch.no_grad():
                ratio = out.detach().abs().sum().item() / max(inp[0].detach().abs().sum().item(), 1e-30)
            scale[_storage(out)] = scale.get(src, 1.0) * (ratio if out.numel() != inp[0].numel() else 1.0)
            alive.append(out)

    def layer_hook(name):
        def hook(m, inp, out):
            x = inp[0]
            macs[name] = _macs(m, x, out)
            src = site_of.get(_storage(x))
            if src is None:
                analog[name] = macs[name]
            else:
                if name not in consumers.get(src, {}):
                    consumers.setdefault(src, {})[name] = _fanout(m, x) * scale.get(_storage(x), 1.0)
                if site_out.get(src) == _storage(x):
                    direct.add((src, name))
                    pr = probes_by_name[src]
                    if tuple(x.shape) == pr.shape and x.dim() >= 2:
                        pr.confirm_channel_dim(1 if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) else x.dim() - 1)
        return hook

    try:
        for n, pr in probes_by_name.items():
            hooks.append(pr.register_forward_hook(probe_hook(n)))
        for n, m in snn.named_modules():
            if isinstance(m, weight_types):
                hooks.append(m.register_forward_hook(layer_hook(n)))
            elif isinstance(m, _PASSTHROUGH):
                hooks.append(m.register_forward_hook(pass_hook))
        seen = _probe_passes(snn, loader, probes_by_name, probes, seed, device, num_batches, progress,
                             "allocating thresholds", "add_sensitivity", (site_of, alive, scale))
        if seen == 0:
            raise CalibrationError("the calibration loader is empty: give it at least one batch")
    finally:
        for h in hooks:
            h.remove()
        for n, m in sites:
            _set_parent(snn, n, m)
        snn.train(was_training)

    fanouts = {n: sum(consumers.get(n, {}).values()) for n in probes_by_name}
    products = _product_pairs(probes_by_name, fanouts)
    for name, _partner, _dim, ann_macs in products:
        fanouts[name] = 1.0  # set from the partner's spike count below
        macs[f"{name} (product)"] = ann_macs
    unmatched = [n for n in probes_by_name if fanouts[n] == 0]  # feed no weight layer: no ACs, finest useful step
    e_ann = E_MAC_PJ * sum(macs.values())
    e_analog = E_MAC_PJ * sum(analog.values())
    tables = _tables(probes_by_name, fanouts, grid, sets_by_kind)
    if not tables:
        raise CalibrationError("no SFN site received data during allocation")
    budget_pj = energy_budget * e_ann - e_analog
    if budget_pj <= 0:
        raise ValueError(
            f"energy_budget {energy_budget:g} is below the share of the layers whose input stays analog "
            f"({e_analog / e_ann:.3f} of the ANN's energy): raise the budget"
        )
    for t in tables:
        t.per_channel = per_channel is True
    by_name = {t.name: t for t in tables}
    for name, partner, _, _ in products:
        if name in by_name and partner in by_name:
            by_name[name].budget_weight = 0.5
    mu = _solve(tables, budget_pj)
    for _ in range(3 if products else 0):  # product operands: ACs per spike = partner's spikes it meets
        _update_product_fanouts(by_name, products, mu)
        mu = _solve(tables, budget_pj)
    if per_channel == "auto":
        for t in tables:
            j_pt = _choose(t, mu, False)[4]
            j_pc = _choose(t, mu, True)[4]
            t.per_channel = j_pc < (1.0 - per_channel_gain) * j_pt and t.dist[0].shape[1] > 1
        mu = _solve(tables, budget_pj)
        for _ in range(2 if products else 0):
            _update_product_fanouts(by_name, products, mu)
            mu = _solve(tables, budget_pj)
    for _ in range(correlation_passes):  # the tables' error, corrected for rounding errors that add up (or cancel)
        rho = _correlation_factors(snn, tables, mu, loader, probes, seed, device, num_batches, progress)
        for t in tables:
            r = min(max(rho.get(t.name, 1.0), 0.05), 50.0)
            t.scale_errors(r)
        mu = _solve(tables, budget_pj)
        for _ in range(2 if products else 0):
            _update_product_fanouts(by_name, products, mu)
            mu = _solve(tables, budget_pj)
    result = Allocation(energy_budget=energy_budget, predicted_ratio=0.0, predicted_rel_error=0.0,
                        analog_share=e_analog / e_ann)
    total_e, total_d = e_analog, 0.0
    for t in tables:
        f, j, d, e, _ = _choose(t, mu, t.per_channel)
        step = t.steps[f][j]  # [C]
        node = t.node
        levels = t.levels[f]
        with torch.no_grad():
            dev = node.lam.device
            if not t.probe.initial_levels:
                node.levels = None if levels is None else levels.to(dev)
                node.max_spikes = t.probe.n_uniform if levels is None else levels.numel()
            if t.per_channel:
                theta = step.to(dev)
                node.channel_dim = -1 if t.cdim == len(t.probe.shape) - 1 else t.cdim
            else:
                theta = step[0].reshape(()).to(dev)
                node.channel_dim = None
            node.theta_pos = theta.clone()
            if node.signed:
                node.theta_neg = theta.clone()
            node.lam.fill_(1.0)
        count = t.count[f][j, torch.arange(t.count[f].shape[1])].sum().item()
        set_name = t.level_names[f]
        total_e += e
        total_d += d
        result.sites.append(SiteAllocation(
            name=t.name, kind=node.kind, signed=node.signed, per_channel=t.per_channel,
            step=float(step.mean()), levels=set_name, fanout=t.fanout, mean_count=count / max(1.0, t.probe.numel_per_sample),
            error=d, correlation=t.correlation, energy_share=e / e_ann,
        ))
    if bias_correction:
        modules = dict(snn.named_modules())
        for t in tables:
            fixes = [modules[c] for c in consumers.get(t.name, {}) if (t.name, c) in direct]
            if fixes:
                x, w = t.probe.samples()
                err = _mean_error(x, t.probe.activation(x), t.node, w)
                for layer in fixes:
                    _fold_input_error(layer, err)
    _broadcast_from_rank0(snn)
    result.predicted_ratio = total_e / e_ann
    result.predicted_rel_error = math.sqrt(max(total_d, 0.0))
    if unmatched:
        warnings.warn(f"{len(unmatched)} SFN site(s) feed no weight layer that allocation could see (their spikes cost "
                      f"no ACs here): {unmatched[:4]}", stacklevel=2)
    return result
