"""What the converters accept: checks on the model and the calibration loader, at the boundary.

- :func:`calibration_loader`: an iterable of batches (``x``, ``(x, y, ...)`` or a dict); a single
  tensor or a single dict (a tokenizer's output) is ONE batch. A tuple/list that looks like one
  ``(x, y)`` batch rather than a sequence of batches is an error that says so.
- :func:`check_model`: an ``nn.Module`` that is not already converted (no SFN/MTN sites), holds no
  tensor on the ``meta`` device, and has a weight layer (a parameter with two or more dimensions:
  Conv, Linear, attention projections).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..neuron import MTNode, SFNode

__all__ = ["calibration_loader", "check_model"]


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
