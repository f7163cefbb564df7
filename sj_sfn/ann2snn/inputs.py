"""What the converters accept: checks on the model and the calibration loader, at the boundary.

- :func:`calibration_loader`: an iterable of batches (``x``, ``(x, y, ...)`` or a dict); a single
  tensor or a single dict (a tokenizer's output) is ONE batch. A tuple/list that looks like one
  ``(x, y)`` batch rather than a sequence of batches is an error that says so.
- :func:`check_model`: an ``nn.Module`` that is not already converted (no SFN/MTN sites), holds no
  tensor on the ``meta`` device, and has a weight layer (a parameter with two or more dimensions:
  Conv, Linear, attention projections).
- :func:`faithful_graph`: the traced graph, functionalised (no in-place operation left), checked on
  the first calibration batch against the model it was traced from: torch.fx can record something
  else than the model computes (``y += 1`` on a tensor another name still refers to is recorded as
  ``y = y + 1``; Python control flow on tensor values is frozen at trace time).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_flatten

from ..calibration import batch_inputs
from ..neuron import MTNode, SFNode
from .passes import functionalize_inplace

__all__ = ["calibration_loader", "check_model", "faithful_graph", "TraceMismatchError"]


class TraceMismatchError(ValueError):
    """The traced graph of a model computes something else than the model on a calibration batch."""


def calibration_loader(dataloader: Any, owner: str) -> Iterable:
    """The calibration batches ``owner`` iterates over.

    A ``torch.Tensor`` or a ``Mapping`` is one batch (iterating over either would give samples or
    keys, never batches) and comes back as ``[dataloader]``; any other iterable is returned as it is.

    :raises ValueError: for ``None``
    :raises TypeError: for a non-iterable, a string, or a tuple/list of tensors that is one ``(x, y)``
        batch (tensors of different dimensionality) rather than a sequence of input batches
    """
    if dataloader is None:
        raise ValueError(f"{owner} needs a calibration dataloader (an iterable of x or (x, y) batches)")
    if isinstance(dataloader, (torch.Tensor, Mapping)):
        return [dataloader]
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise TypeError(
            f"{owner}: dataloader must be an iterable of batches (a DataLoader, or a list of x or (x, y) batches), "
            f"got {type(dataloader).__name__}"
        )
    if isinstance(dataloader, (tuple, list)) and len(dataloader) > 1 and all(isinstance(b, torch.Tensor) for b in dataloader):
        dims = [b.dim() for b in dataloader]
        if len(set(dims)) > 1:
            shapes = ", ".join(str(tuple(b.shape)) for b in dataloader)
            raise TypeError(
                f"{owner}: dataloader is a {type(dataloader).__name__} of tensors with shapes {shapes}: that looks "
                "like ONE (x, y) batch, not a sequence of input batches. Pass [(x, y)] (a list holding the batch) "
                "or a DataLoader."
            )
    return dataloader


def _weight_layers(model: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in model.parameters())


def check_model(model: Any, owner: str) -> nn.Module:
    """``model`` if ``owner`` can convert it, else a clear error naming the problem.

    :raises TypeError: not an ``nn.Module``
    :raises ValueError: already converted (it has SFN/MTN sites), a parameter or buffer on the ``meta``
        device, or no weight layer (no parameter with two or more dimensions: nothing to convert)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    sites = [(name, type(m).__name__) for name, m in model.named_modules() if isinstance(m, (SFNode, MTNode))]
    if sites:
        kinds = sorted({k for _, k in sites})
        names = ", ".join(repr(n) for n, _ in sites[:3]) + (", ..." if len(sites) > 3 else "")
        raise ValueError(
            f"{owner}: the model is already converted: it has {'/'.join(kinds)} sites ({len(sites)}: {names}). "
            "Convert the original ANN; to change λ of a converted network use sj_sfn.set_lambda."
        )
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"{owner}: the model has tensors on the meta device (no data: {meta[0]!r}"
            f"{f' and {len(meta) - 1} more' if len(meta) > 1 else ''}); materialise and load its weights first, "
            "e.g. model.to_empty(device='cpu') and then model.load_state_dict(...)"
        )
    if not _weight_layers(model):
        raise ValueError(
            f"{owner}: the model has no weight layer (no Conv, Linear or other parameter with two or more "
            f"dimensions in {type(model).__name__}): nothing to convert"
        )
    return model


def _probe(dataloader: Iterable) -> torch.Tensor | None:
    """The first calibration input, or ``None`` for a one-shot iterator (reading it would lose a batch)."""
    if isinstance(dataloader, Iterator):
        return None
    for batch in dataloader:
        try:
            x = batch_inputs(batch)
        except TypeError:
            return None
        return x if isinstance(x, torch.Tensor) else None
    return None


def _mismatch(expect: Any, got: Any) -> str | None:
    """Why ``got`` differs from ``expect`` (``rtol = 1e-4``, ``atol = 1e-5·max(1, max|expect|)``), or ``None``."""
    flat_e, spec_e = tree_flatten(expect)
    flat_g, spec_g = tree_flatten(got)
    if spec_e != spec_g:
        return f"output structure {spec_g} instead of {spec_e}"
    for i, (e, g) in enumerate(zip(flat_e, flat_g)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != e.shape:
            return f"output {i} has shape {getattr(g, 'shape', None)} instead of {tuple(e.shape)}"
        e, g = e.detach().double(), g.detach().double()
        atol = 1e-5 * max(1.0, float(e.abs().nan_to_num(posinf=0, neginf=0).max()) if e.numel() else 1.0)
        if not torch.allclose(g, e, rtol=1e-4, atol=atol, equal_nan=True):
            return f"output {i} differs by up to {float((g - e).abs().nan_to_num(nan=float('inf')).max()):.3g}"
    return None


@torch.no_grad()
def faithful_graph(reference: nn.Module, fx_model: fx.GraphModule, dataloader: Iterable, device: Any,
                   owner: str) -> fx.GraphModule:
    """``fx_model`` with every in-place operation rewritten out of place, checked against ``reference``.

    On the first calibration batch ``x`` (skipped for a one-shot iterator), ``reference(x)``, the traced
    graph and the functionalised graph must agree (``rtol = 1e-4``, ``atol = 1e-5·max(1, max|out|)``).

    :raises TraceMismatchError: the traced graph computes something else than ``reference``
    :raises InPlaceError: an in-place operation the graph cannot reproduce (see :func:`functionalize_inplace`)
    """
    x = _probe(dataloader)
    if x is None or not torch.isfinite(x).all():
        return functionalize_inplace(fx_model)
    x = x.to(device)
    expect = reference(x.clone())  # clones: the model may write into its input
    why = _mismatch(expect, fx_model(x.clone()))
    if why is not None:
        raise TraceMismatchError(
            f"{owner}: torch.fx traced {type(reference).__name__} into a graph that computes something else on the "
            f"first calibration batch ({why}). Typical causes: `y += v` (or another augmented assignment) on a tensor "
            "that another name still refers to, which fx records as `y = y + v` (write y = y.add_(v) or avoid the "
            "alias); Python control flow or constants computed from tensor values, frozen at trace time; randomness "
            "in eval mode."
        )
    fx_model = functionalize_inplace(fx_model)
    why = _mismatch(expect, fx_model(x.clone()))
    if why is not None:  # a bug of functionalize_inplace, never the user's
        raise RuntimeError(f"{owner}: rewriting in-place operations out of place changed the result ({why}); please report")
    return fx_model
