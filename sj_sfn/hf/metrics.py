"""Fidelity of a converted language model to its ANN: sentence embeddings and perplexity.

    ref = sentence_embeddings(ann, batches); emb = sentence_embeddings(snn, batches)
    embedding_fidelity(ref, emb)       # {'cos_mean', 'cos_min', 'spearman'}
    perplexity(snn, batches)           # causal LMs: exp(mean next-token NLL)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["embedding_fidelity", "perplexity", "sentence_embeddings", "spearman"]


def _check_batch(b: Mapping, what: str) -> None:
    if not isinstance(b, Mapping) or "input_ids" not in b:
        raise TypeError(f"{what} takes batches that are dicts with 'input_ids' (a tokenizer's output), got {type(b).__name__}")


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states: ``e = normalize(Σ_t m_t·h_t / Σ_t m_t)``, ``m`` the attention mask.

    :returns: ``[sentences, hidden]``
    """
    out = []
    for b in batches:
        _check_batch(b, "sentence_embeddings")
        h = model(**b).last_hidden_state
        m = b.get("attention_mask", torch.ones(h.shape[:2], dtype=torch.long, device=h.device))[..., None].to(h.dtype)
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    if not out:
        raise ValueError("sentence_embeddings: no batches")
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` with ties given their mean rank (as Spearman's ρ needs)."""
    uniq, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2).to(torch.float64)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two 1-D samples: the Pearson correlation of their (tie-averaged) ranks."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"spearman needs two 1-D samples of the same length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.corrcoef(torch.stack([_ranks(a.double()), _ranks(b.double())]))[0, 1].item()


def embedding_fidelity(ref: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    """How well ``emb`` reproduces ``ref`` (both L2-normalised, ``[n, d]``).

    ``cos_mean``/``cos_min``: the cosine ``⟨ref_i, emb_i⟩`` over sentences; ``spearman``: Spearman's ρ between
    the pairwise similarities ``⟨ref_i, ref_j⟩`` and ``⟨emb_i, emb_j⟩``, ``i < j`` (what retrieval and
    clustering see).
    """
    if ref.shape != emb.shape or ref.dim() != 2 or len(ref) < 3:
        raise ValueError(f"embedding_fidelity needs two [n >= 3, d] embeddings of the same shape, got "
                         f"{tuple(ref.shape)} and {tuple(emb.shape)}")
    cos = (ref * emb).sum(-1)
    iu = torch.triu_indices(len(ref), len(ref), 1)
    rho = spearman((ref @ ref.T)[iu[0], iu[1]], (emb @ emb.T)[iu[0], iu[1]])
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "spearman": rho}


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """``exp(−(1/n) Σ log p(x_{t+1} | x_{≤t}))`` over every next token that is not padding (attention mask 1)."""
    nll, n = 0.0, 0
    for b in batches:
        _check_batch(b, "perplexity")
        logits = model(**b).logits.float()
        ids = b["input_ids"]
        target = ids[:, 1:]
        mask = b.get("attention_mask")
        keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool() & mask[:, :-1].bool()
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        nll += lp[keep.reshape(-1)].sum().item()
        n += int(keep.sum())
    if n == 0:
        raise ValueError("perplexity: no next tokens to score (empty batches, or every sequence shorter than 2 tokens)")
    return float(torch.exp(torch.tensor(nll / n, dtype=torch.float64)))
