"""Dispatch of the neuron forward to an implementation (torch reference or CuPy kernel).

CuPy is imported lazily: ``import sj_sfn`` never imports it.
"""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["require_cupy", "mtn_forward", "sfn_forward"]


def require_cupy() -> None:
    """Raise a clear error unless CuPy and a CUDA device are usable."""
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise RuntimeError("backend='cupy' needs CuPy: pip install 'sj-sfn[cuda]' (cupy-cuda13x)") from e
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cupy' needs a CUDA device, but torch.cuda.is_available() is False")


def mtn_forward(node, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
    """Multi-step MTN forward for ``node`` (an :class:`~sj_sfn.MTNode`)."""
    return F.mtn_multi_step(x_seq, v, node.v_threshold, node.max_spikes, node.detach_reset, node.store_counts, store_v_seq)


def sfn_forward(node, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
    """Multi-step SFN forward for ``node`` (an :class:`~sj_sfn.SFNode`)."""
    tp, tn = node.broadcast_thresholds(x_seq[0])
    return F.sfn_multi_step(
        x_seq, v, tp, tn, node.lam, node.max_spikes, node.levels, node.v_init, node.ceiling,
        node.detach_reset, node.store_counts, store_v_seq,
    )
