"""FX graph passes used by the conversion recipes.

- :func:`functionalize_inplace`: every in-place operation (``x.relu_()``, ``nn.ReLU(inplace=True)``,
  ``F.relu(x, inplace=True)``, ``torch.clamp_``, ``x.add_(1)``, ``x[i] = v`` ...) becomes its
  out-of-place form, and every later use of the mutated tensor (and of the views of it that the
  graph shows) reads the new value, so that replacing an activation by an out-of-place neuron, or
  removing unused nodes, cannot change what the network computes. Aliasing the pass cannot
  reproduce is an error that names the node.
- :func:`is_inplace`, :func:`alias_relation`: whether a node writes into an argument; how its result may share memory
  with one (also used by :mod:`sj_sfn.ann2snn.temporaries`).
- :func:`fuse_conv_bn`: fold eval-mode BatchNorm into the preceding convolution.
- :func:`adapt_step_mode`: make a converted graph follow ``functional.set_step_mode``.
- :func:`unique_target`: a free submodule name.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based.ann2snn.recipes.step_mode_adapters import (
    _RATE_CODING_STATELESS_MODULE_TYPES,
    adapt_step_mode_graph,
)
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from .matching import ELEMENTWISE_ACTIVATIONS, ELEMENTWISE_FUNCTIONS

__all__ = [
    "InPlaceError",
    "functionalize_inplace",
    "is_inplace",
    "alias_relation",
    "fuse_conv_bn",
    "adapt_step_mode",
    "modularise_pools",
    "unique_target",
    "is_metadata_use",
]


class InPlaceError(ValueError):
    """An in-place operation whose effect on other tensors the converted graph cannot reproduce."""


# -- small helpers ---------------------------------------------------------------------


def is_metadata_use(user: fx.Node) -> bool:
    """Whether ``user`` reads only a tensor's metadata (``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``)."""
    if user.op == "call_function" and user.target is getattr and user.args[1:] in (
        ("ndim",), ("shape",), ("dtype",), ("device",),
    ):
        return True
    return user.op == "call_method" and user.target in ("dim", "size", "numel")


def _sole_value_user(producer: fx.Node, consumer: fx.Node) -> bool:
    """Whether ``consumer`` is the only user of ``producer``'s values (metadata users do not count)."""
    return all(user is consumer or is_metadata_use(user) for user in producer.users)


def unique_target(fx_model: fx.GraphModule, wanted: str) -> str:
    """``wanted``, or ``wanted_1``, ``wanted_2`` ... : the first name that no submodule of ``fx_model`` has."""
    existing = dict(fx_model.named_modules())
    target, i = wanted, 1
    while target in existing:
        target = f"{wanted}_{i}"
        i += 1
    return target


def _node_desc(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.name!r} (module {node.target!r}, {type(modules.get(node.target)).__name__})"
    if node.op == "call_method":
        return f"{node.name!r} (.{node.target}())"
    if node.op == "call_function":
        return f"{node.name!r} ({getattr(node.target, '__name__', node.target)}())"
    if node.op == "get_attr":
        return f"{node.name!r} (attribute {node.target!r})"
    return f"{node.name!r} ({node.op})"


# -- in-place operations ---------------------------------------------------------------

# in-place methods whose out-of-place form (the name without "_") computes the same value
_OUT_OF_PLACE_METHODS = frozenset({
    "relu_", "clamp_", "clip_", "clamp_min_", "clamp_max_", "sigmoid_", "tanh_", "exp_", "log_", "neg_", "abs_",
    "sqrt_", "rsqrt_", "square_", "reciprocal_", "floor_", "ceil_", "round_", "trunc_", "frac_", "sign_",
    "add_", "sub_", "mul_", "div_", "true_divide_", "floor_divide_", "pow_", "fmod_", "remainder_", "lerp_",
    "addcmul_", "addcdiv_", "masked_fill_", "masked_scatter_", "index_add_", "index_fill_", "index_copy_",
    "scatter_", "scatter_add_", "hardtanh_", "leaky_relu_", "nan_to_num_", "erf_", "sin_", "cos_", "log1p_",
    "expm1_", "addmm_", "baddbmm_", "mm_",
})


def _out_of_place_functions() -> dict[Callable, Callable]:
    pairs: dict[Callable, Callable] = {}
    for ns, names in (
        (torch, ("relu", "clamp", "clip", "clamp_min", "clamp_max", "sigmoid", "tanh", "exp", "celu", "selu",
                 "threshold", "rrelu", "dropout", "alpha_dropout", "feature_dropout", "feature_alpha_dropout")),
        (F, ("hardtanh", "leaky_relu", "elu")),
    ):
        for name in names:
            inplace_fn, fn = getattr(ns, name + "_", None), getattr(ns, name, None)
            if inplace_fn is not None and fn is not None:
                pairs[inplace_fn] = fn
    return pairs


_OUT_OF_PLACE_FUNCTIONS = _out_of_place_functions()

# dropout layers: torch's, and SpikingJelly's step-mode ones (a converted graph holds those); out of training they
# return their input itself
_DROPOUTS: tuple[type, ...] = (nn.modules.dropout._DropoutNd, sj_layer.Dropout)
# ops whose result is the very same tensor object as their input (eval-mode dropout, identity)
_SAME_OBJECT_MODULES: tuple[type, ...] = (nn.Identity, *_DROPOUTS)
# ops whose result is always a view of their (first) input: an in-place write to the input shows through it
_VIEW_METHODS = frozenset({
    "view", "view_as", "unsqueeze", "squeeze", "transpose", "permute", "t", "expand", "expand_as", "narrow",
    "select", "unflatten", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "detach", "as_strided",
    "unfold", "chunk", "split", "unbind", "tensor_split", "split_with_sizes", "view_as_real", "real", "imag",
    "__getitem__",
})
_VIEW_FUNCTIONS = frozenset({
    torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute, torch.t, torch.narrow, torch.select,
    torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.diagonal, torch.detach, torch.chunk,
    torch.split, torch.unbind, torch.tensor_split, torch.as_strided, torch.view_as_real, torch.real, torch.imag,
    torch.unflatten,
})
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
# ops that return their input itself, a view of it, or a copy, depending on shapes, strides or dtypes
_MAYBE_ALIAS_METHODS = frozenset({
    "reshape", "reshape_as", "flatten", "contiguous", "to", "type", "type_as", "float", "double", "half",
    "bfloat16", "cpu", "cuda", "requires_grad_",
})
_MAYBE_ALIAS_FUNCTIONS = frozenset({torch.reshape, torch.flatten, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                    F.alpha_dropout, F.feature_alpha_dropout, torch.dropout})
_MAYBE_ALIAS_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)


def _basic_index(index: Any) -> bool:
    """Whether ``x[index]`` is basic indexing (a view): ints, slices, ``None`` and ``...`` only."""
    if isinstance(index, tuple):
        return all(_basic_index(i) for i in index)
    if isinstance(index, slice):
        return all(v is None or isinstance(v, int) for v in (index.start, index.stop, index.step))
    return index is None or index is Ellipsis or (isinstance(index, int) and not isinstance(index, bool))


def _bound(node: fx.Node, names: tuple[str, ...]) -> Any:
    """The value passed to the first parameter of ``node.target`` named in ``names`` (``None`` if unknown)."""
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return None
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
        if name in params and params.index(name) < len(node.args):
            return node.args[params.index(name)]
    return None


def _inplace_flag(node: fx.Node) -> tuple[int | str, Any] | None:
    """For a function with an ``inplace`` parameter: where that argument sits and its value."""
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" not in params:
        return None
    if "inplace" in node.kwargs:
        return "inplace", node.kwargs["inplace"]
    i = params.index("inplace")
    if i < len(node.args):
        return i, node.args[i]
    return None


def _mutated_arg(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, Any]:
    """``(True, tensor argument written to)`` for an in-place node, else ``(False, None)``."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if getattr(m, "inplace", False) is True and node.args:
            return True, node.args[0]
        return False, None
    if node.op == "call_method":
        t = node.target
        if isinstance(t, str) and t.endswith("_") and not t.startswith("__") and node.args:
            return True, node.args[0]
        return False, None
    if node.op == "call_function":
        t = node.target
        if t is operator.setitem:
            return True, node.args[0]
        if isinstance(node.kwargs.get("out"), fx.Node):
            return True, node.kwargs["out"]
        name = getattr(t, "__name__", "")
        module = getattr(t, "__module__", None) or ""
        if (name.endswith("_") and not name.startswith("_") and (module.startswith("torch") or t in _OUT_OF_PLACE_FUNCTIONS)
                and node.args):
            return True, node.args[0]
        flag = _inplace_flag(node)
        if flag is not None and flag[1] is not False and (node.args or "input" in node.kwargs):
            return True, node.args[0] if node.args else node.kwargs["input"]
    return False, None


def is_inplace(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether ``node`` writes into one of its arguments (``x.add_(1)``, ``nn.ReLU(inplace=True)``, ``x[i] = v`` ...)."""
    return _mutated_arg(node, modules if modules is not None else {})[0]


def alias_relation(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, fx.Node] | None:
    """How ``node``'s result may share memory with a tensor argument: ``('same'|'view'|'maybe', source)``."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _SAME_OBJECT_MODULES) and not (isinstance(m, _DROPOUTS) and m.training):
            return "same", src
        if isinstance(m, _MAYBE_ALIAS_MODULES):
            return "maybe", src
        return None
    if node.op == "call_method":
        if node.target in _VIEW_METHODS:
            return "view", src
        if node.target in _MAYBE_ALIAS_METHODS:
            return "maybe", src
        return None
    if node.op == "call_function":
        t = node.target
        if t is operator.getitem:
            return ("view" if _basic_index(node.args[1]) else "maybe"), src
        if t is getattr:
            return ("view", src) if node.args[1] in _VIEW_ATTRIBUTES else None
        if t in _VIEW_FUNCTIONS:
            return "view", src
        if t in _MAYBE_ALIAS_FUNCTIONS:
            return ("same" if _bound(node, ("training", "train")) is False else "maybe"), src
    return None


def _set_arg(node: fx.Node, where: int | str, value: Any) -> None:
    if isinstance(where, int):
        args = list(node.args)
        args[where] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[where] = value
        node.kwargs = kwargs


def _out_of_place(graph: fx.Graph, node: fx.Node, target: fx.Node) -> fx.Node:
    """Rewrite the in-place ``node`` (writing into ``target``) out of place; return the node holding the new value."""
    if node.op == "call_method" and node.target in _OUT_OF_PLACE_METHODS:
        node.target = node.target[:-1]
        return node
    if node.op == "call_function":
        if node.target in _OUT_OF_PLACE_FUNCTIONS:
            node.target = _OUT_OF_PLACE_FUNCTIONS[node.target]
            return node
        if node.kwargs.get("out") is target:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
            return node
        flag = _inplace_flag(node)
        if flag is not None and flag[1] is not False:
            _set_arg(node, flag[0], False)
            return node
    # anything else writes into a private copy: ``c = x.clone(); c.op_(...)`` (``c[i] = v`` for setitem)
    with graph.inserting_before(node):
        clone = graph.call_method("clone", args=(target,))
    node.replace_input_with(target, clone)
    return clone if node.op == "call_function" and node.target is operator.setitem else node


def _ancestors(v: fx.Node, parent: dict[fx.Node, tuple[str, fx.Node]]) -> set[fx.Node]:
    """The nodes ``v`` is derived from by alias edges (its bases)."""
    out = set()
    while v in parent:
        v = parent[v][1]
        out.add(v)
    return out


def functionalize_inplace(fx_model: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every in-place operation out of place, preserving what the network computes.

    For an in-place node ``n`` writing into tensor ``v``: ``n`` becomes its out-of-place form (or
    writes into a clone of ``v``), every later use of ``v`` (and of the tensors that are ``v`` itself:
    eval-mode dropout, ``nn.Identity``, earlier in-place results) reads ``n``'s value, and every view
    of ``v`` taken before ``n`` and used after it is taken again from the new value. The graph then
    holds no in-place operation, so neurons replacing activations out of place and dead-code
    elimination cannot change the result. Writing into a graph input is allowed (the converted
    network leaves its input untouched). In-place modules (``nn.ReLU(inplace=True)``) get ``inplace = False``:
    like every pass here, it edits the modules of ``fx_model`` (trace a copy of a model you keep).

    :raises InPlaceError: naming the node, when the write would show through a tensor the pass cannot
        re-derive (the base of a view, a sibling view, a possibly-copied alias from
        ``reshape``/``flatten``/``to``), or when it updates a parameter or buffer (module state the
        converted network would not keep)
    """
    graph = fx_model.graph
    modules = dict(fx_model.named_modules())
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    parent: dict[fx.Node, tuple[str, fx.Node]] = {}  # alias edges of the ORIGINAL program
    children: dict[fx.Node, list[fx.Node]] = {}
    current: dict[fx.Node, fx.Node] = {}  # original node -> node holding its value now
    replayed: list[fx.Node] = []
    inplace_modules: set[nn.Module] = set()

    def later_data_uses(k: fx.Node, i: int) -> bool:
        return any(order.get(u, -1) > i and not is_metadata_use(u) for u in k.users)

    def family(v: fx.Node) -> tuple[set[fx.Node], list[fx.Node]]:
        """The nodes that are ``v``'s tensor object, and every node of its alias tree (in graph order)."""
        top = v
        while top in parent and parent[top][0] == "same":
            top = parent[top][1]
        r = v
        while r in parent:
            r = parent[r][1]
        group, stack = set(), [top]
        while stack:
            k = stack.pop()
            group.add(k)
            stack.extend(c for c in children.get(k, ()) if parent[c][0] == "same")
        members, stack = [], [r]
        while stack:
            k = stack.pop()
            members.append(k)
            stack.extend(children.get(k, ()))
        return group, sorted(members, key=order.__getitem__)

    for n in nodes:
        inplace, v = _mutated_arg(n, modules)  # read before rewiring: alias facts are about the original program
        rel = None if inplace else alias_relation(n, modules)
        if current:
            for old in [a for a in n.all_input_nodes if a in current]:
                n.replace_input_with(old, current[old])
        if not (inplace and isinstance(v, fx.Node)):
            if rel is not None:
                parent[n] = rel
                children.setdefault(rel[1], []).append(n)
            continue
        i = order[n]
        group, members = family(v)
        state = [k for k in members if k.op == "get_attr"]
        if state:
            raise InPlaceError(
                f"the in-place operation at node {_node_desc(n, modules)} updates the module's state "
                f"{state[0].target!r} (a parameter or buffer); the converted network would not keep this "
                "update. Rewrite it out of place."
            )
        # views derived from v's object through 'same'/'view' edges only are taken again from the new value
        derivable, replay = set(group), []
        ancestors = _ancestors(v, parent)
        for k in members:
            if k in group:
                continue
            how, src = parent.get(k, ("base", None))
            if src in derivable and how in ("same", "view"):
                derivable.add(k)
                if later_data_uses(k, i):  # replayed with the views it is taken from (a chain)
                    chain = [k]
                    while parent[chain[-1]][1] not in group and parent[chain[-1]][1] not in replay:
                        chain.append(parent[chain[-1]][1])
                    replay.extend(reversed(chain))
            elif later_data_uses(k, i):
                relation = ("is a view of" if k in ancestors else
                            "may share memory with" if how == "maybe" else "shares memory with")
                raise InPlaceError(
                    f"the in-place operation at node {_node_desc(n, modules)} writes into {v.name!r}, which "
                    f"{relation} {_node_desc(k, modules)}, used afterwards; the converted network cannot "
                    "reproduce this aliasing. Rewrite the operation out of place (e.g. y = y.relu() instead of "
                    "y.relu_(), nn.ReLU() instead of nn.ReLU(inplace=True))."
                )
        src = current.get(v, v)
        if n.op == "call_module":
            inplace_modules.add(modules[n.target])
            new = n
        else:
            new = _out_of_place(graph, n, src)
        for k in group:
            current[k] = new
        after = n
        for k in sorted(set(replay), key=order.__getitem__):  # the view op again, on its source's value now
            with graph.inserting_after(after):
                after = graph.node_copy(k)
            after.args = (current.get(parent[k][1], parent[k][1]), *after.args[1:])
            current[k] = after
            replayed.append(after)
        parent[n] = ("same", v)
        children.setdefault(v, []).append(n)
    for m in inplace_modules:
        m.inplace = False
    for k in reversed(replayed):  # views replayed for a write that a later write superseded
        if not k.users:
            graph.erase_node(k)
    if inplace_modules or current:
        graph.lint()
        fx_model.recompile()
    return fx_model


# -- Conv-BN fusion --------------------------------------------------------------------


def _attr(fx_model: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return fx_model.get_parameter(node.target)
        except AttributeError:  # not a parameter: a buffer (running statistics) or an error for the caller
            return fx_model.get_buffer(node.target)
    raise ValueError("not a constant attribute")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _drop_unused_attributes(graph: fx.Graph) -> None:
    """Erase ``get_attr`` nodes nobody reads (left by a fused ``F.batch_norm``); nothing else is removed."""
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def fuse_conv_bn(fx_model: fx.GraphModule) -> fx.GraphModule:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it.

    Both ``nn.BatchNormNd`` modules and functional ``F.batch_norm(conv(x), running_mean, running_var,
    weight, bias, training=False)`` calls on module attributes (timm's ``BatchNormAct2d``) are fused:
    ``w' = w·γ/√(σ²+ε)``, ``b' = (b - μ)·γ/√(σ²+ε) + β``. A convolution called more than once
    (shared weights) is left alone: folding one BatchNorm into it would change its other calls.
    Only the fused BatchNorm nodes and the attribute reads they leave unused are removed: an
    operation whose result is unused (an in-place write) stays.
    """
    modules = dict(fx_model.named_modules())
    calls = Counter(n.target for n in fx_model.graph.nodes if n.op == "call_module")
    pairs = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))
    for node in list(fx_model.graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or type(modules.get(prev.target)) not in _CONVS or not _sole_value_user(prev, node):
            continue
        if calls[prev.target] > 1:
            continue
        conv = modules[prev.target]
        if node.op == "call_module":
            bn = modules.get(node.target)
            if not any(type(conv) is c and type(bn) is b for c, b in pairs) or not bn.track_running_stats:
                continue
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        elif node.op == "call_function" and node.target is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            kw = dict(zip(names, node.args))
            kw.update(node.kwargs)
            if kw.get("training", False) is not False:
                continue
            try:
                rm, rv, w, b = (_attr(fx_model, kw.get(k)) for k in ("running_mean", "running_var", "weight", "bias"))
            except (ValueError, AttributeError):
                continue
            if rm is None or rv is None:
                continue
            fused = copy.deepcopy(conv).eval()
            fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, rm, rv, kw.get("eps", 1e-5), w, b)
        else:
            continue
        parent, _, leaf = prev.target.rpartition(".")
        setattr(fx_model.get_submodule(parent) if parent else fx_model, leaf, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        fx_model.graph.erase_node(node)
    _drop_unused_attributes(fx_model.graph)
    fx_model.graph.lint()
    fx_model.delete_all_unused_submodules()
    fx_model.recompile()
    return fx_model


# -- step mode -------------------------------------------------------------------------

_FUNCTIONAL_POOLS = {
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")),
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
}


def modularise_pools(fx_model: fx.GraphModule) -> None:
    """Prepare for step-mode adaptation: functional pools with literal arguments become modules and
    ``x.ndim`` becomes ``x.dim()`` (which the adapter makes step-aware; timm asserts on it)."""
    for node in list(fx_model.graph.nodes):
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",):
            with fx_model.graph.inserting_after(node):
                new = fx_model.graph.call_method("dim", args=(node.args[0],))
            node.replace_all_uses_with(new)
            fx_model.graph.erase_node(node)
            continue
        if node.op != "call_function" or node.target not in _FUNCTIONAL_POOLS:
            continue
        cls, names = _FUNCTIONAL_POOLS[node.target]
        kwargs = dict(zip(names, node.args[1:]))
        kwargs.update({k: v for k, v in node.kwargs.items() if k in names})
        if any(isinstance(v, fx.Node) for v in kwargs.values()) or "return_indices" in node.kwargs:
            continue
        try:
            module = cls(**kwargs)
        except TypeError:
            continue
        target = unique_target(fx_model, f"{node.name}_pool")
        fx_model.add_submodule(target, module)
        with fx_model.graph.inserting_after(node):
            new = fx_model.graph.call_module(target, args=(node.args[0],))
        node.replace_all_uses_with(new)
        fx_model.graph.erase_node(node)
    fx_model.graph.lint()
    fx_model.recompile()


def adapt_step_mode(fx_model: fx.GraphModule, context: str) -> fx.GraphModule:
    """Make ``fx_model`` follow ``functional.set_step_mode`` (SpikingJelly's adapter).

    Functional pools are turned into modules first. If the graph holds an operation that the
    adapter cannot make sequence-aware, a warning says so and the single-step graph is returned.
    """
    modularise_pools(fx_model)
    trial = copy.deepcopy(fx_model)
    try:
        return adapt_step_mode_graph(
            trial,
            context=context,
            wrap_module_types=_RATE_CODING_STATELESS_MODULE_TYPES,
            safe_module_types=ELEMENTWISE_ACTIVATIONS,  # floating-point activations between sites: any shape
            safe_call_functions=(F.dropout, *ELEMENTWISE_FUNCTIONS),
        )
    except (ValueError, TypeError) as e:
        warnings.warn(
            f"{context}: the converted network runs single-step only (step_mode='s'); "
            f"multi-step adaptation failed: {e}",
            stacklevel=3,
        )
        return fx_model
