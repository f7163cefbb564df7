"""Accuracy and its reduction over processes: top-1 counts, ``100·Σcorrect/Σtotal``, merged energy reports.

Every function resets the network state (``spikingjelly.activation_based.functional.reset_net``)
before each batch, so a converted SNN is evaluated batch by batch as one-timestep inference.
Under ``torchrun`` each rank passes its own shard of the data (:func:`sj_sfn.distributed.shard_loader`)
and the counts are all-reduced here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from .distributed import all_reduce_sum, is_distributed
from .energy import EnergyReport, measure_energy

__all__ = ["count_correct", "accuracy", "distributed_accuracy", "all_reduce_report", "evaluate"]


@torch.no_grad()
def count_correct(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> tuple[int, int]:
    """``(correct, total)`` top-1 counts of ``model`` over ``(x, y)`` batches (network state reset per batch)."""
    from spikingjelly.activation_based import functional

    model.eval()
    correct = total = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        functional.reset_net(model)
        correct += (model(x).argmax(-1) == y).sum()  # stays on the device: one sync at the end, not per batch
        total += y.numel()
    return int(correct), total


def accuracy(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent, ``100·correct/total``, of ``model`` over a loader of ``(x, y)`` batches."""
    correct, total = count_correct(model, loader, device)
    if total == 0:
        raise ValueError("the loader is empty")
    return 100.0 * correct / total


def distributed_accuracy(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> tuple[float, int]:
    """Top-1 accuracy (%) over the union of every rank's ``loader``: ``100·Σcorrect / Σtotal``.

    Returns ``(accuracy, total samples)``. Each rank passes its own shard (:func:`~sj_sfn.distributed.shard_loader`).
    """
    correct, total = count_correct(model, loader, device)
    correct, total = all_reduce_sum([float(correct), float(total)])
    if total == 0:
        raise ValueError("the evaluation loader is empty")
    return 100.0 * correct / total, int(total)


def all_reduce_report(rep: EnergyReport, device: torch.device | str | None = None) -> EnergyReport:
    """Every rank's :class:`~sj_sfn.energy.EnergyReport` merged: each per-sample count is the sample-weighted mean
    ``x = Σ_r s_r·x_r / Σ_r s_r`` (totals, per-layer counts and firing rates alike). Unchanged without a process group.
    """
    if not is_distributed():
        return rep
    sites = sorted(rep.firing_rates)
    layer_fields = ("ann_macs", "snn_acs", "events", "macs", "firing_rate")
    values = [rep.sops, rep.events, rep.macs, rep.ann_macs, *(rep.firing_rates[k] for k in sites)]
    for layer in rep.per_layer:
        values += [math.nan if getattr(layer, f) is None else getattr(layer, f) for f in layer_fields]
    sums = all_reduce_sum([float(rep.samples), *(v * rep.samples for v in values)], device)
    total, means = sums[0], iter(v / sums[0] if sums[0] else math.nan for v in sums[1:])
    sops, events, macs, ann_macs = (next(means) for _ in range(4))
    rates = {k: next(means) for k in sites}
    layers = []
    for layer in rep.per_layer:
        merged = {f: next(means) for f in layer_fields}
        if layer.firing_rate is None:
            merged["firing_rate"] = None
        layers.append(replace(layer, **merged))
    return replace(rep, sops=sops, events=events, macs=macs, ann_macs=ann_macs, firing_rates=rates, per_layer=layers,
                   samples=int(total))


def evaluate(snn: nn.Module, loader: Iterable, ann: nn.Module | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """SNN (and ANN) top-1 accuracy and the energy ratio over ``loader``, all-reduced under ``torchrun``.

    Returns ``samples``, ``snn_accuracy``, ``snn_seconds``, ``ann_accuracy`` (with ``ann``),
    ``energy_ratio``, ``event_ratio``, and the per-sample ``sops``, ``events``, SNN and ANN MACs and
    the firing rates (the per-sample means over every process; the ratios are ``EnergyReport``'s formulas).
    """
    t0 = time.perf_counter()
    snn_acc, n = distributed_accuracy(snn, loader, device)
    out: dict[str, Any] = {"samples": n, "snn_accuracy": snn_acc, "snn_seconds": time.perf_counter() - t0}
    if ann is not None:
        out["ann_accuracy"], _ = distributed_accuracy(ann, loader, device)
    rep = all_reduce_report(measure_energy(snn, loader, ann=ann, device=device), device)
    out.update(
        energy_ratio=rep.ratio, event_ratio=rep.event_ratio, sops_per_sample=rep.sops, events_per_sample=rep.events,
        snn_macs_per_sample=rep.macs, ann_macs_per_sample=rep.ann_macs, firing_rates=rep.firing_rates,
    )
    return out
