"""One set of parameter checks, one rule each, shared by the neurons, the converters and the command line.

Every check returns the normalised value (a Python ``int``/``float``) or raises with a message
that names the parameter and what it must be: ``TypeError`` for a value of the wrong type,
``ValueError`` for one out of range. Rules:

- ``N`` (``max_spikes``): an integer ``>= 1``;
- thresholds, ``λ``, the ceiling: finite and ``> 0``;
- the threshold offset ``r``: a fraction ``0 <= r < 1`` (``0.5`` rounds, ``0`` floors);
- the calibration quantile ``p``: ``0 < p <= 1`` (everywhere: CNN recipes, SFormer, detectors, CLI);
- levels: a non-empty 1-D, finite, positive, strictly increasing tensor.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = [
    "check_max_spikes",
    "check_positive_int",
    "check_positive_float",
    "check_non_negative_float",
    "check_finite_positive",
    "check_offset",
    "check_quantile",
    "check_levels",
    "check_fire_params",
]


def _scalar(value: Any, name: str) -> Any:
    """A one-element tensor read as a Python number; any other tensor is an error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    return value


def check_max_spikes(max_spikes: Any, name: str = "max_spikes (N)") -> int:
    """``N``: an integer >= 1 (a one-element tensor is read). TypeError for another type, ValueError below 1."""
    return check_positive_int(max_spikes, name)


def check_positive_int(value: Any, name: str) -> int:
    """An integer >= 1 (a one-element tensor is read); ``bool`` is not an integer here."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_positive_float(value: Any, name: str) -> float:
    """A finite real number > 0 (a one-element tensor is read)."""
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def check_non_negative_float(value: Any, name: str) -> float:
    """A finite real number >= 0 (a one-element tensor is read)."""
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def check_finite_positive(t: torch.Tensor, name: str) -> None:
    """Every element of the tensor ``t`` finite and > 0."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got non-finite values")
    if not (t > 0).all():
        raise ValueError(f"{name} must be > 0 everywhere (a zero threshold means the site never fires)")


def check_offset(offset: Any, name: str = "offset") -> float:
    """The threshold offset ``r``: a real fraction of the threshold, ``0 <= r < 1``."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not 0.0 <= float(offset) < 1.0:
        raise ValueError(f"{name} must be a fraction of the threshold in [0, 1), got {offset!r}")
    return float(offset)


def check_quantile(p: Any, name: str = "p") -> float:
    """The calibration quantile ``p``: a real number with ``0 < p <= 1``."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"{name} (calibration quantile) must be in (0, 1], got {p!r}")
    return float(p)


def check_levels(levels: torch.Tensor) -> torch.Tensor:
    """Validate a level tensor: 1-D, finite, positive, strictly increasing (returned as floating point)."""
    levels = torch.as_tensor(levels)
    if levels.dim() != 1 or levels.numel() < 1:
        raise ValueError(f"levels must be a non-empty 1-D tensor, got shape {tuple(levels.shape)}")
    if not levels.is_floating_point():
        levels = levels.to(torch.float32)
    if not torch.isfinite(levels).all() or not (levels > 0).all():
        raise ValueError("levels must be finite and positive")
    if levels.numel() > 1 and not (levels[1:] > levels[:-1]).all():
        raise ValueError("levels must be strictly increasing")
    return levels


def check_fire_params(max_spikes: Any, offset: float = 0.0, levels: torch.Tensor | None = None, **positive: Any) -> None:
    """Validate the parameters of a fire function: ``N``, the offset, the levels and the positive scalars/tensors.

    Nothing is checked while torch.compile traces: a Python float may be traced as a symbolic
    value there, and ``math.isfinite`` on it would break the graph. Python numbers are always
    checked; tensors only on the CPU, so a forward on a GPU never synchronises the device.
    """
    if torch.compiler.is_compiling():
        return
    n = check_max_spikes(max_spikes)
    for name, value in positive.items():
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":  # checking a GPU tensor would synchronise the device
                check_finite_positive(value.detach(), name)
        elif value is not None:
            check_positive_float(value, name)
    check_offset(offset, "offset")
    if levels is not None:
        if not isinstance(levels, torch.Tensor) or levels.dim() != 1 or levels.numel() != n:
            shape = tuple(levels.shape) if isinstance(levels, torch.Tensor) else type(levels).__name__
            raise ValueError(f"levels must be a 1-D tensor of max_spikes={n} entries, got {shape}")
        if levels.device.type == "cpu":
            check_levels(levels)
