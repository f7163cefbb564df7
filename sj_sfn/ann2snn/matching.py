"""Recognise ReLU-family activations (and unsupported ones) in a traced FX graph.

ReLU family, every spelling users write: ``nn.ReLU``, ``F.relu``, ``torch.relu``,
``x.relu()``, ``nn.ReLU6``, ``F.relu6``, ``nn.Hardtanh(0, c)``, ``F.hardtanh(x, 0, c)``,
``torch.clamp(x, min=0[, max=c])`` / ``x.clamp(0[, c])`` / ``clip`` / ``clamp_min(x, 0)``
(and the in-place forms). A ceiling ``c`` (6 for ReLU6) is reported with the match.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

__all__ = ["ELEMENTWISE_ACTIVATIONS", "ELEMENTWISE_FUNCTIONS", "ActivationMatch", "match_relu_family", "unsupported_activation", "activation_input"]


class ActivationMatch(NamedTuple):
    """A ReLU-family node: what it is (``kind``) and its upper bound (``ceiling``, ``None`` = unbounded)."""

    node: fx.Node
    kind: str
    ceiling: float | None


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.nn.functional.relu}
_RELU6_FUNCTIONS = {F.relu6}
_CLAMP_FUNCTIONS = {torch.clamp, torch.clip, torch.clamp_, torch.clip_}
_CLAMP_MIN_FUNCTIONS = {torch.clamp_min, torch.clamp_min_}
_HARDTANH_FUNCTIONS = {F.hardtanh, F.hardtanh_}

_UNSUPPORTED_MODULES = (
    nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.PReLU, nn.RReLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.GLU, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
_UNSUPPORTED_FUNCTIONS = {
    F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, torch.selu,
    F.celu, F.prelu, F.rrelu, F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.softsign, F.logsigmoid,
    F.glu, F.threshold, F.hardshrink, F.softshrink, F.tanhshrink,
}
_UNSUPPORTED_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_", "exp"}
#: Element-wise activations that stay floating point between SFN sites (they apply to ``[T, B, ...]`` as they are).
ELEMENTWISE_ACTIVATIONS = tuple(m for m in _UNSUPPORTED_MODULES if m is not nn.GLU) + (nn.Hardtanh, nn.ReLU, nn.ReLU6)
#: Their functional forms, and the ReLU family's (a ReLU whose values reach no weight layer stays a ReLU).
ELEMENTWISE_FUNCTIONS = tuple(f for f in _UNSUPPORTED_FUNCTIONS if f is not F.glu) + tuple(
    _RELU_FUNCTIONS | _RELU6_FUNCTIONS | _CLAMP_FUNCTIONS | _CLAMP_MIN_FUNCTIONS | _HARDTANH_FUNCTIONS)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def activation_input(node: fx.Node) -> Any:
    """The tensor argument of an activation node."""
    if node.args:
        return node.args[0]
    for key in ("input", "self", "x"):
        if key in node.kwargs:
            return node.kwargs[key]
    raise ValueError(f"cannot find the input of activation node {node.name!r}")


def _clamp_bounds(node: fx.Node) -> tuple[Any, Any]:
    return _arg(node, 1, "min"), _arg(node, 2, "max")


def _ceiling_or_none(lo: Any, hi: Any) -> tuple[bool, float | None]:
    """Whether ``clamp(lo, hi)`` is a ReLU-family op, and its ceiling."""
    lo_v = _number(lo)
    if lo_v != 0.0:
        return False, None
    if hi is None:
        return True, None
    hi_v = _number(hi)
    if hi_v is None or hi_v <= 0:
        return False, None
    return True, hi_v


def match_relu_family(node: fx.Node, modules: dict[str, nn.Module]) -> ActivationMatch | None:
    """Return the match if ``node`` is a ReLU-family activation, else ``None``."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is nn.ReLU:
            return ActivationMatch(node, "ReLU", None)
        if type(m) is nn.ReLU6:
            return ActivationMatch(node, "ReLU6", 6.0)
        if type(m) is nn.Hardtanh and float(m.min_val) == 0.0 and float(m.max_val) > 0:
            return ActivationMatch(node, "Hardtanh", float(m.max_val))
        return None
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FUNCTIONS:
            return ActivationMatch(node, "relu", None)
        if t in _RELU6_FUNCTIONS:
            return ActivationMatch(node, "relu6", 6.0)
        if t in _HARDTANH_FUNCTIONS:
            ok, c = _ceiling_or_none(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
            return ActivationMatch(node, "hardtanh", c) if ok and c is not None else None
        if t in _CLAMP_FUNCTIONS:
            ok, c = _ceiling_or_none(*_clamp_bounds(node))
            return ActivationMatch(node, "clamp", c) if ok else None
        if t in _CLAMP_MIN_FUNCTIONS:
            ok, _ = _ceiling_or_none(_arg(node, 1, "min"), None)
            return ActivationMatch(node, "clamp_min", None) if ok else None
        return None
    if node.op == "call_method":
        t = node.target
        if t in ("relu", "relu_"):
            return ActivationMatch(node, "relu", None)
        if t in ("clamp", "clamp_", "clip", "clip_"):
            ok, c = _ceiling_or_none(*_clamp_bounds(node))
            return ActivationMatch(node, "clamp", c) if ok else None
        if t in ("clamp_min", "clamp_min_"):
            ok, _ = _ceiling_or_none(_arg(node, 1, "min"), None)
            return ActivationMatch(node, "clamp_min", None) if ok else None
    return None


def unsupported_activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """A description of ``node`` if it is an activation the CNN recipe cannot convert."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _UNSUPPORTED_MODULES) or (isinstance(m, nn.Hardtanh) and type(m) is nn.Hardtanh):
            return f"module {node.target!r} ({type(m).__name__})"
        return None
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", str(t))
        if t in _UNSUPPORTED_FUNCTIONS or t in _HARDTANH_FUNCTIONS:
            return f"function {name}() at node {node.name!r}"
        if t in _CLAMP_FUNCTIONS or t in _CLAMP_MIN_FUNCTIONS:
            lo, hi = _clamp_bounds(node)
            return f"{name}(min={lo!r}, max={hi!r}) at node {node.name!r} (only clamp(min=0[, max=c]) is a ReLU)"
        return None
    if node.op == "call_method":
        t = node.target
        if t in _UNSUPPORTED_METHODS:
            return f"method .{t}() at node {node.name!r}"
        if t in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"):
            lo, hi = _clamp_bounds(node)
            return f".{t}(min={lo!r}, max={hi!r}) at node {node.name!r} (only clamp(min=0[, max=c]) is a ReLU)"
    return None
