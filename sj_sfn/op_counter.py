"""Multi-level spikes in SpikingJelly's op-counter framework (``spikingjelly.activation_based.op_counter``).

SpikingJelly's counters (``ACCounter``, ``MACCounter``, ``SynOpCounter``) hold one rule per ATen
operation and count a tensor as spikes only when it is binary (``ac._spike_nnz``): the output of
an SFN/MTN site, ``count × threshold``, is charged as dense MACs. The counters here are those
classes with the weight-operation rules replaced (through their ``extra_rules``, the way
SpikingJelly registers rules) by rules that know the spike counts:

* a **spike registry** ties the output tensor of every neuron (:class:`~sj_sfn.MultiLevelNode`
  and SpikingJelly ``BaseNode``) to its per-element costs, and carries them through the
  operations that only move, copy, pad, pool (max) or rescale spikes (``view``, ``permute``,
  ``expand``, ``clone``, ``constant_pad_nd``, ``max_pool*_with_indices``, ``mul`` by a constant,
  ...): a convolution fed through timm's ``Conv2dSame`` padding, a ``Linear`` on ``[B, N, C]``
  tokens, or ``q·scale @ kᵀ`` still sees spikes;
* the cost of a spiking input element with signed count ``k`` into a weight operation of fan-out
  ``F`` (the method, the paper's Sec. 3 and docs/spikingjelly.md): ``|k|·F`` ACs with evenly
  spaced levels; with custom levels ``y`` one graded spike, ``F`` ACs when ``y_|k|`` is a power of
  two and ``F`` MACs otherwise; a product of two spike tensors costs, per pair of non-zero
  elements, ``|k_a|·|k_b|`` ACs (a power-of-two graded operand counts 1), or one MAC when either
  operand is graded with a level that is not a power of two; a non-spiking operation stays dense
  MACs. Binary tensors count as SpikingJelly counts them, so a binary network's numbers are
  SpikingJelly's own.

SpikingJelly's ``estimate_simple_energy`` builds its counters itself and takes no counters from
the caller: :func:`multilevel_spikes` is the adapter (it hands the ``SimpleEnergyProfiler`` these
counters while active), and :func:`estimate_simple_energy` is SpikingJelly's function run inside it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from spikingjelly.activation_based.neuron import BaseNode
from spikingjelly.activation_based.op_counter.ac import ACCounter
from spikingjelly.activation_based.op_counter.mac import MACCounter
from spikingjelly.activation_based.op_counter.synop import SynOpCounter

from .neuron import MultiLevelNode

__all__ = [
    "Shadow",
    "OpCost",
    "SpikeRegistry",
    "WEIGHT_OPS",
    "weight_op_cost",
    "MultiLevelACCounter",
    "MultiLevelMACCounter",
    "MultiLevelSynOpCounter",
    "multilevel_spikes",
    "estimate_simple_energy",
]

aten = torch.ops.aten
_PYTHON_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.Python)


def _below_python_dispatch() -> contextlib.AbstractContextManager:
    """Run ATen ops without re-entering the counting mode (as SpikingJelly's own rules do)."""
    return torch._C._ExcludeDispatchKeyGuard(_PYTHON_KEY)


@dataclass
class Shadow:
    """Per-element costs of a spike tensor (float32, the tensor's shape).

    ``mag = |k|`` (the level index; firing rates), ``ac``: ACs per fan-out (``|k|``, or 1 for a graded
    spike at a power-of-two level), ``mac``: MACs per fan-out (1 for a graded spike at another level;
    ``None`` = none).
    """

    mag: torch.Tensor
    ac: torch.Tensor
    mac: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], Any]) -> Shadow:
        mag = fn(self.mag)
        ac = mag if self.ac is self.mag else fn(self.ac)
        return Shadow(mag, ac, None if self.mac is None else fn(self.mac))

    def nonzero(self) -> torch.Tensor:
        return (self.mag != 0).to(self.mag.dtype)

    @classmethod
    def of_node(cls, node: nn.Module, out: torch.Tensor) -> Shadow:
        """The costs of ``node``'s last output: its ``last_counts`` (MTN/SFN) or non-zero elements (SpikingJelly)."""
        counts = getattr(node, "last_counts", None) if isinstance(node, MultiLevelNode) else None
        if counts is None or counts.shape != out.shape:
            nz = (out != 0).to(torch.float32)
            return cls(nz, nz)
        ac, mac = node.level_costs(counts)
        mag = counts.abs().to(torch.float32)
        return cls(mag, mag if mac is None else ac.to(torch.float32), None if mac is None else mac.to(torch.float32))


def _binary_shadow(x: torch.Tensor) -> Shadow | None:
    """SpikingJelly's rule (``ac._spike_nnz``): a bool tensor or one whose elements are all 0 or 1."""
    if x.dtype == torch.bool:
        nz = x.to(torch.float32)
        return Shadow(nz, nz)
    if not x.is_floating_point() or x.numel() == 0:
        return None
    if not bool(x.eq(0).logical_or_(x.eq(1)).all().item()):
        return None
    nz = x.to(torch.float32)
    return Shadow(nz, nz)


_VIEW_LIKE = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.clone.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
    aten.detach.default, aten.flatten.using_ints, aten.repeat_interleave.self_int, aten.repeat.default,
    aten.index_select.default, aten.narrow.default, aten.as_strided.default, aten.unfold.default,
    aten.neg.default, aten.lift_fresh.default,
}  # fmt: skip
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default}
_SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_POOLS = {
    aten.max_pool1d_with_indices.default: 1, aten.max_pool2d_with_indices.default: 2,
    aten.max_pool3d_with_indices.default: 3,
}  # fmt: skip
_POOLS_NO_INDEX = {aten.max_pool2d.default: aten.max_pool2d_with_indices.default,
                   aten.max_pool3d.default: aten.max_pool3d_with_indices.default,
                   aten.max_pool1d.default: aten.max_pool1d_with_indices.default}  # fmt: skip
PROPAGATING_OPS = frozenset(
    _VIEW_LIKE | _SPLITS | _SCALES | set(_POOLS) | set(_POOLS_NO_INDEX)
    | {aten._to_copy.default, aten.constant_pad_nd.default, aten.cat.default, aten.stack.default}
)  # fmt: skip

#: the weight operations: ``(args index of the first operand, of the second)``
WEIGHT_OPS = {
    aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2),
    aten.convolution.default: (0, 1),
}  # fmt: skip


@dataclass
class OpCost:
    """Counts of one weight operation: ``acs``, ``events`` (non-zero spikes × fan-out), ``graded_macs``
    (graded spikes at non-power-of-two levels × fan-out), ``dense_macs`` (what the op costs on
    non-spiking operands) and ``macs`` (what it costs here: graded MACs, or the dense MACs when no
    operand spikes)."""

    kind: str
    dense_macs: float
    acs: float = 0.0
    events: float = 0.0
    graded_macs: float = 0.0
    spiking: bool = False
    product: bool = False
    input_mag: float = 0.0
    input_numel: int = 0

    @property
    def macs(self) -> float:
        return self.graded_macs if self.spiking else self.dense_macs


def _sum(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.sum(dtype=torch.float64).item())


def _pairs(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """``Σ (a @ b)`` over every batch: ``Σ_k (Σ_m a_mk)(Σ_n b_kn)``."""
    if a is None or b is None:
        return 0.0
    return _sum(a.to(torch.float64).sum(-2) * b.to(torch.float64).sum(-1))


class SpikeRegistry:
    """Which tensors of the running forward are spikes, with their per-element costs.

    Neuron outputs are registered by :meth:`node_hook` (a forward hook); :meth:`propagate` carries
    the costs through the spike-preserving ATen ops. ``binary_by_value``: also treat any binary
    tensor as spikes (SpikingJelly's rule). ``model``: its parameters and buffers are the constants
    a spike tensor may be multiplied by and stay spikes (voltage scalers).
    """

    def __init__(self, model: nn.Module | None = None, binary_by_value: bool = False) -> None:
        self.binary_by_value = binary_by_value
        self._spikes: dict[int, tuple[torch.Tensor, Shadow]] = {}
        self._static: dict[int, torch.Tensor] = {}
        self._constants: set[int] = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                self._constants.add(t.untyped_storage().data_ptr())
        self._cost_key: tuple | None = None
        self._cost: OpCost | None = None

    def clear(self) -> None:
        self._spikes.clear()
        self._static.clear()
        self._cost_key = self._cost = None

    # -- registration ----------------------------------------------------------------
    def mark(self, out: torch.Tensor, shadow: Shadow) -> None:
        self._spikes[id(out)] = (out, shadow)

    def mark_static(self, x: torch.Tensor) -> None:
        """``x`` is the network input, the same at every step of a rate-coded run."""
        self._static[id(x)] = x

    def is_static(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and self._static.get(id(x)) is x

    def node_hook(self, module: nn.Module, inputs: Any, out: Any) -> None:
        """Forward hook for neurons: their output tensor is spikes."""
        if isinstance(out, torch.Tensor):
            self.mark(out, Shadow.of_node(module, out))

    def shadow(self, x: Any) -> Shadow | None:
        if not isinstance(x, torch.Tensor):
            return None
        hit = self._spikes.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if self.binary_by_value:
            return _binary_shadow(x)
        return None

    # -- propagation -----------------------------------------------------------------
    def _is_constant(self, v: Any) -> bool:
        if isinstance(v, numbers.Number):
            return True
        if isinstance(v, torch.Tensor):
            return v.dim() == 0 or v.untyped_storage().data_ptr() in self._constants
        return False

    def propagate(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Register ``out`` when ``func`` only moves, copies, pads, max-pools or rescales a spike tensor."""
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and (hit := self._spikes.get(id(first))) is not None and hit[0] is first:
            return  # already done for another counter of the same mode
        if func is aten.cat.default or func is aten.stack.default:
            parts = [self.shadow(t) for t in args[0]]
            if parts and all(p is not None for p in parts) and isinstance(out, torch.Tensor):
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                with _below_python_dispatch():
                    mag = func([p.mag for p in parts], dim)
                    ac = func([p.ac for p in parts], dim)
                    macs = [p.mac if p.mac is not None else torch.zeros_like(p.mag) for p in parts]
                    mac = func(macs, dim) if any(p.mac is not None for p in parts) else None
                self.mark(out, Shadow(mag, ac, mac))
            return
        x = args[0] if args else None
        if func in _SCALES:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            sa, sb = self.shadow(a), self.shadow(b)
            if func in (aten.div.Tensor, aten.div.Scalar):
                sb = None  # a constant divided by spikes is not spikes
            s, other = (sa, b) if sa is not None else (sb, a)
            if s is None or not self._is_constant(other) or not isinstance(out, torch.Tensor):
                return
            if func is aten.div.Tensor and isinstance(other, torch.Tensor) and bool((other == 0).any()):
                return
            self.mark(out, s if s.mag.shape == out.shape else s.map(lambda t: t.expand(out.shape)))
            return
        s = self.shadow(x)
        if s is None:
            self._propagate_static(func, x, out)
            return
        with _below_python_dispatch():
            if func in _VIEW_LIKE:
                if isinstance(out, torch.Tensor):
                    self.mark(out, s.map(lambda t: func(t, *args[1:], **kwargs)))
            elif func is aten._to_copy.default:
                if isinstance(out, torch.Tensor) and out.shape == x.shape:
                    self.mark(out, s)
            elif func is aten.constant_pad_nd.default:
                value = args[2] if len(args) > 2 else kwargs.get("value", 0)
                if value == 0 and isinstance(out, torch.Tensor):
                    self.mark(out, s.map(lambda t: func(t, args[1], 0.0)))
            elif func in _SPLITS:
                comps = [func(c, *args[1:], **kwargs) if c is not None else None for c in (s.mag, s.ac, s.mac)]
                for i, o in enumerate(out):
                    mag = comps[0][i]
                    ac = mag if s.ac is s.mag else comps[1][i]
                    self.mark(o, Shadow(mag, ac, None if comps[2] is None else comps[2][i]))
            elif func in _POOLS or func in _POOLS_NO_INDEX:
                with_indices = _POOLS_NO_INDEX.get(func, func)
                values, indices = out if func in _POOLS else with_indices(*args, **kwargs)
                nd = _POOLS[with_indices]

                def gather(t: torch.Tensor) -> torch.Tensor:
                    return t.flatten(-nd).gather(-1, indices.flatten(-nd)).view(indices.shape)

                self.mark(values if func in _POOLS else out, s.map(gather))

    def _propagate_static(self, func: Any, x: Any, out: Any) -> None:
        if func in _VIEW_LIKE and self.is_static(x) and isinstance(out, torch.Tensor):
            self.mark_static(out)

    # -- costs -----------------------------------------------------------------------
    def cost(self, func: Any, args: tuple, kwargs: dict, out: Any) -> OpCost:
        """The :class:`OpCost` of one weight operation (memoised: several counters ask for the same call)."""
        key = (func, id(out), tuple(id(a) for a in args[:3]))
        if self._cost_key == key and self._cost is not None:
            return self._cost
        cost = weight_op_cost(func, args, kwargs, out, self)
        self._cost_key, self._cost = key, cost
        return cost


def _conv_occupancy(a: torch.Tensor | None, w: torch.Tensor, args: tuple) -> float:
    """``Σ_in a·fan-out(in)`` of a convolution: the input weighted by how many weights each element meets."""
    if a is None:
        return 0.0
    _, _, _, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    with torch.no_grad(), _below_python_dispatch():
        a = a.to(torch.float64)
        if transposed:
            occ = aten.convolution.default(a, torch.ones_like(w, dtype=torch.float64), None, stride, padding, dilation,
                                           True, output_padding, groups)  # fmt: skip
            return _sum(occ)
        kernel = torch.ones((groups, w.shape[1], *w.shape[2:]), dtype=torch.float64, device=a.device)
        occ = aten.convolution.default(a, kernel, None, stride, padding, dilation, False, [0] * len(stride), groups)
    return _sum(occ) * (int(w.shape[0]) // groups)


def weight_op_cost(func: Any, args: tuple, kwargs: dict, out: Any, registry: SpikeRegistry) -> OpCost:
    """The counts of one weight operation (see the module doc) with the spikes ``registry`` knows."""
    i, j = WEIGHT_OPS[func]
    a, b = args[i], args[j]
    sa, sb = registry.shadow(a), registry.shadow(b)
    if func is aten.convolution.default:
        transposed = args[6]
        spatial = a.shape[2:] if transposed else out.shape[2:]
        dense = float(a.shape[0] * math.prod(spatial) * b.shape[0] * b.shape[1] * math.prod(b.shape[2:]))
        cost = OpCost("conv", dense)
        if sa is not None:
            cost.spiking = True
            cost.acs = _conv_occupancy(sa.ac, b, args)
            cost.graded_macs = _conv_occupancy(sa.mac, b, args)
            cost.events = _conv_occupancy(sa.nonzero(), b, args)
            cost.input_mag, cost.input_numel = _sum(sa.mag), sa.mag.numel()
        return cost
    k = a.shape[-1]
    dense = float(out.numel() * k)
    cost = OpCost("matmul", dense)
    with torch.no_grad(), _below_python_dispatch():
        if sa is not None and sb is not None:  # a product of two spike tensors: per pair of spikes that meet
            cost.spiking = cost.product = True
            na, nb = sa.nonzero(), sb.nonzero()
            cost.acs = _pairs(sa.ac, sb.ac)
            cost.events = _pairs(na, nb)
            cost.graded_macs = _pairs(sa.mac, nb) + _pairs(na, sb.mac) - _pairs(sa.mac, sb.mac)
        elif sa is not None or sb is not None:
            s, fanout = (sa, b.shape[-1]) if sa is not None else (sb, a.shape[-2])
            cost.spiking = True
            cost.acs = _sum(s.ac) * fanout
            cost.graded_macs = _sum(s.mac) * fanout
            cost.events = _sum(s.nonzero()) * fanout
            cost.input_mag, cost.input_numel = _sum(s.mag), s.mag.numel()
    return cost


# -- SpikingJelly counters with multi-level rules -----------------------------------------


def _rules(registry: SpikeRegistry, value: Callable[[OpCost], float]) -> dict:
    def weight_rule(func):
        return lambda args, kwargs, out: round(value(registry.cost(func, args, kwargs, out)))

    def propagate_rule(func):
        def rule(args, kwargs, out):
            registry.propagate(func, args, kwargs, out)
            return 0

        return rule

    rules = {func: propagate_rule(func) for func in PROPAGATING_OPS}
    rules.update({func: weight_rule(func) for func in WEIGHT_OPS})
    return rules


class _MultiLevel:
    """Mixin: the weight-op rules of SpikingJelly's counter replaced by multi-level ones (``extra_rules``)."""

    _value: Callable[[OpCost], float]

    def __init__(self, registry: SpikeRegistry, extra_rules: dict | None = None, extra_ignore_modules: list | None = None):
        rules = _rules(registry, type(self)._value)
        rules.update(extra_rules or {})
        super().__init__(extra_rules=rules, extra_ignore_modules=extra_ignore_modules)  # type: ignore[call-arg]
        self.registry = registry


class MultiLevelACCounter(_MultiLevel, ACCounter):
    """SpikingJelly's ``ACCounter`` (element-wise additions, pooling, BN as there) with weight ops charged
    ``|k|`` ACs per fan-out (1 for a power-of-two graded spike)."""

    _value = staticmethod(lambda c: c.acs)


class MultiLevelMACCounter(_MultiLevel, MACCounter):
    """SpikingJelly's ``MACCounter`` with weight ops on spikes charged only their graded (non-power-of-two) MACs."""

    _value = staticmethod(lambda c: c.macs)


class MultiLevelSynOpCounter(_MultiLevel, SynOpCounter):
    """SpikingJelly's ``SynOpCounter``: synaptic operations triggered by spikes (ACs plus graded MACs)."""

    _value = staticmethod(lambda c: c.acs + c.graded_macs if c.spiking else 0.0)


@contextlib.contextmanager
def multilevel_spikes(model: nn.Module, binary_by_value: bool = True) -> Iterator[SpikeRegistry]:
    """While active, SpikingJelly's ``estimate_simple_energy`` counts ``model``'s multi-level spikes right.

    The adapter for an estimator without an extension point: SpikingJelly's ``SimpleEnergyProfiler``
    builds its ``ACCounter``/``MACCounter``/``SynOpCounter`` from its module's names; inside this
    context those names are the multi-level counters above, every neuron of ``model`` records its
    counts, and its output is registered as spikes. Everything is restored on exit.
    """
    from spikingjelly.activation_based.op_counter import simple_energy

    registry = SpikeRegistry(model, binary_by_value=binary_by_value)
    saved = (simple_energy.ACCounter, simple_energy.MACCounter, simple_energy.SynOpCounter)
    handles = [model.register_forward_pre_hook(lambda m, a: registry.clear())]
    stores = []
    for m in model.modules():
        if isinstance(m, (MultiLevelNode, BaseNode)):
            if isinstance(m, MultiLevelNode):
                stores.append((m, m.store_counts))
                m.store_counts = True
            handles.append(m.register_forward_hook(registry.node_hook))
    simple_energy.ACCounter = functools.partial(MultiLevelACCounter, registry)
    simple_energy.MACCounter = functools.partial(MultiLevelMACCounter, registry)
    simple_energy.SynOpCounter = functools.partial(MultiLevelSynOpCounter, registry)
    try:
        yield registry
    finally:
        simple_energy.ACCounter, simple_energy.MACCounter, simple_energy.SynOpCounter = saved
        for h in handles:
            h.remove()
        for m, s in stores:
            m.store_counts = s
        registry.clear()


def estimate_simple_energy(model: nn.Module, inputs: Any, *, config: Any = None) -> Any:
    """SpikingJelly's ``op_counter.simple_energy.estimate_simple_energy`` with multi-level spikes counted right.

    Same arguments and ``SimpleEnergyReport``; the compute part charges every spiking input
    element ``|k|·F`` ACs (see the module doc), the rest (element-wise additions, memory) is
    SpikingJelly's model unchanged.
    """
    from spikingjelly.activation_based.op_counter import simple_energy

    with multilevel_spikes(model):
        return simple_energy.estimate_simple_energy(model, inputs, config=config)
