"""Sites of a converted graph that fire over their input when nothing else reads it.

A converted graph runs every operation out of place (:func:`~sj_sfn.ann2snn.passes.functionalize_inplace`),
so each site allocates its spike next to an input that dies right after it: at a large batch that is a
fresh tensor of tens of MB per site, which the C allocator maps, faults in and zeroes on every call.
:func:`fire_temporaries_in_place` rewrites the call of each site whose input is such a temporary into
:func:`fire_temporary`, which writes the spike over it, as ``nn.ReLU(inplace=True)`` does, whenever no
hook can see it (the node's own bound kernel call: stateless CPU inference, :meth:`SFNode.fire_inplace`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ..neuron import SFNode
from ..sformer.modules import hooked
from .passes import alias_relation, is_inplace

__all__ = ["fire_temporary", "fire_temporaries_in_place", "fired_site"]

# modules and functions whose output is a new tensor (never a view or one of their inputs) when called out of place
_FRESH_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Hardtanh,
)  # fmt: skip
_FRESH_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.layer_norm, F.group_norm, F.batch_norm, F.gelu, F.silu, F.relu,
    F.relu6, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, torch.relu, torch.sigmoid, torch.tanh,
    torch.add, torch.sub, torch.mul, torch.div, operator.add, operator.sub, operator.mul, operator.truediv,
}  # fmt: skip


def fire_temporary(site: nn.Module, x: torch.Tensor, producer: nn.Module | None = None) -> torch.Tensor:
    """``site(x)``, written over ``x`` (returned) where that gives the same result and nobody can see the difference.

    ``x`` is a temporary of the graph that only this call reads; ``producer`` the module that made it (or ``None``).
    The spike goes over ``x`` only on the node's bound kernel call (:meth:`SFNode.fire_inplace`: stateless CPU
    inference) and when neither the site nor ``producer`` has a hook (nor a global one: a forward hook may keep
    the tensor it was given); otherwise this is ``site(x)``.
    """
    if isinstance(site, SFNode) and not hooked(site) and (producer is None or not hooked(producer)):
        out = site.fire_inplace(x)
        if out is not None:
            return out
    return site(x)


def fired_site(node: fx.Node) -> str | None:
    """The qualified name of the site that ``node`` fires: a ``call_module`` site's target, or the site read by a
    :func:`fire_temporary` call; ``None`` for any other node."""
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and node.target is fire_temporary and isinstance(node.args[0], fx.Node):
        return node.args[0].target
    return None


def _is_fresh(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` makes a new tensor: one of the operations above, called out of place."""
    if node.op == "call_module":
        fresh = isinstance(modules.get(node.target), _FRESH_MODULES)
    else:
        fresh = node.op == "call_function" and node.target in _FRESH_FUNCTIONS
    return fresh and not is_inplace(node, modules) and "out" not in node.kwargs


def _temporary_root(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The node that made ``node``'s tensor when ``node`` is a fresh tensor, or a chain of operations that may share
    memory with their input (views, the identity, eval dropout, reshapes: ``passes.alias_relation``) from one, each
    read by nothing but the next node of the chain; else ``None``. Any memory the end of the chain shares belongs to
    the chain alone, so a spike may overwrite it."""
    while (relation := alias_relation(node, modules)) is not None:
        src = relation[1]
        if len(src.users) != 1:
            return None
        node = src
    return node if _is_fresh(node, modules) else None


def fire_temporaries_in_place(fx_model: fx.GraphModule) -> int:
    """Route every :class:`SFNode` site whose only input is a temporary that nothing else reads through
    :func:`fire_temporary`; the number of sites rerouted. The graph computes the same values; only where the spike
    is written changes."""
    graph = fx_model.graph
    modules = dict(fx_model.named_modules())
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), SFNode) or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        root = _temporary_root(src, modules)
        if root is None:
            continue
        with graph.inserting_before(node):
            site = graph.get_attr(node.target)
            producer = graph.get_attr(root.target) if root.op == "call_module" else None
            call = graph.call_function(fire_temporary, (site, src, producer))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        fx_model.recompile()
    return count
