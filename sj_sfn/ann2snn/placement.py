"""The placement rule in an FX graph: the input of every weight layer is spiking.

An SFN site sits at every ReLU-family activation (positive-only, with its ceiling); every weight
layer (``Conv*``, ``Linear``, their functional forms, and both operands of ``matmul``-style
products) whose input is not already the output of a site — after a residual addition, an
average pool, a normalisation, or a non-ReLU activation (SiLU, GELU, Hardswish, a sigmoid gate,
...) — gets a signed site in front of it. Those operations themselves stay floating point.
Spike-preserving reshapes (flatten, view, dropout, max-pooling, identity) do not break a
spike train. The first layer's input (anything computed from the graph inputs without a weight
layer on the way: the image, or its normalisation) stays analog and is counted as MACs.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

__all__ = ["is_weight_node", "spike_source", "analog_weight_inputs", "feeds_weight_layer", "WEIGHT_MODULES"]

WEIGHT_MODULES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                    nn.ConvTranspose3d, nn.Bilinear)
_WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
                     F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_PRODUCT_FUNCTIONS = {torch.matmul, torch.bmm, operator.matmul, torch.einsum}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d,
                   F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                   torch.squeeze, torch.unsqueeze}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "unflatten"}


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def is_weight_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies a weight layer (module or functional) to an activation."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), WEIGHT_MODULES)
    return node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def spike_source(value: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The node that produced ``value``'s elements, looking through spike-preserving reshapes and pools."""
    node = value
    while _is_passthrough(node, modules) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _activation_operands(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The operands of a weight node that must be spiking (the data input; both operands of a product)."""
    if is_weight_node(node, modules):
        x = node.args[0] if node.args else node.kwargs.get("input")
        return [x] if isinstance(x, fx.Node) else []
    if node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS and node.target is not torch.einsum:
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return []


def _has_weight_upstream(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, bool]:
    """For every node: whether a weight layer lies between the graph inputs and it."""
    out: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            out[node] = False
            continue
        out[node] = is_weight_node(node, modules) or any(out.get(a, False) for a in node.all_input_nodes)
    return out


def analog_weight_inputs(graph: fx.Graph, modules: dict[str, nn.Module], site_nodes: set[fx.Node]) -> list[tuple[fx.Node, list[fx.Node]]]:
    """``(value, consumers)`` for every weight-layer input that is neither spiking nor the network's analog input.

    ``site_nodes`` are the nodes that will become SFN sites (the ReLU-family activations). A
    product whose operand is a constant (a ``get_attr``) is a weight layer on the other operand.
    """
    upstream = _has_weight_upstream(graph, modules)
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        for value in _activation_operands(node, modules):
            src = spike_source(value, modules)
            if src in site_nodes or src.op == "get_attr" or not upstream.get(src, False):
                continue
            users = found.setdefault(value, [])
            if node not in users:
                users.append(node)
    return list(found.items())


def feeds_weight_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s values reach a weight layer's input (or the graph's output, which a detector's neck may
    read), directly or through spike-preserving reshapes.

    A ReLU whose output only feeds an average pool, a normalisation or an addition is not a site: the
    signed site in front of the next weight layer quantises what that layer reads.
    """
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if n in _activation_operands(user, modules) or user.op == "output":  # outside, a weight layer may read it
                return True
            if _is_passthrough(user, modules) and user.args and user.args[0] is n:
                todo.append(user)
    return False
