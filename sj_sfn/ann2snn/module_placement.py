r"""Module-level placement: SFN sites at weight-layer inputs without tracing the model.

The fallback of :func:`sj_sfn.convert` for models ``torch.fx`` cannot trace (data-dependent
control flow, timm's VGG ``ConvMlp``), and the second pass of hybrid models (the convolutions
of a MobileViT beside its SFormer blocks). The rule is the FX rule of
:mod:`sj_sfn.ann2snn.placement`, applied to modules instead of graph nodes:

- every weight layer (``nn.Conv1d/2d/3d``, ``nn.Linear``, transformers ``Conv1D``) whose input
  is not already a spike train gets an SFN site on its input: the layer keeps its type, name and
  parameters, the site is its child ``input_site`` (``features.3.input_site.theta_pos`` in the
  state dict) and a forward pre-hook feeds the layer ``input_site(x)``. A pre-hook rather than a
  wrapper module: model code that reads the layer (``self.fc.in_features``, ``self.conv.weight``,
  ``isinstance`` checks) keeps working, and the weights keep the ANN's names, which
  :func:`sj_sfn.energy.measure_energy` matches between the SNN and the ANN;
- the site is positive-only (``o = λθ·clip(round(h/(λθ)), 0, N)``) when every calibration input
  of the layer was ``>= 0`` (the output of a ReLU, a ReLU6, an average pool of either, a
  SoftMax), with the ceiling ``c`` of the module that produced it when that is a ReLU6 or a
  ``Hardtanh(0, c)``; otherwise it is signed (``θ±`` from the ``p``- and ``(1-p)``-quantiles);
- a layer fed by the model input (the image itself, or anything computed from it before the
  first weight layer of the forward) stays analog and is charged MACs.

Thresholds come from :class:`~sj_sfn.calibration.SiteObserver` and
:func:`~sj_sfn.calibration.calibrate`, as on the FX path. Limits: functional weight calls
(``F.conv2d(x, self.weight)``, ``x @ W``) inside a module's ``forward`` are not wrapped (their
input stays analog, :func:`sj_sfn.report` lists them), the activations and normalisations stay
floating point modules, and a site placed by the pre-hook is lost if the converted network is
traced again with ``torch.fx`` (``torch.compile`` keeps it). The converted network runs
single-step (``step_mode='s'``).
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from spikingjelly.activation_based.base import MemoryModule

from ..calibration import SiteObserver, calibrate
from ..calibration.budget import weight_layer_types
from ..neuron import MultiLevelNode, SFNode

__all__ = ["SITE_NAME", "LayerInput", "ModulePlacement", "place_input_sites", "input_sites", "attach_site", "detach_site",
           "protect_reset"]

#: The child name of the site a weight layer reads through.
SITE_NAME = "input_site"

_PASSTHROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.Dropout3d, nn.Identity)

#: Why a weight layer's input stays analog.
ANALOG_INPUT = "analog model input"
NOT_CALLED = "not called during calibration"
EXCLUDED = "left analog by the converter"


@dataclass
class LayerInput:
    """What module-level placement decided for one weight layer."""

    name: str
    layer_type: str
    spiking: bool
    site: str | None = None  # qualified name of the SFN site placed on its input
    signed: bool | None = None
    reason: str | None = None  # why the input is not spiking (None when it is)


@dataclass
class ModulePlacement:
    """The outcome of :func:`place_input_sites`: one entry per weight layer, in module order."""

    layers: list[LayerInput] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return [e.site for e in self.layers if e.site is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [vars(e).copy() for e in self.layers]}


def _spike_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a weight layer with an input site: the layer reads ``input_site(x)``."""
    site = module._modules.get(SITE_NAME)
    if site is None:
        return None
    if args:
        return (site(args[0]), *args[1:]), kwargs
    if "input" in kwargs:
        return args, {**kwargs, "input": site(kwargs["input"])}
    return None


def attach_site(layer: nn.Module, site: nn.Module) -> None:
    """Give ``layer`` the input site ``site`` (replacing an earlier one; the pre-hook is registered once)."""
    if SITE_NAME not in layer._modules:
        layer.register_forward_pre_hook(_spike_input, with_kwargs=True)
    layer.add_module(SITE_NAME, site)


def detach_site(layer: nn.Module) -> None:
    """Remove ``layer``'s input site and its pre-hook: the layer reads its input as before."""
    layer._modules.pop(SITE_NAME, None)
    for key, fn in list(layer._forward_pre_hooks.items()):
        if fn is _spike_input:
            del layer._forward_pre_hooks[key]
            layer._forward_pre_hooks_with_kwargs.pop(key, None)


def input_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(layer name, layer)`` for every weight layer of ``model`` that reads through an input site."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, weight_layer_types())
            and isinstance(m._modules.get(SITE_NAME), SFNode)]


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if torch.is_tensor(t) else None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if torch.is_tensor(a):
            return a
    return None


def _relu_ceiling(m: nn.Module) -> tuple[bool, float | None]:
    """``(is ReLU family, ceiling)`` of a module: ReLU, ReLU6 (6), ``Hardtanh(0, c)`` (``c``)."""
    if type(m) is nn.ReLU:
        return True, None
    if type(m) is nn.ReLU6:
        return True, 6.0
    if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val > 0:
        return True, float(m.max_val)
    return False, None


class _Tracker:
    """Forward hooks that tell, for each weight-layer call, where its input came from.

    The model input, neuron outputs (spikes) and ReLU-family outputs are remembered per forward
    by storage, each with a weak reference to the tensor: a storage freed and reused by another
    tensor is not mistaken for the one remembered. Spike-preserving modules (max-pool, flatten,
    dropout, identity) pass a spike storage on; a view shares its storage, so ``x.view(...)`` of a
    spike map is still seen as spikes.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.layers = layers
        self.inputs: dict[int, weakref.ref] = {}
        self.spikes: dict[int, weakref.ref] = {}
        self.producer: dict[int, tuple[weakref.ref, nn.Module]] = {}
        self.weight_calls = 0
        self.calls: dict[str, int] = dict.fromkeys(layers, 0)
        self.analog: dict[str, int] = dict.fromkeys(layers, 0)
        self.spiking: dict[str, int] = dict.fromkeys(layers, 0)
        self.ceilings: dict[str, set[float | None]] = {n: set() for n in layers}
        self.handles = [model.register_forward_pre_hook(self._start, with_kwargs=True)]
        for name, m in model.named_modules():
            if isinstance(m, MultiLevelNode):
                self.handles.append(m.register_forward_hook(self._neuron))
            elif name in layers:
                self.handles.append(m.register_forward_pre_hook(self._layer(name), with_kwargs=True))
            elif not m._modules and not isinstance(m, SiteObserver):  # leaf modules: who produced a tensor
                self.handles.append(m.register_forward_hook(self._leaf))

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    @staticmethod
    def _holds(table: dict[int, Any], t: Any) -> bool:
        """Whether ``t`` lives in a storage remembered in ``table`` whose tensor is still alive."""
        s = _storage(t)
        ref = table.get(s)
        ref = ref[0] if isinstance(ref, tuple) else ref
        return ref is not None and (alive := ref()) is not None and _storage(alive) == s

    def _start(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs = {_storage(t): weakref.ref(t) for t in (*args, *kwargs.values()) if torch.is_tensor(t)}
        self.spikes.clear()
        self.producer.clear()
        self.weight_calls = 0

    def _neuron(self, m: nn.Module, args: tuple, out: Any) -> None:
        if torch.is_tensor(out):
            self.spikes[_storage(out)] = weakref.ref(out)

    def _leaf(self, m: nn.Module, args: tuple, out: Any) -> None:
        if not torch.is_tensor(out):
            return
        x = args[0] if args else None
        if isinstance(m, _PASSTHROUGH) and self._holds(self.spikes, x):
            self.spikes[_storage(out)] = weakref.ref(out)
        if self._holds(self.inputs, x):  # a normalised, padded or reshaped image is still the analog input
            self.inputs[_storage(out)] = weakref.ref(out)
        if _relu_ceiling(m)[0]:
            self.producer[_storage(out)] = (weakref.ref(out), m)
        else:
            self.producer.pop(_storage(out), None)  # written over in place by a non-ReLU module

    def _layer(self, name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            self.calls[name] += 1
            if self._holds(self.inputs, x) or self.weight_calls == 0:
                self.analog[name] += 1
            elif self._holds(self.spikes, x):
                self.spiking[name] += 1
            else:
                producer = self.producer[_storage(x)][1] if self._holds(self.producer, x) else nn.Identity()
                relu, ceiling = _relu_ceiling(producer)
                self.ceilings[name].add(ceiling if relu else math.inf)
            self.weight_calls += 1

        return hook


def _first_batch(loader: Iterable) -> Any:
    """The first batch of a re-iterable loader, or ``None`` for a one-shot iterator (reading it would lose a batch)."""
    if isinstance(loader, Iterator):
        return None
    return next(iter(loader), None)


def _verdict(name: str, tracker: _Tracker) -> tuple[bool, str | None] | None:
    """``(spiking, reason)`` when the layer needs no site, ``None`` when it does (or was not seen yet)."""
    calls = tracker.calls[name]
    if calls == 0:
        return None
    if tracker.analog[name]:
        return False, ANALOG_INPUT
    if tracker.spiking[name] == calls:
        return True, None
    return None


def _track(model: nn.Module, layers: dict[str, nn.Module], loader: Iterable, **kw: Any) -> _Tracker:
    tracker = _Tracker(model, layers)
    try:
        calibrate(model, loader, **kw)
    finally:
        tracker.close()
    return tracker


@torch.no_grad()
def place_input_sites(
    model: nn.Module,
    loader: Iterable,
    *,
    lam: float = 1.0,
    max_spikes: int = 32,
    p: float = 0.99,
    per_channel: bool = False,
    offset: float = 0.5,
    exclude: Iterable[str] = (),
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    call: Callable[[nn.Module, Any, torch.device], Any] | None = None,
    backend: str = "auto",
) -> ModulePlacement:
    r"""Place a calibrated SFN on the input of every weight layer of ``model`` whose input is not spiking (in place).

    A first forward on one batch finds the layers whose input is already spiking or is the model
    input; if any other layer is left, one calibration pass over ``loader``
    (:func:`~sj_sfn.calibration.calibrate`) records its ``p``-quantiles, and it gets
    ``SFNode(θ+, θ-, lam, max_spikes)``: positive-only when its inputs were never negative, with
    the ReLU6/Hardtanh ceiling of the module producing them. Per-channel thresholds use
    dimension 1 for convolutions and the last dimension for linear layers.

    :param model: the network (edited in place: convert a copy)
    :param exclude: names of weight layers to leave as they are (``reason`` = left analog by the converter)
    :param call: how a batch is run (default ``model(x)``; Hugging Face models pass ``model(**batch)``)
    :returns: a :class:`ModulePlacement` naming every weight layer, its site or why it has none
    """
    exclude = set(exclude)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, weight_layer_types()) and n}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no weight layer (Conv1d/2d/3d, Linear, Conv1D): nothing to convert")
    already = [n for n, m in layers.items() if SITE_NAME in m._modules]
    if already:
        raise ValueError(f"weight layers {already[:4]} already have an input site: convert the original ANN")
    run = {"num_batches": num_batches, "device": device, "call": call}
    decided: dict[str, tuple[bool, str | None]] = {n: (False, EXCLUDED) for n in layers if n in exclude}
    first = _first_batch(loader)
    if first is not None:  # one batch: which layers read spikes or the image already
        probe = _track(model, layers, [first], progress=False, desc="SFN input sites", **run)
        decided.update({n: v for n in layers if n not in decided and (v := _verdict(n, probe)) is not None})
        decided.update({n: (True, None) for n in exclude & set(layers) if _verdict(n, probe) == (True, None)})
    needy = {n: m for n, m in layers.items() if n not in decided}
    observers: dict[str, SiteObserver] = {}
    if needy:
        for name, m in needy.items():
            cdim = (1 if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) else -1) if per_channel else None
            observers[name] = SiteObserver(p=float(p), signed=True, channel_dim=cdim, name=f"{name}.{SITE_NAME}")
            attach_site(m, observers[name])
        try:
            tracker = _track(model, layers, loader, progress=progress, desc="SFN input sites", **run)
        except BaseException:
            for m in needy.values():
                detach_site(m)
            raise
    result = ModulePlacement()
    for name, m in layers.items():
        entry = LayerInput(name=name, layer_type=type(m).__name__, spiking=False)
        result.layers.append(entry)
        if name not in needy:
            entry.spiking, entry.reason = decided[name]
            continue
        verdict = _verdict(name, tracker)
        obs = observers[name]
        if verdict is None and (tracker.calls[name] == 0 or obs.num_batches.item() == 0):
            verdict = (False, NOT_CALLED)
        if verdict is not None:
            entry.spiking, entry.reason = verdict
            detach_site(m)
            continue
        node = _site_for(m, obs, tracker.ceilings[name], lam=lam, max_spikes=max_spikes, offset=offset, backend=backend)
        attach_site(m, node)
        entry.spiking, entry.site, entry.signed = True, f"{name}.{SITE_NAME}", node.signed
    protect_reset(model)
    return result


def _reset_with_arguments(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module.reset(...)`` as its class defines it; without arguments (``functional.reset_net``) nothing to do."""
    if not args and not kwargs:
        return None
    return type(module).reset(module, *args, **kwargs)


def protect_reset(model: nn.Module) -> list[str]:
    """Keep ``functional.reset_net`` from calling a ``reset`` that is not a neuron reset.

    SpikingJelly's ``reset_net`` calls ``m.reset()`` on every module that has one; module-level
    placement keeps the model's own classes, and some define ``reset`` with required arguments
    (timm's ``ClassifierHead.reset(num_classes)``). Those modules get an instance ``reset`` that does
    nothing when called without arguments and calls the class's ``reset`` otherwise
    (``model.reset_classifier(10)`` still works). Returns the names of the modules changed.
    """
    changed = []
    for name, m in model.named_modules():
        fn = getattr(type(m), "reset", None)
        if isinstance(m, MemoryModule) or not callable(fn) or "reset" in vars(m):
            continue
        try:
            params = list(inspect.signature(fn).parameters.values())[1:]
        except (TypeError, ValueError):
            continue
        if any(q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
               for q in params):
            m.reset = functools.partial(_reset_with_arguments, m)
            changed.append(name)
    return changed


def _site_for(layer: nn.Module, obs: SiteObserver, ceilings: set[float | None], *, lam: float, max_spikes: int,
              offset: float, backend: str) -> SFNode:
    """The SFN of a calibrated layer input: positive-only if it was never negative (ceiling: see the module doc)."""
    positive = bool((obs.min_val >= 0).all())
    ceiling = next(iter(ceilings)) if positive and len(ceilings) == 1 else None
    if ceiling is not None and (ceiling == math.inf or bool((obs.max_val > ceiling).any())):
        ceiling = None
    obs.signed = not positive  # a positive-only site does not use the (1-p)-quantile
    stats = obs.statistics()
    theta = stats["pos"] if ceiling is None else stats["pos"].clamp(max=ceiling)
    per_channel = obs.channel_dim is not None and theta.numel() > 1
    neg = None if positive else stats["neg"]
    if not per_channel:
        theta, neg = theta.reshape(()), None if neg is None else neg.reshape(())
    param = next(layer.parameters(), None)
    node = SFNode(
        theta_pos=theta, theta_neg=neg, lam=float(lam), max_spikes=int(max_spikes), offset=float(offset),
        ceiling=ceiling, channel_dim=obs.channel_dim if per_channel else None, backend=backend,
        kind="input" if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) else "linear_in",
    )
    return node.to(param.device) if param is not None else node
