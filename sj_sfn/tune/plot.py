"""The λ search as a picture: metric and energy ratio against λ, and the accuracy/energy Pareto front."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..utils import atomic_write

if TYPE_CHECKING:
    from .result import TuneResult

__all__ = ["plot_search"]


def plot_search(result: TuneResult, path: str | os.PathLike, sweep: Sequence[Mapping[str, float]] | None = None,
                title: str | None = None) -> str:
    """PNG in the style of the paper's Figure 3: metric and energy ratio against λ.

    Left: the metric (left axis) and energy ratio (right axis) of every trial against λ
    (log axis when searched on a log scale), the chosen point marked; ``sweep`` (a list of
    ``{"lam", "metric", "energy_ratio"}``, e.g. a grid) is drawn as lines. Right: metric
    against energy ratio with the Pareto front. Written atomically; returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done = sorted((t for t in result.trials if t.ok), key=lambda t: t.lam)
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
    ax2 = ax1.twinx()
    c_acc, c_en = "tab:blue", "tab:red"
    if sweep:
        s = sorted(sweep, key=lambda r: r["lam"])
        ax1.plot([r["lam"] for r in s], [r["metric"] for r in s], "-", color=c_acc, alpha=0.45, lw=1.5, label=f"{result.metric_name} (grid)")
        ax2.plot([r["lam"] for r in s], [r["energy_ratio"] for r in s], "-", color=c_en, alpha=0.45, lw=1.5, label="energy ratio (grid)")
    ax1.plot([t.lam for t in done], [t.metric for t in done], "o", color=c_acc, ms=5, label=f"{result.metric_name} (trials)")
    ax2.plot([t.lam for t in done], [t.energy_ratio for t in done], "s", color=c_en, ms=4, label="energy ratio (trials)")
    b = result.best
    ax1.plot([b.lam], [b.metric], "*", color="k", ms=16, zorder=5, label=f"chosen λ={b.lam:.3g}")
    ax1.axvline(b.lam, color="k", ls=":", lw=1)
    if result.log_scale:
        ax1.set_xscale("log")
    ax1.set_xlabel("λ" if list(result.best_group_lams) == ["lam"] else "λ (geometric mean over groups)")
    ax1.set_ylabel(result.metric_name, color=c_acc)
    ax2.set_ylabel("energy ratio E_SNN / E_ANN", color=c_en)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    ax1.set_title(title or f"λ search ({result.objective}, {len(result.trials)} trials)")
    ax3.plot([t.energy_ratio for t in done], [t.metric for t in done], "o", color="0.6", ms=5, label="trials")
    fr = result.pareto
    ax3.plot([t.energy_ratio for t in fr], [t.metric for t in fr], "o-", color="tab:green", ms=6, label="Pareto front")
    ax3.plot([b.energy_ratio], [b.metric], "*", color="k", ms=16, zorder=5, label="chosen")
    ax3.set_xlabel("energy ratio")
    ax3.set_ylabel(result.metric_name)
    ax3.legend(fontsize=7, loc="best")
    ax3.set_title("accuracy vs energy")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # an interrupted write never leaves half a PNG
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


# -- groups ------------------------------------------------------------------------------
