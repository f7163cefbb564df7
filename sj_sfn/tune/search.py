"""The λ search: Ax's ``Client`` over log λ (one dimension per group), one validation pass per trial.

A converted network is calibrated once; a trial only rescales its thresholds
(:func:`~sj_sfn.neuron.set_lambda`, ``θ_i = λ·θ·y_i``) and makes one pass over the validation
loader, which yields the metric and the energy ratio together (:func:`evaluate_lambda`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..distributed import all_reduce_max, all_reduce_sum, broadcast_object, is_distributed, is_main
from ..energy import E_MAC_PJ, measure_energy
from ..evaluation import all_reduce_report
from ..neuron import SFNode, set_lambda, sfn_nodes
from .result import Trial, TuneResult, pareto_front

__all__ = ["OBJECTIVES", "Metric", "tune_lambda", "evaluate_lambda", "site_groups", "current_lams"]

OBJECTIVES = ("accuracy", "tradeoff", "pareto")

Metric = Callable[[nn.Module, Iterable], float]


def _site_kinds(snn: nn.Module) -> dict[str, str]:
    """SFN site name → kind for an SFormer (``sj_sfn.sformer.site_modules``); empty for other models."""
    from ..sformer import site_modules

    return {name: kind for name, kind, m in site_modules(snn) if isinstance(m, SFNode)}


def site_groups(snn: nn.Module, groups: str | Mapping[str, str | Sequence[str]] | None) -> dict[str, list[str] | None]:
    """Resolve a ``groups`` argument to ``{group: [SFN site names]}``.

    - ``None``: one group ``"lam"`` covering every site (value ``None``);
    - ``"kind"``: one group per site kind of an SFormer (``qkv_in``, ``proj_in``, ``fc1_in``,
      ``fc2_in``, ``q``, ``k``, ``v``, ``attn``, ...);
    - a mapping ``{group: patterns}``: a site belongs to a group when its name matches one of
      the ``fnmatch`` patterns or its SFormer kind equals one. A site in two groups is an
      error; a group matching nothing is an error; sites in no group keep their λ.
    """
    names = [n for n, _ in sfn_nodes(snn)]
    if not names:
        raise ValueError("the model has no SFNode sites: convert it first (sj_sfn.convert)")
    if groups is None:
        return {"lam": None}
    kinds = _site_kinds(snn)
    if isinstance(groups, str):
        if groups != "kind":
            raise ValueError(f"groups must be None, 'kind' or a mapping of group -> site patterns, got {groups!r}")
        if not kinds:
            raise ValueError("groups='kind' needs an SFormer (sj_sfn.sformer.sites); give a mapping of group -> site-name patterns instead")
        out: dict[str, list[str] | None] = {}
        for n in names:
            if n in kinds:
                out.setdefault(kinds[n], []).append(n)  # type: ignore[union-attr]
        return out
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError("groups must be None, 'kind' or a non-empty mapping of group -> site patterns")
    out = {}
    owner: dict[str, str] = {}
    for g, pats in groups.items():
        if not isinstance(g, str) or not g:
            raise TypeError(f"group names must be non-empty strings, got {g!r}")
        pats = [pats] if isinstance(pats, str) else list(pats)
        members = [n for n in names if any(fnmatch.fnmatchcase(n, p) or kinds.get(n) == p for p in pats)]
        if not members:
            raise ValueError(f"λ group {g!r} matches no SFN site (patterns {pats}); sites are e.g. {names[:5]}")
        for n in members:
            if n in owner:
                raise ValueError(f"SFN site {n!r} is in two λ groups: {owner[n]!r} and {g!r}")
            owner[n] = g
        out[g] = members
    return out


# -- evaluation --------------------------------------------------------------------------


class _LabelTap:
    """Iterates a loader unchanged and keeps the labels of each batch."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.labels: list[torch.Tensor] = []

    def __iter__(self):
        self.labels = []
        for batch in self.loader:
            if not (isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
                raise TypeError("the default accuracy metric needs (x, y) batches; pass metric=callable(model, loader) otherwise")
            self.labels.append(batch[1])
            yield batch

    def __len__(self):
        return len(self.loader)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_lambda(
    snn: nn.Module,
    loader: Iterable,
    metric: Metric | None = None,
    ann_macs: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """``(metric, energy_ratio)`` of ``snn`` as it is, in one pass when ``metric`` is ``None``.

    The default metric is top-1 accuracy in percent, read off the same forward passes that
    :func:`~sj_sfn.energy.measure_energy` counts. ``ann_macs`` (per sample) replaces the
    SNN's own dense MACs as the denominator: ``ratio = E_SNN / (4.6 pJ · ann_macs)``.

    Under ``torch.distributed`` each rank passes its shard of the data; accuracy and energy
    are all-reduced (``100·Σcorrect/Σtotal``, sample-weighted counts). A custom ``metric`` must
    itself return the value over all ranks; one that differs between ranks is an error.
    """
    if metric is None:
        tap = _LabelTap(loader)
        preds: list[torch.Tensor] = []
        h = snn.register_forward_hook(lambda m, i, o: preds.append(o.detach().argmax(-1).cpu()))
        try:
            rep = measure_energy(snn, tap, device=device)
        finally:
            h.remove()
        if len(preds) != len(tap.labels):
            raise RuntimeError(f"expected one forward per batch, saw {len(preds)} for {len(tap.labels)} batches")
        y = torch.cat([t.reshape(-1).cpu() for t in tap.labels])
        p = torch.cat([t.reshape(-1) for t in preds])
        correct, total = all_reduce_sum([float((p == y).sum()), float(y.numel())], device)
        value = 100.0 * correct / total if total else math.nan
    else:
        value = metric(snn, loader)
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric must return a real number, got {type(value).__name__}")
        value = float(value)
        if is_distributed():
            hi, neg_lo = all_reduce_max([value, -value], device)
            if not hi == -neg_lo and not (math.isnan(hi) and math.isnan(neg_lo)):
                raise ValueError(f"metric returned values from {-neg_lo} to {hi} on different ranks: under torch.distributed "
                                 "it must reduce over all ranks itself (e.g. dist.all_reduce) and return the global value")
        rep = measure_energy(snn, loader, device=device)
    rep = all_reduce_report(rep, device)
    ratio = rep.ratio if ann_macs is None else rep.snn_energy_pj / (E_MAC_PJ * ann_macs)
    return value, float(ratio)


def current_lams(snn: nn.Module) -> dict[str, float]:
    """``{site name: λ}`` of every SFN site of ``snn``."""
    return {n: float(m.lam.item()) for n, m in sfn_nodes(snn)}


def _restore(snn: nn.Module, lams: Mapping[str, float]) -> None:
    for n, m in sfn_nodes(snn):
        if n in lams:
            m.set_lambda(lams[n])


# -- validation --------------------------------------------------------------------------


def _check_bounds(bounds: Any) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be a pair of numbers (low, high), got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        raise ValueError(f"λ bounds must be finite and > 0, got ({low}, {high})")
    if low >= high:
        raise ValueError(f"λ bounds need low < high, got ({low}, {high})")
    return low, high


def _check_loader(loader: Iterable) -> None:
    if loader is None:
        raise ValueError("val_loader is None: give a validation loader (never the test set)")
    if isinstance(loader, Iterator):  # iter(DataLoader) would start its workers just to check
        raise TypeError("val_loader must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if n == 0:
        raise ValueError("the validation loader is empty: give it at least one batch")


@contextlib.contextmanager
def _quiet_ax():
    """Silence Ax/BoTorch logging and numerical warnings for the duration of the search."""
    prefixes = ("ax", "botorch", "gpytorch", "linear_operator", "pyro")
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in prefixes]
    loggers = [logging.getLogger(n) for n in sorted(set(names) | set(prefixes))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _import_ax():
    try:
        with _quiet_ax():
            from ax import Client, RangeParameterConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tuning λ needs Ax: pip install 'sj-sfn[tune]' (ax-platform>=1.3)") from e
    return Client, RangeParameterConfig


def _allow_repeats(client: Any) -> None:
    """Let BO propose an already-evaluated point (answered from the cache) instead of
    redrawing up to five times and falling back to Sobol, which costs seconds per trial."""
    gs = getattr(client, "_maybe_generation_strategy", None)
    for node in getattr(gs, "_nodes", []) or []:
        if hasattr(node, "should_deduplicate"):
            node.should_deduplicate = False


def _choose_best(trials: Sequence[Trial], objective: str, front: Sequence[Trial]) -> Trial:
    done = [t for t in trials if t.ok]
    if objective == "pareto":
        # the most accurate point of the front (the front holds the cheapest for each accuracy)
        return max(front, key=lambda t: (t.metric, -t.energy_ratio, -t.index))
    return max(done, key=lambda t: (t.score, t.metric, -t.energy_ratio if math.isfinite(t.energy_ratio) else -math.inf, -t.index))


#: λ ranges: around "as calibrated" for energy-budget thresholds, the paper's range for quantile thresholds.
BUDGET_BOUNDS, QUANTILE_BOUNDS = (0.25, 4.0), (0.05, 1.0)


def default_bounds(snn: nn.Module) -> tuple[float, float]:
    """The λ search range for ``snn``: ``(0.25, 4)`` when every site runs at ``λ = 1`` (thresholds allocated for an
    energy budget, ``sj_sfn.convert``'s default: λ scales the allocated steps), else ``(0.05, 1)`` (quantile thresholds)."""
    lams = [float(m.lam) for _, m in sfn_nodes(snn)]
    return BUDGET_BOUNDS if lams and all(abs(v - 1.0) < 1e-9 for v in lams) else QUANTILE_BOUNDS


def tune_lambda(
    snn: nn.Module,
    val_loader: Iterable,
    metric: Metric | None = None,
    objective: str = "accuracy",
    beta: float = 10.0,
    trials: int = 20,
    bounds: tuple[float, float] | None = None,
    log_scale: bool = True,
    groups: str | Mapping[str, str | Sequence[str]] | None = None,
    seed: int = 0,
    timeout: float | None = None,
    ann: nn.Module | None = None,
    progress: bool = True,
    init_trials: int | None = None,
    device: torch.device | str | None = None,
    max_repeats: int = 3,
) -> TuneResult:
    """Search λ (or one λ per group) that maximises the objective on ``val_loader``.

    Each trial sets ``θ_i = λ·θ·y_i`` on the SFN sites (no recalibration) and makes one pass
    over ``val_loader`` to get ``metric`` and ``energy_ratio = E_SNN / E_ANN``; the score is
    ``metric`` (``objective='accuracy'``), ``metric − β·energy_ratio`` (``'tradeoff'``), or
    both objectives (``'pareto'``). A trial whose metric or energy is NaN/Inf is marked failed
    and the search goes on. The caller's λs are restored afterwards: apply the choice with
    ``result.apply(snn)``.

    :param snn: a converted network with :class:`~sj_sfn.SFNode` sites
    :param val_loader: validation batches (``(x, y)`` for the default metric) — never the test set
    :param metric: ``callable(model, loader) -> float`` to maximise; default top-1 accuracy (%)
    :param objective: ``'accuracy'``, ``'tradeoff'`` or ``'pareto'``
    :param beta: weight of the energy ratio in ``'tradeoff'`` (metric units per unit of ratio)
    :param trials: number of trials (Sobol initialisation, then Gaussian-process BO)
    :param bounds: ``(low, high)`` of λ, ``0 < low < high``; ``None``: :func:`default_bounds` of ``snn``
    :param log_scale: search ``log λ`` (default) rather than λ
    :param groups: ``None`` (one λ), ``'kind'`` (SFormer site kinds) or ``{group: site patterns}``
    :param seed: seeds Ax: the same seed and data give the same trials
    :param timeout: start no new trial after this many seconds (the first trial always runs)
    :param ann: the source ANN: its MACs (measured once) become the energy denominator
    :param progress: a progress bar per trial with the current best
    :param init_trials: quasi-random initial trials before BO (default ``min(trials, 2·dims+3)``)
    :param device: move inputs here
    :param max_repeats: stop early (converged) after BO proposes this many already-evaluated
        points in a row; a repeated point is answered from the cache, not re-evaluated

    Under ``torch.distributed`` (``torchrun``) every rank calls this with its shard of the
    validation data (:func:`~sj_sfn.distributed.shard_loader`): rank 0 runs Ax, each trial's λ
    is broadcast, metric and energy are all-reduced, and every rank returns the same result.
    """
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, got {type(snn).__name__}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    trials = int(trials)
    low, high = _check_bounds(default_bounds(snn) if bounds is None else bounds)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if timeout is not None and (not isinstance(timeout, numbers.Real) or not timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable(model, loader) -> float, got {type(metric).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    _check_loader(val_loader)
    group_sites = site_groups(snn, groups)
    gnames = list(group_sites)
    pnames = {g: f"lam_{i}" for i, g in enumerate(gnames)}
    sizes = {g: (len(s) if s is not None else len(sfn_nodes(snn))) for g, s in group_sites.items()}
    total_sites = sum(sizes.values())
    dims = len(gnames)
    if init_trials is None:
        init_trials = min(trials, 2 * dims + 3)
    if not 1 <= init_trials <= trials:
        raise ValueError(f"init_trials must be in [1, trials], got {init_trials}")
    metric_name = "accuracy" if metric is None else getattr(metric, "__name__", "metric")
    from tqdm.auto import tqdm

    Client, RangeParameterConfig = _import_ax()
    main = is_main()
    t_start = time.perf_counter()
    saved = current_lams(snn)
    was_training = snn.training
    snn.eval()
    records: list[Trial] = []
    stopped = converged = False
    ann_macs = None
    try:
        with _quiet_ax():
            if ann is not None:
                ann_macs = all_reduce_report(measure_energy(snn, val_loader, ann=ann, device=device), device).ann_macs
            # under torch.distributed rank 0 runs Ax and hands each trial's λ (and the timeout's verdict) to the
            # other ranks; every rank evaluates its shard and the metrics are all-reduced, so all ranks agree
            client = None
            if main:
                client = Client(random_seed=int(seed))
                client.configure_experiment(
                    parameters=[
                        RangeParameterConfig(name=pnames[g], bounds=(low, high), parameter_type="float",
                                             scaling="log" if log_scale else "linear")
                        for g in gnames
                    ],
                    name="sj_sfn_lambda",
                )
                if objective == "pareto":
                    client.configure_optimization(objective="metric, -energy")
                else:
                    client.configure_optimization(objective="score")
                client.configure_generation_strategy(
                    method="fast", initialization_budget=init_trials, initialization_random_seed=int(seed),
                    initialize_with_center=True,
                )
                _allow_repeats(client)
            cache: dict[tuple[float, ...], tuple[float, float]] = {}
            repeats = 0
            bar = tqdm(total=trials, desc="tuning λ", disable=not (progress and main), leave=False)
            for _ in range(trials):
                t0 = time.perf_counter()
                idx, glams = -1, {}
                timed_out = bool(records) and timeout is not None and t0 - t_start > timeout
                if client is not None and not timed_out:
                    ((idx, params),) = client.get_next_trials(max_trials=1).items()
                    glams = {g: float(params[pnames[g]]) for g in gnames}
                timed_out, idx, glams = broadcast_object((timed_out, idx, glams))
                if timed_out:
                    stopped = True
                    break
                ax_s = time.perf_counter() - t0
                for g, lam in glams.items():
                    set_lambda(snn, lam, names=group_sites[g])
                key = tuple(round(glams[g], 12) for g in gnames)
                t1 = time.perf_counter()
                if key in cache:  # BO asked for a point it already has: it has converged
                    (value, ratio), repeats = cache[key], repeats + 1
                else:
                    value, ratio = evaluate_lambda(snn, val_loader, metric, ann_macs=ann_macs, device=device)
                    cache[key], repeats = (value, ratio), 0
                secs = time.perf_counter() - t1
                lam = math.exp(sum(sizes[g] * math.log(v) for g, v in glams.items()) / total_sites)
                score = value - beta * ratio if objective == "tradeoff" else value
                t2 = time.perf_counter()
                if math.isfinite(value) and math.isfinite(ratio):
                    raw = {"metric": value, "energy": ratio} if objective == "pareto" else {"score": score}
                    if client is not None:
                        client.complete_trial(idx, raw_data=raw)
                    rec = Trial(idx, lam, glams, value, ratio, score, secs, 0.0)
                else:
                    why = f"non-finite {'metric' if not math.isfinite(value) else 'energy ratio'}"
                    if client is not None:
                        client.mark_trial_failed(idx, failed_reason=why)
                    rec = Trial(idx, lam, glams, value, ratio, math.nan, secs, 0.0, status="failed", reason=why)
                rec.ax_seconds = ax_s + time.perf_counter() - t2
                if repeats:
                    rec.reason = "repeat"
                records.append(rec)
                if progress and main and any(t.ok for t in records):
                    b = _choose_best(records, objective, pareto_front(records))
                    bar.set_postfix_str(f"best λ={b.lam:.3g} {metric_name}={b.metric:.2f} energy={b.energy_ratio:.3f}")
                bar.update(1)
                if repeats >= max_repeats:
                    stopped, converged = True, True
                    break
            bar.close()
    finally:
        _restore(snn, saved)
        snn.train(was_training)
    failed = sum(not t.ok for t in records)
    if failed == len(records):
        reason = records[0].reason if records else "no trial ran before the timeout"
        raise RuntimeError(f"all {len(records)} λ trials failed ({reason}): check the metric and the model")
    front = pareto_front(records)
    best = _choose_best(records, objective, front)
    return TuneResult(
        best_lam=best.lam, best_group_lams=dict(best.group_lams), best_index=best.index, trials=records, pareto=front,
        failed=failed, objective=objective, beta=float(beta), bounds=(low, high), log_scale=bool(log_scale), seed=int(seed),
        metric_name=metric_name, groups=group_sites, seconds=time.perf_counter() - t_start, stopped_early=stopped,
        extra={"init_trials": init_trials, "ann_macs": ann_macs, "converged": converged},
    )
