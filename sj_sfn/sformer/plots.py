"""Figure 6 of the paper: activation histograms of a ViT block and of its SFN outputs at several λ.

Rows: the pre-QKV site (``qkv_in``, the LayerNorm output), the post-GELU site (``fc2_in``)
and the post-SoftMax site (``attn``) of one block. Column 0: the ANN's values for the same
input; further columns: the SFN outputs of the converted model at each λ (no recalibration,
:func:`~sj_sfn.sformer.set_lambda`). The y axis is logarithmic: SoftMax and GELU mass sits
near zero.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from .core import prepare, set_lambda, site_modules

__all__ = ["FIGURE6_KINDS", "collect_site_values", "plot_site_histograms"]

FIGURE6_KINDS = ("qkv_in", "fc2_in", "attn")


class _Tap(nn.Module):
    """Identity site that keeps what flows through it."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x.detach().flatten().cpu()
        return x


def _block_sites(model: nn.Module, block: int, kinds: Sequence[str]) -> dict[str, nn.Module]:
    found = {k: m for n, k, m in site_modules(model) if k in kinds and f"blocks.{block}." in f".{n}"}
    missing = [k for k in kinds if k not in found]
    if missing:
        raise ValueError(f"block {block} has no site(s) of kind {missing}")
    return found


@torch.no_grad()
def collect_site_values(
    ann: nn.Module, snn: nn.Module, x: torch.Tensor, lams: Sequence[float] = (1.0, 0.5, 0.25),
    block: int = 0, kinds: Sequence[str] = FIGURE6_KINDS,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{kind: {"ANN": values, "λ=...": values, ...}}`` at the sites of ``block`` for input ``x``.

    The ANN's values come from the exact explicit path (identity sites); the SFN values from a
    copy of ``snn`` with every site's λ set to each entry of ``lams``. ``ann`` and ``snn`` are
    not modified.
    """
    if not lams:
        raise ValueError("lams must name at least one λ")
    taps = prepare(ann, lambda kind, name: _Tap()).eval()
    tap_sites = _block_sites(taps, block, kinds)
    taps(x)
    out: dict[str, dict[str, torch.Tensor]] = {k: {"ANN": tap_sites[k].value} for k in kinds}
    work = copy.deepcopy(snn).eval()
    sfn_sites = _block_sites(work, block, kinds)
    for lam in lams:
        set_lambda(work, lam)
        got: dict[str, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda mod, inp, o, _k=k, _got=got: _got.__setitem__(_k, o.detach().flatten().cpu()))
            for k, m in sfn_sites.items()
        ]
        try:
            work(x)
        finally:
            for h in handles:
                h.remove()
        for k in kinds:
            out[k][f"λ={lam:g}"] = got[k]
    return out


def plot_site_histograms(
    ann: nn.Module, snn: nn.Module, x: torch.Tensor, lams: Sequence[float] = (1.0, 0.5, 0.25),
    block: int = 0, kinds: Sequence[str] = FIGURE6_KINDS, bins: int = 80, path: str | None = None,
):
    """Draw Figure 6 (see the module doc); returns the matplotlib figure, saved to ``path`` if given."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    values = collect_site_values(ann, snn, x, lams, block, kinds)
    titles = {"qkv_in": "pre-QKV", "fc2_in": "post-GELU", "attn": "post-SoftMax"}
    cols = ["ANN"] + [f"λ={lam:g}" for lam in lams]
    fig, axes = plt.subplots(len(kinds), len(cols), figsize=(3.0 * len(cols), 2.4 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        ref = values[kind]["ANN"]
        lo, hi = float(ref.min()), float(ref.max())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1).numpy()
        for c, col in enumerate(cols):
            ax = axes[r][c]
            v = values[kind][col].numpy()
            ax.hist(v, bins=edges, color="tab:blue" if c == 0 else "tab:orange", log=True)
            if c == 0:
                ax.set_ylabel(f"{titles.get(kind, kind)}\ncount")
            if r == 0:
                ax.set_title(col if c == 0 else f"SFN {col}")
            if c > 0:
                nz = (values[kind][col] != 0).float().mean().item()
                ax.text(0.97, 0.92, f"non-zero {100 * nz:.0f}%", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    fig.suptitle(f"Block {block}: ANN activations and SFN outputs")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
