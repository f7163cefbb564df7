"""Tune the SFN scaling factor λ by Bayesian optimisation with Ax (docs/method.md, "Tuning λ").

A converted network is calibrated once; a trial only rescales its thresholds
(:func:`~sj_sfn.neuron.set_lambda`, ``θ_i = λ·θ·y_i``) and makes one pass over the validation
loader, which yields the metric (top-1 accuracy in percent by default) and the energy ratio
``E_SNN / E_ANN`` (:func:`~sj_sfn.energy.measure_energy`) together. Objectives:

- ``'accuracy'``: maximise ``metric`` (ties go to the lower energy ratio);
- ``'tradeoff'``: maximise ``metric − β · energy_ratio``;
- ``'pareto'``: both objectives; the result holds the non-dominated trials.

The search runs over ``log λ`` in ``bounds`` (Ax ``RangeParameterConfig(scaling='log')``), one
dimension per λ group. Ax is an optional dependency: ``pip install 'sj-sfn[tune]'``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .distributed import all_reduce_max, all_reduce_sum, broadcast_object, is_distributed, is_main
from .energy import E_MAC_PJ, measure_energy
from .evaluation import all_reduce_report
from .neuron import SFNode, set_lambda, sfn_nodes
from .utils import json_safe

__all__ = ["OBJECTIVES", "Trial", "TuneResult", "tune_lambda", "pareto_front", "evaluate_lambda", "site_groups", "current_lams"]

OBJECTIVES = ("accuracy", "tradeoff", "pareto")

Metric = Callable[[nn.Module, Iterable], float]


@dataclass
class Trial:
    """One evaluated λ setting.

    ``lam`` is the λ of a one-dimensional search, or the geometric mean of the group λs
    (weighted by the number of sites per group) when groups are searched separately.
    ``score`` is what the search maximised (``metric`` or ``metric − β·energy_ratio``).
    """

    index: int
    lam: float
    group_lams: dict[str, float]
    metric: float
    energy_ratio: float
    score: float
    seconds: float
    ax_seconds: float
    status: str = "completed"  # or "failed"
    reason: str = ""

    @property
    def accuracy(self) -> float:
        """Alias of ``metric`` (the default metric is top-1 accuracy in percent)."""
        return self.metric

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Completed trials not dominated in (metric ↑, energy ratio ↓), sorted by energy ratio.

    ``a`` dominates ``b`` when ``a.metric >= b.metric`` and ``a.energy <= b.energy`` with at
    least one strict; of identical points the earliest trial is kept.
    """
    done = [t for t in trials if t.ok and math.isfinite(t.energy_ratio)]
    front: list[Trial] = []
    for t in done:
        dominated = False
        for o in done:
            if o is t:
                continue
            better_eq = o.metric >= t.metric and o.energy_ratio <= t.energy_ratio
            strict = o.metric > t.metric or o.energy_ratio < t.energy_ratio
            if better_eq and (strict or o.index < t.index):
                dominated = True
                break
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.energy_ratio, -t.metric))


@dataclass
class TuneResult:
    """The outcome of :func:`tune_lambda`.

    :ivar best_lam: chosen λ (geometric mean of ``best_group_lams`` for a grouped search)
    :ivar best_group_lams: chosen λ per group (``{"lam": λ}`` for a one-dimensional search)
    :ivar trials: every trial in order, failed ones included (``status='failed'``)
    :ivar pareto: the non-dominated completed trials (metric ↑, energy ratio ↓)
    :ivar failed: how many trials failed (non-finite metric or energy)
    :ivar groups: site names per group (``None`` = every SFN site)
    """

    best_lam: float
    best_group_lams: dict[str, float]
    best_index: int
    trials: list[Trial]
    pareto: list[Trial]
    failed: int
    objective: str
    beta: float
    bounds: tuple[float, float]
    log_scale: bool
    seed: int
    metric_name: str
    groups: dict[str, list[str] | None]
    seconds: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Trial:
        """The chosen trial."""
        return next(t for t in self.trials if t.index == self.best_index)

    @property
    def eval_seconds(self) -> float:
        """Time spent evaluating the network, over all trials."""
        return sum(t.seconds for t in self.trials)

    @property
    def ax_seconds(self) -> float:
        """Time spent inside Ax (generating and completing trials), over all trials."""
        return sum(t.ax_seconds for t in self.trials)

    def apply(self, snn: nn.Module) -> nn.Module:
        """Set the chosen λ(s) on ``snn`` in place (``set_lambda`` per group); returns ``snn``."""
        for g, lam in self.best_group_lams.items():
            set_lambda(snn, lam, names=self.groups.get(g))
        return snn

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_lam": self.best_lam,
            "best_group_lams": dict(self.best_group_lams),
            "best_index": self.best_index,
            "best": asdict(self.best),
            "objective": self.objective,
            "beta": self.beta,
            "bounds": list(self.bounds),
            "log_scale": self.log_scale,
            "seed": self.seed,
            "metric": self.metric_name,
            "groups": self.groups,
            "failed": self.failed,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "eval_seconds": self.eval_seconds,
            "ax_seconds": self.ax_seconds,
            "trials": [asdict(t) for t in self.trials],
            "pareto": [t.index for t in self.pareto],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneResult:
        trials = [Trial(**t) for t in d["trials"]]
        by_index = {t.index: t for t in trials}
        return cls(
            best_lam=d["best_lam"], best_group_lams=dict(d["best_group_lams"]), best_index=d["best_index"], trials=trials,
            pareto=[by_index[i] for i in d["pareto"]], failed=d["failed"], objective=d["objective"], beta=d["beta"],
            bounds=tuple(d["bounds"]), log_scale=d["log_scale"], seed=d["seed"], metric_name=d["metric"],
            groups=dict(d["groups"]), seconds=d["seconds"], stopped_early=d.get("stopped_early", False),
            extra=dict(d.get("extra", {})),
        )

    def to_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` as JSON (non-finite numbers become ``null``); returns the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(json_safe(self.to_dict()), f, indent=2)
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TuneResult:
        with open(path) as f:
            d = json.load(f)
        for t in d["trials"]:
            for k in ("metric", "energy_ratio", "score"):
                if t[k] is None:
                    t[k] = math.nan
        return cls.from_dict(d)

    def table(self) -> str:
        """The trials as a plain-text table, the chosen one marked with ``*``."""
        names = list(self.best_group_lams)
        grouped = len(names) > 1 or names != ["lam"]
        head = ["#", "λ"] + ([f"λ[{n}]" for n in names] if grouped else []) + [self.metric_name, "energy", "score", "s", ""]
        rows = [head]
        front = {t.index for t in self.pareto}
        for t in self.trials:
            mark = "*" if t.index == self.best_index else ("p" if t.index in front and self.objective == "pareto" else "")
            rows.append(
                [str(t.index), f"{t.lam:.4f}"] + ([f"{t.group_lams[n]:.4f}" for n in names] if grouped else [])
                + [f"{t.metric:.2f}", f"{t.energy_ratio:.4f}", f"{t.score:.3f}", f"{t.seconds:.2f}", mark or t.reason[:30]]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def plot(self, path: str | os.PathLike, sweep: Sequence[Mapping[str, float]] | None = None, title: str | None = None) -> str:
        """PNG in the style of the paper's Figure 3: metric and energy ratio against λ.

        Left: the metric (left axis) and energy ratio (right axis) of every trial against λ
        (log axis when searched on a log scale), the chosen point marked; ``sweep`` (a list of
        ``{"lam", "metric", "energy_ratio"}``, e.g. a grid) is drawn as lines. Right: metric
        against energy ratio with the Pareto front. Returns the path.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        done = sorted((t for t in self.trials if t.ok), key=lambda t: t.lam)
        fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
        ax2 = ax1.twinx()
        c_acc, c_en = "tab:blue", "tab:red"
        if sweep:
            s = sorted(sweep, key=lambda r: r["lam"])
            ax1.plot([r["lam"] for r in s], [r["metric"] for r in s], "-", color=c_acc, alpha=0.45, lw=1.5, label=f"{self.metric_name} (grid)")
            ax2.plot([r["lam"] for r in s], [r["energy_ratio"] for r in s], "-", color=c_en, alpha=0.45, lw=1.5, label="energy ratio (grid)")
        ax1.plot([t.lam for t in done], [t.metric for t in done], "o", color=c_acc, ms=5, label=f"{self.metric_name} (trials)")
        ax2.plot([t.lam for t in done], [t.energy_ratio for t in done], "s", color=c_en, ms=4, label="energy ratio (trials)")
        b = self.best
        ax1.plot([b.lam], [b.metric], "*", color="k", ms=16, zorder=5, label=f"chosen λ={b.lam:.3g}")
        ax1.axvline(b.lam, color="k", ls=":", lw=1)
        if self.log_scale:
            ax1.set_xscale("log")
        ax1.set_xlabel("λ" if list(self.best_group_lams) == ["lam"] else "λ (geometric mean over groups)")
        ax1.set_ylabel(self.metric_name, color=c_acc)
        ax2.set_ylabel("energy ratio E_SNN / E_ANN", color=c_en)
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        ax1.set_title(title or f"λ search ({self.objective}, {len(self.trials)} trials)")
        ax3.plot([t.energy_ratio for t in done], [t.metric for t in done], "o", color="0.6", ms=5, label="trials")
        fr = self.pareto
        ax3.plot([t.energy_ratio for t in fr], [t.metric for t in fr], "o-", color="tab:green", ms=6, label="Pareto front")
        ax3.plot([b.energy_ratio], [b.metric], "*", color="k", ms=16, zorder=5, label="chosen")
        ax3.set_xlabel("energy ratio")
        ax3.set_ylabel(self.metric_name)
        ax3.legend(fontsize=7, loc="best")
        ax3.set_title("accuracy vs energy")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# -- groups ------------------------------------------------------------------------------


def _site_kinds(snn: nn.Module) -> dict[str, str]:
    """SFN site name → kind for an SFormer (``sj_sfn.sformer.site_modules``); empty for other models."""
    from .sformer import site_modules

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


def tune_lambda(
    snn: nn.Module,
    val_loader: Iterable,
    metric: Metric | None = None,
    objective: str = "accuracy",
    beta: float = 10.0,
    trials: int = 20,
    bounds: tuple[float, float] = (0.05, 1.0),
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
    :param bounds: ``(low, high)`` of λ, ``0 < low < high``
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
    low, high = _check_bounds(bounds)
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
