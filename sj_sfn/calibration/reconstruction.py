r"""Output reconstruction: fit the converted network to its ANN on the calibration data.

Threshold allocation (:mod:`sj_sfn.calibration.budget`) chooses every site's step on its own; the
rounding errors of tens of sites then compound through the network (on a pretrained MobileNetV2
at ``N = 32`` the logit error no longer falls with more energy). What one site cannot fix, the
weight layers after it can: their weights learn to compensate the errors of the sites before
them. This is post-training quantisation's reconstruction (AdaRound, BRECQ, AdaQuant; the weights
here stay in floating point, so they move continuously) applied to the whole SNN:

.. math::

    \min_{W, \Delta}\ \frac{\sum_i \lVert f_\text{SNN}(x_i; W, \Delta) - f_\text{ANN}(x_i)\rVert^2}
    {\sum_i \lVert f_\text{ANN}(x_i)\rVert^2}

over the calibration batches, with Adam. Gradients pass every SFN site straight through inside its
output range (``∂o/∂x = 1``) and reach its step ``Δ`` as in LSQ: with ``q`` the fired level in
steps, ``∂o/∂Δ = q − x/Δ`` inside the range and ``q`` where the site clips. Steps only grow
(``Δ ≥ Δ_allocated``), so the spike counts, and the energy the allocation budgeted, do not rise.

The forward value is always the site's exact fire rule. A quarter of the calibration rows is held
out: every ``eval_every`` steps the held-out error is measured with the exact network, and the
weights and steps with the lowest held-out error are kept (the allocated network when no step
improved it), so reconstruction cannot make the calibration-set fidelity worse and stops fitting
what does not generalise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import check_positive_float
from ..functional import broadcast_threshold
from ..neuron import SFNode
from ..utils import call_model, model_device, output_tensors
from .observers import CalibrationError

__all__ = ["reconstruct", "Reconstruction", "DEFAULT_RECONSTRUCTION_STEPS"]

#: Optimiser steps ``sj_sfn.convert`` runs by default (``reconstruct=``).
DEFAULT_RECONSTRUCTION_STEPS = 100

#: Cache the ANN's outputs when all of them hold at most this many elements; recompute them otherwise.
_CACHE_ELEMENTS = 1 << 26


@dataclass
class Reconstruction:
    """What :func:`reconstruct` did: the relative output error ``‖f_SNN − f_ANN‖ / ‖f_ANN‖`` on the held-out rows
    (``None`` without held-out rows) and on the rows it fitted, before and after, and the step it kept."""

    steps: int
    kept_step: int
    held_out_before: float | None
    held_out_after: float | None
    fit_before: float
    fit_after: float
    seconds: float
    rows_fitted: int
    rows_held_out: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- batches ------------------------------------------------------------------------------


def _rows(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    if isinstance(batch, list | tuple) and batch:
        return _rows(batch[0])
    raise TypeError(f"cannot split a calibration batch of type {type(batch).__name__}")


def _take(batch: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a batch (a tensor, an ``(x, y, ...)`` tuple or a dict of tensors)."""
    if torch.is_tensor(batch):
        return batch[idx.to(batch.device)] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: _take(v, idx) if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_take(v, idx) if torch.is_tensor(v) else v for v in batch)
    return batch


def _split(batches: list[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    """Every batch's rows into fitted and held-out ones (every ``round(1/holdout)``-th row is held out)."""
    if holdout <= 0:
        return batches, []
    every = max(2, round(1.0 / holdout))
    fit, held = [], []
    for b in batches:
        n = _rows(b)
        idx = torch.arange(n)
        out = idx % every == every - 1
        if out.any() and (~out).any():
            fit.append(_take(b, idx[~out]))
            held.append(_take(b, idx[out]))
        else:
            fit.append(b)
    return fit, held


def _mask(batch: Any, out: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of a token batch, shaped to weight ``out`` (``None``: every element counts)."""
    if not isinstance(batch, dict) or not torch.is_tensor(batch.get("attention_mask")):
        return None
    m = batch["attention_mask"]
    if out.dim() < 2 or tuple(out.shape[:2]) != tuple(m.shape):
        return None
    return m.to(device=out.device, dtype=out.dtype).reshape(*m.shape, *([1] * (out.dim() - 2)))


def _target(model: nn.Module, batch: Any, device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = output_tensors(call_model(model, batch, model_device(model)))
    if not outs:
        raise CalibrationError(f"reconstruction needs a model that returns tensors; {type(model).__name__} returned none")
    return [o.detach().to(device) for o in outs]


def _sq_errors(outs: list[torch.Tensor], refs: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ‖out − ref‖², Σ‖ref‖²)`` over every output tensor (padding masked out)."""
    if len(outs) != len(refs):
        raise CalibrationError(f"the SNN returned {len(outs)} output tensors and the ANN {len(refs)}")
    err = ref2 = 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise CalibrationError(f"SNN output of shape {tuple(o.shape)} against the ANN's {tuple(r.shape)}")
        d2, r2 = (o.float() - r.float()) ** 2, r.float() ** 2
        if mask is not None and mask.shape[:2] == o.shape[:2]:
            d2, r2 = d2 * mask, r2 * mask
        err = err + d2.sum()
        ref2 = ref2 + r2.sum()
    return err, ref2


# -- straight-through sites ------------------------------------------------------------------


class _TrainableSite:
    r"""An SFN site whose step learns (``Δ = Δ_0·e^{a}``, ``a ≥ 0``) and whose output passes gradients.

    Forward value: the node's exact fire rule at ``Δ``. Gradient: ``o = Δ·(q + u − sg(u))`` with
    ``q`` the fired level in steps (a constant) and ``u = clip(x/Δ, lo, hi)`` the input in steps
    clipped to the site's range, so ``∂o/∂x = 1`` inside the range and ``∂o/∂Δ = q − u``.
    """

    def __init__(self, node: SFNode, learn: bool):
        if node.step_mode != "s":
            raise CalibrationError("reconstruction needs single-step sites (step_mode='s'), as sj_sfn.convert makes them")
        self.node = node
        self.theta0 = (node.theta_pos.detach().clone(), None if node.theta_neg is None else node.theta_neg.detach().clone())
        # fixed steps (learn=False): no gradient is taken for them, so none accumulates step after step
        self.log_pos = torch.zeros_like(self.theta0[0], requires_grad=learn)
        self.log_neg = None if self.theta0[1] is None else torch.zeros_like(self.theta0[1], requires_grad=learn)
        self.top = float(node.max_spikes if node.levels is None else node.levels[-1])
        self.learn = learn  # steps fixed: the node's thresholds (and its fast-fire plan) stay untouched

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_pos] + ([] if self.log_neg is None else [self.log_neg])

    def clamp_(self) -> None:
        """Steps never fall below the allocated ones: spike counts (and energy) do not rise."""
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(min=0.0)

    def write(self) -> None:
        """Put the current steps into the node's thresholds."""
        with torch.no_grad():
            self.node.theta_pos.copy_(self.theta0[0] * self.log_pos.exp())
            if self.log_neg is not None:
                self.node.theta_neg.copy_(self.theta0[1] * self.log_neg.exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node = self.node
        if self.learn:
            self.write()
        with torch.no_grad():
            exact = type(node).forward(node, x.detach())
        lam = node.lam
        sp = broadcast_threshold(self.theta0[0] * self.log_pos.exp() * lam, x, node.channel_dim).to(x.dtype)
        if self.log_neg is None:
            s, lo = sp, 0.0
        else:
            sn = broadcast_threshold(self.theta0[1] * self.log_neg.exp() * lam, x, node.channel_dim).to(x.dtype)
            s, lo = torch.where(x >= 0, sp, sn), -self.top
        u = x / s
        if node.ceiling is not None:
            u = torch.minimum(u, node.ceiling.to(x.dtype) / s)
        u = u.clamp(lo, self.top)
        return exact * (s / s.detach()) + s * u - (s * u).detach()


# -- reconstruction -----------------------------------------------------------------------------


def _trainable_parameters(snn: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, vectors)``: floating-point parameters of every module except embeddings (token tables are
    looked up, not read through a site: fitting them to the calibration tokens would only overfit)."""
    skip = {id(p) for m in snn.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) for p in m.parameters(recurse=False)}
    weights, vectors, seen = [], [], set()
    for p in snn.parameters():
        if id(p) in skip or id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        (weights if p.dim() > 1 else vectors).append(p)
    return weights, vectors


def _groups(weights: list[nn.Parameter], vectors: list[nn.Parameter], lr: float, vector_lr: float) -> list[dict]:
    """One Adam group per tensor, its learning rate ``lr·rms(W)``: a step moves every tensor by the same *relative*
    amount, whatever the model's weight scale (a vector that is all zeros takes the median weight's scale)."""
    with torch.no_grad():
        rms = {id(p): float(p.float().pow(2).mean().sqrt()) for p in weights + vectors}
    typical = sorted(rms[id(p)] for p in weights)[len(weights) // 2] if weights else 1.0
    groups = [{"params": [p], "lr": lr * (rms[id(p)] or typical)} for p in weights]
    groups += [{"params": [p], "lr": vector_lr * (rms[id(p)] or typical)} for p in vectors]
    return groups


def _error(snn: nn.Module, batches: list[Any], refs: list[list[torch.Tensor]] | None, ann: nn.Module,
           device: torch.device) -> float:
    err = ref2 = 0.0
    with torch.no_grad():
        for i, b in enumerate(batches):
            target = refs[i] if refs is not None else _target(ann, b, device)
            outs = output_tensors(call_model(snn, b, device))
            e, r = _sq_errors(outs, target, _mask(b, outs[0]) if outs else None)
            err, ref2 = err + float(e), ref2 + float(r)
    return math.sqrt(err / max(ref2, 1e-30))


def reconstruct(
    snn: nn.Module,
    ann: nn.Module,
    loader: Iterable,
    *,
    steps: int = DEFAULT_RECONSTRUCTION_STEPS,
    lr: float = 1e-4,
    vector_lr: float = 5e-4,
    threshold_lr: float = 0.0,
    holdout: float = 0.25,
    eval_every: int = 10,
    num_batches: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Reconstruction:
    """Fit ``snn``'s weights and SFN steps to ``ann``'s outputs on ``loader`` (in place; see the module doc).

    :param snn: a converted network (thresholds already set, e.g. by :func:`allocate_thresholds`)
    :param ann: the network it was converted from (only read)
    :param loader: calibration batches (tensors, ``(x, y)`` pairs, or dicts for Hugging Face models)
    :param steps: Adam steps, one calibration batch (its fitted rows) each
    :param lr: learning rate of the weight matrices and kernels, relative to each tensor's rms (Adam: about the
        relative change of a weight per step)
    :param vector_lr: the same for biases and normalisation parameters
    :param threshold_lr: learning rate of the sites' log-steps (0, the default: the steps stay as allocated; measured
        on MobileNetV2, learning them did not help the held-out error)
    :param holdout: share of every batch's rows held out to choose the step to keep (0: keep the last step)
    :param eval_every: held-out measurement every this many steps
    :returns: a :class:`Reconstruction` (errors before and after, the step kept)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    lr, vector_lr = check_positive_float(lr, "lr"), check_positive_float(vector_lr, "vector_lr")
    if not isinstance(threshold_lr, int | float) or isinstance(threshold_lr, bool) or not threshold_lr >= 0:
        raise ValueError(f"threshold_lr must be a number >= 0, got {threshold_lr!r}")
    if not isinstance(holdout, int | float) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    sites = [_TrainableSite(m, threshold_lr > 0) for m in snn.modules() if isinstance(m, SFNode)]
    if not sites:
        raise ValueError("the model has no SFNode sites: convert it first (sj_sfn.convert)")
    device = model_device(snn) if device is None else torch.device(device)
    t_start = time.time()
    batches = []
    for b in loader:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(b)
    if not batches:
        raise CalibrationError("the calibration loader is empty: give it at least one batch")
    fit, held = _split(batches, holdout)
    refs_fit = [_target(ann, b, device) for b in fit]
    cache = sum(t.numel() for r in refs_fit for t in r) <= _CACHE_ELEMENTS
    refs_held = [_target(ann, b, device) for b in held] if cache else None
    if not cache:
        refs_fit = None
    rows_fit, rows_held = sum(_rows(b) for b in fit), sum(_rows(b) for b in held)
    was_training = snn.training
    snn.eval()
    weights, vectors = _trainable_parameters(snn)
    flags = {id(p): p.requires_grad for p in weights + vectors}
    site_params = [p for s in sites for p in s.parameters()]

    def state() -> list[torch.Tensor]:
        return [p.detach().clone() for p in weights + vectors + site_params]

    def restore(saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(weights + vectors + site_params, saved):
                p.copy_(v)
        for s in sites:
            s.write()

    def measure() -> float:
        if held:
            return _error(snn, held, refs_held, ann, device)
        return _error(snn, fit, refs_fit, ann, device)

    fit_before = _error(snn, fit, refs_fit, ann, device)
    best = held_before = measure() if held else fit_before
    best_state, best_step = state(), 0
    groups = _groups(weights, vectors, lr, vector_lr)
    if threshold_lr > 0:
        groups.append({"params": site_params, "lr": threshold_lr})
    order = torch.Generator().manual_seed(seed)
    try:
        for p in weights + vectors:
            p.requires_grad_(True)
        for s in sites:
            s.node.forward = s.forward  # the straight-through forward, on this instance only
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        bar = tqdm(range(steps), desc="reconstructing", disable=not progress or steps == 0, leave=False)
        for step in bar:
            i = int(torch.randint(len(fit), (1,), generator=order))
            batch = fit[i]
            target = refs_fit[i] if refs_fit is not None else _target(ann, batch, device)
            with torch.enable_grad():
                outs = output_tensors(call_model(snn, batch, device))
                err, ref2 = _sq_errors(outs, target, _mask(batch, outs[0]) if outs else None)
                loss = err / ref2.clamp_min(1e-30)
                if not torch.isfinite(loss):
                    raise CalibrationError("reconstruction: the output error is not finite (NaN or inf in the SNN's output)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            for s in sites:
                s.clamp_()
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                for s in sites:
                    del s.node.forward
                    s.write()
                current = measure()
                for s in sites:
                    s.node.forward = s.forward
                if current < best:
                    best, best_state, best_step = current, state(), step + 1
                bar.set_postfix(err=f"{current:.4f}", best=f"{best:.4f}")
    finally:
        for s in sites:
            s.node.__dict__.pop("forward", None)
        for p in weights + vectors:
            p.requires_grad_(flags[id(p)])
            p.grad = None
        restore(best_state)
        snn.train(was_training)
    return Reconstruction(
        steps=steps, kept_step=best_step, held_out_before=held_before if held else None, held_out_after=best if held else None,
        fit_before=fit_before, fit_after=_error(snn, fit, refs_fit, ann, device), seconds=time.time() - t_start,
        rows_fitted=rows_fit, rows_held_out=rows_held,
    )

