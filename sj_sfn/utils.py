"""Small shared helpers: the user-error type, the model input of a loader batch, JSON that survives NaN, atomic writes.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch

__all__ = ["UserError", "batch_inputs", "json_safe", "atomic_write", "write_json", "model_device", "batches_total",
           "add_missing_biases", "call_model", "output_tensors"]

class UserError(ValueError):
    """A mistake in what the user named (a file, a folder, a model, an option); the command line reports it in one line, exit code 2."""


INPUT_KEYS = ("img", "image", "x", "inputs", "pixel_values")


def batch_inputs(batch: Any) -> torch.Tensor:
    """The model input of a loader batch: ``x`` from ``(x, y, ...)``, a dict's ``"img"``/``"x"``, or the tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}")


def call_model(model: torch.nn.Module, batch: Any, device: torch.device | str) -> Any:
    """``model`` on a loader batch: ``model(**batch)`` for a token batch (a dict with ``input_ids``), else ``model(x)``."""
    if isinstance(batch, dict) and "input_ids" in batch:
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    x = batch_inputs(batch)
    if not torch.is_tensor(x):
        raise TypeError(f"a batch's model input must be a tensor, got {type(x).__name__}")
    return model(x.to(device))


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors a model returned: the tensor itself, every one of a tuple or list, the first
    of a dict (also a ``transformers`` ``ModelOutput``: ``logits`` or ``last_hidden_state``)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        first = next((v for v in out.values() if torch.is_tensor(v) and v.is_floating_point()), None)
        return [first] if first is not None else []
    if isinstance(out, list | tuple):
        return [t for o in out for t in output_tensors(o)]
    return []


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by ``None`` (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` (``os.replace``), on error it is removed.

    An interrupted write never leaves a half-written ``path``: readers see the old file or the new one.
    The parent folder must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), got mode {mode!r}")
    path = os.fspath(path)
    # a unique name beside the target (same file system, so os.replace is atomic), created with the usual permissions
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
    """Write ``json_safe(obj)`` to ``path`` atomically (missing parent folders are created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        json.dump(json_safe(obj), f, indent=indent)
    return path


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def batches_total(loader: Any, num_batches: int | None) -> int | None:
    """How many batches a pass over ``loader`` will take, for a progress bar: ``num_batches``, else ``len(loader)``
    when the loader has one, else ``None``."""
    if num_batches is not None:
        return num_batches
    try:
        return len(loader)
    except TypeError:
        return None


def add_missing_biases(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give every layer without a bias the zero bias that ``state_dict`` holds for it.

    The energy-budget calibration folds its bias correction into the weight layers that read a
    site, adding a bias where a layer had none (``b ← b − W·E[e]``); a rebuilt network needs the
    same parameters before ``load_state_dict``.
    """
    for key, value in state_dict.items():
        name, _, leaf = key.rpartition(".")
        if leaf != "bias":
            continue
        try:
            owner = module.get_submodule(name)
        except AttributeError:
            continue
        if "bias" in owner._parameters and owner._parameters["bias"] is None:
            owner.bias = torch.nn.Parameter(torch.zeros_like(value, device=owner.weight.device))
