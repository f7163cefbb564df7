r"""``sj_sfn.report(snn)``: what a conversion did, layer by layer, and what it left floating point.

A converted network is never a silent partial conversion: the report names every SFN site (by
kind, signed or positive-only, per-channel or per-tensor), every weight layer with whether its
input is spiking and, when it is not, why (the analog model input, a functional call that
module-level placement does not wrap, a layer the converter left analog, ...), the activation,
normalisation and pooling operations that stay floating point, and the conversion path. With a
``loader`` it also measures (:func:`sj_sfn.energy.measure_energy`) which weight operations read
spikes at ATen level (functional ``F.conv2d``/``F.linear`` calls included) and the share of the
ANN's multiply-accumulates that became accumulates::

    ac_share = 1 - MACs_SNN / MACs_ANN          energy ratio = (0.9·ACs + 4.6·MACs_SNN) / (4.6·MACs_ANN)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn
from spikingjelly.activation_based.neuron import BaseNode
from torch import fx

from .calibration.budget import weight_layer_types
from .neuron import SFNode

__all__ = ["ConversionReport", "SiteInfo", "WeightLayerInfo", "report"]

FUNCTIONAL_CALL = "functional weight call inside the module (not wrapped by module-level placement)"
NOT_MEASURED = "unknown without a loader (give sj_sfn.report a loader to measure it)"
UNHANDLED_TYPE = "a layer type module-level placement does not wrap (it handles Conv1d/2d/3d, Linear, Conv1D)"

_ACTIVATION_WORDS = ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "mish", "softmax", "elu", "softplus",
                     "hardswish", "hardsigmoid", "quickgelu")
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


@dataclass
class SiteInfo:
    """One SFN site."""

    name: str
    kind: str
    signed: bool
    per_channel: bool
    max_spikes: int


@dataclass
class WeightLayerInfo:
    """One weight layer (module or functional call) and whether it reads spikes."""

    name: str
    layer_type: str
    spiking: bool | None  # None: not known without a measurement
    site: str | None = None  # the site feeding it, when known
    reason: str | None = None  # why its input is not spiking
    ann_macs: float | None = None  # per sample, when measured


@dataclass
class ConversionReport:
    """Result of :func:`report`; ``str(r)`` is a readable summary, ``r.to_dict()`` is JSON-ready."""

    path: str
    sites: list[SiteInfo] = field(default_factory=list)
    layers: list[WeightLayerInfo] = field(default_factory=list)
    floating_point: dict[str, int] = field(default_factory=dict)  # op type -> count
    measured: bool = False
    ac_share: float | None = None  # share of the ANN's MACs that became ACs
    analog_share: float | None = None  # share of the ANN's MACs in weight layers whose input is not spiking
    energy_ratio: float | None = None

    @property
    def sites_by_kind(self) -> dict[str, dict[str, int]]:
        """``{kind: {"sites", "signed", "positive", "per_channel"}}``."""
        out: dict[str, dict[str, int]] = {}
        for s in self.sites:
            d = out.setdefault(s.kind or "(none)", {"sites": 0, "signed": 0, "positive": 0, "per_channel": 0})
            d["sites"] += 1
            d["signed" if s.signed else "positive"] += 1
            d["per_channel"] += int(s.per_channel)
        return out

    @property
    def analog_layers(self) -> list[WeightLayerInfo]:
        """The weight layers whose input is not spiking (each with its reason)."""
        return [e for e in self.layers if e.spiking is False]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites_by_kind"] = self.sites_by_kind
        return d

    def __str__(self) -> str:
        lines = [f"conversion path: {self.path}; {len(self.sites)} spiking sites"]
        for kind, d in self.sites_by_kind.items():
            lines.append(f"  {kind:<10} {d['sites']:>4} sites  ({d['signed']} signed, {d['positive']} positive-only, "
                         f"{d['per_channel']} per-channel)")
        spiking = sum(e.spiking is True for e in self.layers)
        unknown = sum(e.spiking is None for e in self.layers)
        lines.append(f"weight layers: {len(self.layers)}, {spiking} with spiking input"
                     + (f", {unknown} not measured" if unknown else ""))
        for e in self.analog_layers:
            macs = f", {e.ann_macs:.3g} MACs/sample" if e.ann_macs is not None else ""
            lines.append(f"  analog input: {e.name} ({e.layer_type}{macs}): {e.reason}")
        for e in self.layers:
            if e.spiking is None:
                lines.append(f"  not measured: {e.name} ({e.layer_type}): {e.reason}")
        if self.floating_point:
            lines.append("floating point ops: " + ", ".join(f"{k} x{v}" for k, v in self.floating_point.items()))
        if self.measured:
            lines.append(f"measured: {self.ac_share:.3f} of the ANN's MACs became ACs; {self.analog_share:.3f} stay in "
                         f"layers with analog input; energy ratio E_SNN/E_ANN = {self.energy_ratio:.3f}")
        return "\n".join(lines)


def _path(snn: nn.Module) -> str:
    path = getattr(snn, "sfn_conversion_path", None)
    if path is not None:
        return str(path)
    if isinstance(snn, fx.GraphModule):
        return "fx"
    return "unknown"


def _is_activation(m: nn.Module) -> bool:
    from .ann2snn.matching import ELEMENTWISE_ACTIVATIONS

    name = type(m).__name__.lower()
    return isinstance(m, ELEMENTWISE_ACTIVATIONS + (nn.Softmax, nn.LogSoftmax)) or any(w in name for w in _ACTIVATION_WORDS)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm) or (
        "Norm" in type(m).__name__ and not m._modules)


def _floating_point(snn: nn.Module) -> dict[str, int]:
    """Activation, normalisation and average-pool module types (and FX functional calls) left in the network."""
    seen: Counter[str] = Counter()
    for _, m in snn.named_modules():
        if isinstance(m, (BaseNode, *weight_layer_types())):
            continue
        if _is_norm(m) or isinstance(m, _POOLS) or (not m._modules and _is_activation(m)):
            seen[type(m).__name__] += 1
    if isinstance(snn, fx.GraphModule):
        from .ann2snn.matching import ELEMENTWISE_FUNCTIONS

        extra = {*ELEMENTWISE_FUNCTIONS, *_functional_norms()}
        for node in snn.graph.nodes:
            if node.op == "call_function" and node.target in extra:
                seen[f"{getattr(node.target, '__name__', node.target)}()"] += 1
    return dict(sorted(seen.items()))


def _functional_norms() -> tuple:
    import torch
    import torch.nn.functional as F

    return (F.layer_norm, F.batch_norm, F.group_norm, F.softmax, torch.softmax, F.avg_pool2d, F.adaptive_avg_pool2d)


def _sites(snn: nn.Module) -> list[SiteInfo]:
    out = []
    for name, m in snn.named_modules():
        if isinstance(m, SFNode):
            per_channel = m.channel_dim is not None or m.theta_pos.numel() > 1
            out.append(SiteInfo(name=name, kind=m.kind, signed=m.signed, per_channel=per_channel, max_spikes=int(m.max_spikes)))
        elif isinstance(m, BaseNode):  # MTNode, SpikingJelly's IF/LIF neurons
            out.append(SiteInfo(name=name, kind=type(m).__name__, signed=False, per_channel=False,
                                max_spikes=int(getattr(m, "max_spikes", 1))))
    return out


_PASS_NAMES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity", "Flatten", "Unflatten", "MaxPool1d",
               "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
               "VoltageScaler"}  # a constant rescale keeps a spike train (MTNRecipe's x·s after the neuron)


def _source(value: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """:func:`~sj_sfn.ann2snn.placement.spike_source`, also through SpikingJelly's step-mode layers (``layer.Dropout``)."""
    from .ann2snn.placement import spike_source

    node = spike_source(value, modules)
    while node.op == "call_module" and type(modules.get(node.target)).__name__ in _PASS_NAMES and node.args \
            and isinstance(node.args[0], fx.Node):
        node = spike_source(node.args[0], modules)
    return node


def _fx_layers(snn: fx.GraphModule) -> list[WeightLayerInfo]:
    """Every weight node of a converted FX graph: spiking when its input comes from a neuron (through reshapes/pools)."""
    from .ann2snn.placement import is_weight_node
    from .ann2snn.temporaries import fired_site

    modules = dict(snn.named_modules())
    upstream: dict[fx.Node, bool] = {}
    out: dict[str, WeightLayerInfo] = {}
    for node in snn.graph.nodes:
        weight = is_weight_node(node, modules)
        upstream[node] = weight or any(upstream.get(a, False) for a in node.all_input_nodes)
        if not weight:
            continue
        if node.op == "call_module":
            name, kind = node.target, type(modules[node.target]).__name__
        else:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            owner = w.target.rpartition(".")[0] if isinstance(w, fx.Node) and w.op == "get_attr" else ""
            name, kind = owner or node.name, f"{getattr(node.target, '__name__', node.target)}()"
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(x, fx.Node):
            continue
        src = _source(x, modules)
        site = fired_site(src)  # a call_module site, or one that fires over a temporary (fire_temporary)
        neuron = None if site is None else modules.get(site)
        if isinstance(neuron, BaseNode):
            entry = WeightLayerInfo(name, kind, True, site=site)
        elif not any(upstream.get(a, False) for a in [src, *src.all_input_nodes]) and not upstream.get(src, False):
            entry = WeightLayerInfo(name, kind, False, reason="analog model input")
        else:
            what = f"{src.op} {getattr(src.target, '__name__', src.target)}"
            entry = WeightLayerInfo(name, kind, False, reason=f"input computed in floating point ({what})")
        if name in out and out[name].spiking and not entry.spiking:
            out[name] = entry  # a layer called twice: one non-spiking call makes it non-spiking
        out.setdefault(name, entry)
    return list(out.values())


def _module_layers(snn: nn.Module) -> list[WeightLayerInfo]:
    """Weight modules of a network converted without a graph: input sites, and what placement recorded."""
    from .ann2snn.module_placement import SITE_NAME
    from .ann2snn.placement import WEIGHT_MODULES

    placed = getattr(snn, "sfn_placement", None)
    recorded = {e.name: e for e in placed.layers} if placed is not None else {}
    out = []
    for name, m in snn.named_modules():
        if not name or not isinstance(m, weight_layer_types() + WEIGHT_MODULES):
            continue
        site = m._modules.get(SITE_NAME)
        if isinstance(site, SFNode):
            out.append(WeightLayerInfo(name, type(m).__name__, True, site=f"{name}.{SITE_NAME}"))
        elif name in recorded:
            e = recorded[name]
            out.append(WeightLayerInfo(name, type(m).__name__, e.spiking, reason=e.reason))
        elif placed is not None and not isinstance(m, weight_layer_types()):  # ConvTranspose, Bilinear
            out.append(WeightLayerInfo(name, type(m).__name__, False, reason=UNHANDLED_TYPE))
        else:
            out.append(WeightLayerInfo(name, type(m).__name__, None, reason=NOT_MEASURED))
    return out


def report(snn: nn.Module, ann: nn.Module | None = None, loader: Iterable | None = None, *,
           num_batches: int | None = 1, device: Any = None) -> ConversionReport:
    """Describe a converted network: its sites, each weight layer's input, what stays floating point.

    :param snn: a network returned by :func:`sj_sfn.convert` (or any network with SFN sites)
    :param ann: the source ANN (with ``loader``: its measured MACs are the reference)
    :param loader: batches to measure on (:func:`sj_sfn.energy.measure_energy`); without it the spiking
        status comes from the structure (FX graph, input sites, what the converter recorded)
    :param num_batches: batches of ``loader`` to measure (default 1; ``None`` = all)
    :param device: move inputs here
    """
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, got {type(snn).__name__}")
    rep = ConversionReport(path=_path(snn), sites=_sites(snn), floating_point=_floating_point(snn))
    rep.layers = _fx_layers(snn) if isinstance(snn, fx.GraphModule) else _module_layers(snn)
    if loader is not None:
        _measure(rep, snn, ann, loader, num_batches, device)
    return rep


def _measure(rep: ConversionReport, snn: nn.Module, ann: nn.Module | None, loader: Iterable, num_batches: int | None,
             device: Any) -> None:
    """Spiking status and MACs of every weight operation as :func:`measure_energy` counts them (ATen level)."""
    from .energy import measure_energy

    e = measure_energy(snn, loader, ann=ann, num_batches=num_batches, device=device)
    by_name = {x.name: x for x in rep.layers}
    by_name.update({row: by_name[layer] for row, layer in _row_names(snn).items() if layer in by_name})
    analog = 0.0
    for row in e.per_layer:
        if row.kind == "matmul":  # a product of two activations (attention), not a weight layer
            continue
        entry = by_name.get(row.name)
        if entry is None:  # a weight used by a functional call inside a module
            entry = WeightLayerInfo(row.name, f"functional ({row.kind})", row.spiking_input)
            rep.layers.append(entry)
            by_name[row.name] = entry
            if not row.spiking_input:
                entry.reason = FUNCTIONAL_CALL
        entry.ann_macs = row.ann_macs
        if row.spiking_input is not None:  # measured at ATen level: the last word
            entry.spiking = row.spiking_input
            if row.spiking_input is False and entry.reason in (None, NOT_MEASURED):
                entry.reason = "input not spiking (measured)"
            elif row.spiking_input:
                entry.reason = None
        if row.spiking_input is False:
            analog += row.ann_macs
    for entry in rep.layers:
        if entry.spiking is None and entry.reason == NOT_MEASURED:
            entry.reason = "not called on the measured batches"
    rep.measured = True
    rep.ac_share = 1.0 - e.macs / e.ann_macs if e.ann_macs > 0 else math.nan
    rep.analog_share = analog / e.ann_macs if e.ann_macs > 0 else math.nan
    rep.energy_ratio = e.ratio


def _row_names(snn: nn.Module) -> dict[str, str]:
    """``{energy row: weight layer}`` where they differ: a tied weight is named after its first owner (GPT-2's
    ``lm_head`` shares ``transformer.wte``'s matrix), as :func:`measure_energy` names its rows."""
    owners: dict[int, str] = {}
    for name, m in snn.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(p.untyped_storage().data_ptr(), name or pname)
    out = {}
    for name, m in snn.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(m, weight_layer_types()) and isinstance(w, nn.Parameter):
            owner = owners.get(w.untyped_storage().data_ptr())
            if owner is not None and owner != name:
                out[owner] = name
    return out
