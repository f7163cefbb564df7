"""What a λ search returns: every trial, the Pareto front, the choice; JSON round trip; a table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from ..neuron import set_lambda
from ..utils import write_json

__all__ = ["Trial", "TuneResult", "pareto_front"]


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
        """Write :meth:`to_dict` as JSON, atomically (non-finite numbers become ``null``); returns the path."""
        return write_json(path, self.to_dict())

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
        """PNG in the style of the paper's Figure 3 (:func:`sj_sfn.tune.plot.plot_search`); returns the path."""
        from .plot import plot_search

        return plot_search(self, path, sweep, title)
