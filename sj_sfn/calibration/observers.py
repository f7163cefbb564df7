"""Per-site activation statistics for setting SFN thresholds.

A :class:`SiteObserver` is an identity module placed where an SFN will go. While enabled it
records, for every batch, the ``p``-quantile of the activations (and, for signed sites, the
magnitude of the ``(1-p)``-quantile) plus the running max/min. The base threshold of the site
is the mean of the per-batch quantiles, as in the prior conversion work:

    θ+ = (1/B) Σ_b quantile_p(x_b),      θ- = -(1/B) Σ_b quantile_{1-p}(x_b)

Large tensors are quantiled on a bounded random subsample (``max_samples`` values per batch,
per channel for per-channel sites) so memory stays flat whatever the resolution.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import check_quantile
from ..utils import batch_inputs, batches_total, model_device

__all__ = ["SiteObserver", "observers", "calibrate", "batch_inputs", "CalibrationError"]


class CalibrationError(ValueError):
    """Raised when calibration data cannot produce valid thresholds."""


class SiteObserver(nn.Module):
    """Identity module that accumulates quantile/max statistics of what flows through it.

    :param p: quantile for the positive threshold (default 0.99)
    :param signed: also track the ``1-p`` quantile (negative threshold)
    :param channel_dim: per-channel statistics along this dim of the input (``None`` = per tensor)
    :param max_samples: values sampled per batch (per channel) before taking quantiles
    :param name: site name used in error messages
    """

    def __init__(
        self,
        p: float = 0.99,
        signed: bool = False,
        channel_dim: int | None = None,
        max_samples: int = 1 << 17,
        name: str = "",
    ):
        super().__init__()
        check_quantile(p)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.p = float(p)
        self.signed = signed
        self.channel_dim = channel_dim
        self.max_samples = int(max_samples)
        self.name = name
        self.enabled = True
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.float64))
        self.register_buffer("pos_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("neg_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("max_val", torch.full((), -math.inf, dtype=torch.float64))
        self.register_buffer("min_val", torch.full((), math.inf, dtype=torch.float64))
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, p={self.p}, signed={self.signed}, channel_dim={self.channel_dim}"

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``[C, M]`` (per-channel) or ``[1, M]`` (per-tensor)."""
        if self.channel_dim is None:
            return x.reshape(1, -1)
        dim = self.channel_dim % x.dim()
        return x.movedim(dim, 0).reshape(x.shape[dim], -1)

    def _subsample(self, rows: torch.Tensor) -> torch.Tensor:
        m = rows.shape[1]
        if m <= self.max_samples:
            return rows
        if self._generator is None or self._generator.device != rows.device:
            self._generator = torch.Generator(device=rows.device)
        # seeded by the batch itself, not by how many batches came before: a calibration split
        # over several processes (torchrun) draws the same subsample of a batch as one process
        probe = rows[:, :: max(1, m // 256)].double()
        seed = int(torch.frexp(probe.abs().sum() + probe.sum() * 0.5)[0].item() * 2**52) & 0x7FFFFFFFFFFFFFFF
        self._generator.manual_seed(seed)
        idx = torch.randint(0, m, (self.max_samples,), device=rows.device, generator=self._generator)
        return rows[:, idx]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch of activations into the running statistics."""
        if x.numel() == 0:
            return
        full = self._rows(x.detach())  # a copy for per-channel sites: made once, used for extremes and quantiles
        lo, hi = torch.aminmax(full, dim=1)
        # one pass over the activations, one transfer; NaN and ±Inf propagate into the extremes
        hi, lo = torch.stack((hi, lo)).double().cpu()
        if not (torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            raise CalibrationError(
                f"non-finite activations (NaN or Inf) at site {self.name or '<unnamed>'}: "
                "check the model and the calibration data"
            )
        rows = self._subsample(full.float())
        qs = [self.p, 1.0 - self.p] if self.signed else [self.p]
        q = torch.quantile(rows, torch.tensor(qs, device=rows.device), dim=1).double().cpu()  # [len(qs), C]
        if self.channel_dim is None:
            q = q.reshape(len(qs))  # per-tensor statistics stay 0-d
        pos = q[0]
        if self.num_batches.item() == 0 and self.channel_dim is not None:  # per-channel: [C] sums (C may be 1)
            self.pos_sum = torch.zeros_like(pos)
            self.neg_sum = torch.zeros_like(pos)
            self.max_val = torch.full_like(pos, -math.inf)
            self.min_val = torch.full_like(pos, math.inf)
        self.pos_sum += pos
        if self.signed:
            self.neg_sum += -q[1]
        self.max_val = torch.maximum(self.max_val, hi.reshape(self.max_val.shape))
        self.min_val = torch.minimum(self.min_val, lo.reshape(self.min_val.shape))
        self.num_batches += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.observe(x)
        return x

    def reset_statistics(self) -> None:
        for name in ("num_batches", "pos_sum", "neg_sum"):
            setattr(self, name, torch.zeros((), dtype=torch.float64))
        self.max_val = torch.full((), -math.inf, dtype=torch.float64)
        self.min_val = torch.full((), math.inf, dtype=torch.float64)

    def all_reduce(self, group=None) -> None:
        """Sum the statistics over a ``torch.distributed`` group (max/min reduced as such)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; the statistics live on the CPU
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None

        def reduce(t: torch.Tensor, op) -> None:
            u = t if dev is None else t.to(dev)
            dist.all_reduce(u, op=op, group=group)
            if dev is not None:
                t.copy_(u.cpu())

        for name in ("num_batches", "pos_sum", "neg_sum"):
            reduce(getattr(self, name), dist.ReduceOp.SUM)
        reduce(self.max_val, dist.ReduceOp.MAX)
        reduce(self.min_val, dist.ReduceOp.MIN)

    def statistics(self, min_threshold: float = 1e-6) -> dict[str, torch.Tensor | None]:
        """Thresholds for :meth:`SFNode.from_statistics`: ``{"pos", "neg", "max", "min"}``.

        A quantile that is zero (a site that almost never fires) falls back to the observed
        max, then to ``min_threshold``, with a warning naming the site: a zero threshold is
        never returned.
        """
        n = self.num_batches.item()
        if n == 0:
            raise CalibrationError(f"site {self.name or '<unnamed>'} saw no data during calibration")
        pos = (self.pos_sum / n).float()
        neg = (self.neg_sum / n).float() if self.signed else None
        mx, mn = self.max_val.float(), self.min_val.float()
        pos = self._repair(pos, mx, min_threshold, "positive")
        if neg is not None:
            neg = self._repair(neg, -mn, min_threshold, "negative")
        return {"pos": pos, "neg": neg, "max": mx, "min": mn}

    def _repair(self, q: torch.Tensor, extreme: torch.Tensor, min_threshold: float, branch: str) -> torch.Tensor:
        bad = ~(q > 0)
        if bad.any():
            where = self.name or "<unnamed>"
            fallback = torch.where(extreme > 0, extreme, torch.full_like(extreme, min_threshold))
            warnings.warn(
                f"site {where}: the {branch} {self.p:g}-quantile is 0 for {int(bad.sum())} of {bad.numel()} "
                f"channel(s) (the site rarely fires); using the observed extreme or {min_threshold:g} instead",
                stacklevel=3,
            )
            q = torch.where(bad, fallback.expand_as(q), q)
        return q.clamp_min(min_threshold)


def observers(model: nn.Module) -> Iterator[tuple[str, SiteObserver]]:
    """All :class:`SiteObserver` modules of ``model`` with their qualified names."""
    for name, m in model.named_modules():
        if isinstance(m, SiteObserver):
            yield name, m


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "calibrating",
    call: Callable[[nn.Module, Any, torch.device], Any] | None = None,
) -> int:
    """Run ``loader`` through ``model`` (eval mode) so its observers see the data.

    Returns the number of batches seen. Raises :class:`CalibrationError` for an empty loader
    or non-finite inputs. Under an initialised ``torch.distributed`` group every observer is
    all-reduced afterwards (each process passes its own shard of the batches) and the count
    returned is the total over processes. ``call(model, batch, device)`` runs one batch (default:
    ``model(x)`` with ``x`` from :func:`batch_inputs`, checked finite; Hugging Face models pass
    ``model(**batch)``).
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    was_training = model.training
    model.eval()
    if device is None:
        device = model_device(model)
    seen = 0
    try:
        for batch in tqdm(loader, total=batches_total(loader, num_batches), desc=desc, disable=not progress, leave=False):
            if call is not None:
                call(model, batch, device)
            else:
                x = batch_inputs(batch)
                if not torch.isfinite(x).all():
                    raise CalibrationError(f"calibration batch {seen} contains NaN or Inf inputs")
                model(x.to(device))
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    finally:
        model.train(was_training)
    from ..distributed import all_reduce_sum, is_distributed

    if is_distributed():
        # torchrun: sum every observer's statistics over the processes (each saw its own batches),
        # so the thresholds equal a single-process run over all the batches
        for _, obs in observers(model):
            obs.all_reduce()
        seen = int(all_reduce_sum([float(seen)])[0])
    if seen == 0:
        raise CalibrationError("the calibration loader is empty: give it at least one batch")
    return seen
