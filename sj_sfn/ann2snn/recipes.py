"""Recipes for SpikingJelly 2.0's FX ``ann2snn.Converter``: one-timestep SFN and MTN networks.

``SFNRecipe``: every ReLU-family activation becomes a positive-only :class:`~sj_sfn.SFNode`
whose base threshold ``θ`` is the calibrated ``p``-quantile of that activation (capped by a
ReLU6/clamp ceiling ``c``: ``θ = min(q_p, c)``), with thresholds ``λ·θ·i``, ``i = 1..N``::

    snn = ann2snn.Converter(SFNRecipe(loader, lam=0.05, max_spikes=32)).convert(ann)
    out = snn(x)                       # one step, same input and output as the ANN

``MTNRecipe``: Theorem 2. SpikingJelly's ``RateCodingRecipe`` replaces ``ReLU`` by
``x/s → IF(threshold 1) → ·s`` (``s`` = the calibrated scale) and runs ``T`` steps; this
recipe calibrates identically and puts an MTN with threshold ``1/T``, at most ``T`` spikes
and initial potential ``v_IF(0)/T`` in the IF neuron's place, so that ONE step equals the
IF network's ``T``-step average whenever every IF input stays in ``[0, threshold]``.

Both recipes work on a deep copy: the caller's model is never modified. The converted
graph follows ``spikingjelly.activation_based.functional.set_step_mode``.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from spikingjelly.activation_based.ann2snn.modules import VoltageHook, VoltageScaler
from spikingjelly.activation_based.ann2snn.recipes.base import FXConversionRecipe
from spikingjelly.activation_based.ann2snn.recipes.rate_coding import RateCodingRecipe
from torch import fx

from ..calibration import SiteObserver, calibrate
from ..checks import check_offset, check_quantile
from ..neuron import MTNode, SFNode, set_stateful
from .inputs import calibration_loader, check_model, faithful_graph
from .matching import activation_input, match_relu_family, unsupported_activation
from .passes import adapt_step_mode, fuse_conv_bn
from .passes import unique_target as _unique_target
from .placement import analog_weight_inputs, feeds_weight_layer
from .temporaries import fire_temporaries_in_place

if TYPE_CHECKING:
    from spikingjelly.activation_based.ann2snn.converter import FXConverter

__all__ = ["SFNRecipe", "MTNRecipe", "fuse_conv_bn", "adapt_step_mode", "CNN_DEFAULT_LAM", "CNN_DEFAULT_V_INIT"]

#: Defaults for CNNs (N = 32), from the λ grids of ``bench/accuracy_vs_t.py`` (README): with rounding
#: (``v_init = 0.5``) λ = 0.05 is within 0.2 point of the ANN on digits and Fashion-MNIST (the
#: validation-picked λ on both); flooring (``v_init = 0``) loses 4+ points on Fashion-MNIST at its best λ.
#: Larger λ trades accuracy for energy (λ = 0.1: -0.65 point, energy ratio 0.27 instead of 0.53).
CNN_DEFAULT_LAM = 0.05
CNN_DEFAULT_V_INIT = 0.5


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _eval_copy(ann: Any) -> nn.Module:
    """A deep copy of ``ann`` in eval mode: conversion never edits the caller's model."""
    if not isinstance(ann, nn.Module):
        raise TypeError(f"expected an nn.Module to convert, got {type(ann).__name__}")
    return copy.deepcopy(ann).eval()


# -- SFN -------------------------------------------------------------------------------


class SFNRecipe(FXConversionRecipe):
    r"""Convert a CNN to a one-timestep Scale-and-Fire network.

    Each ReLU-family activation becomes ``SFNode(θ, lam=λ, max_spikes=N, ceiling=c)`` with
    ``θ = min(q_p, c)``, ``q_p`` the ``p``-quantile of that activation averaged over the
    calibration batches; the site's output is ``λθ·clip(⌊h/(λθ)⌋, 0, N)`` (capped at ``c``).
    The full scale ``N·λθ`` must cover the activation range: with ``N = 32`` useful ``λ``
    lie in ``[0.05, 1]``.

    :param dataloader: calibration batches (``x`` or ``(x, y, ...)``)
    :param lam: ``λ``, the global threshold scale (change later with :func:`sj_sfn.set_lambda`);
        default :data:`CNN_DEFAULT_LAM`
    :param max_spikes: ``N``, spikes per neuron and step
    :param p: calibration quantile
    :param per_channel: one threshold per channel (``channel_dim``) instead of per site
    :param channel_dim: the channel dimension of the activations (1 for ``[N, C, H, W]``)
    :param offset: threshold offset ``r`` in ``[0, 1)``: ``0.5`` (the default) rounds, ``0`` floors
    :param levels: non-uniform level multipliers ``y_1..y_N`` (default evenly spaced)
    :param num_batches: calibrate on at most this many batches
    :param fuse_bn: fold BatchNorm into the preceding convolution
    :param max_samples: per-batch subsample size of the quantile estimate
    :param backend: neuron backend (``'auto'``: the CUDA kernel on CUDA inputs when usable; ``'torch'`` or ``'cupy'``)
    :param progress: show a progress bar while calibrating
    :param spike_inputs: the placement rule for every architecture: a signed SFN in front of every
        weight layer whose input is not already spiking (after a residual addition, an average pool,
        a normalisation, or a non-ReLU activation, which then stays floating point); ``False``
        keeps the paper's CNN placement (ReLU-family sites only; any other activation is an error)
    :param keep_state: ``False`` (default): every site starts from rest on every call (same input, same
        output, no ``reset_net`` needed); ``True``: SpikingJelly's stateful nodes (multi-step use)
    :param v_init: deprecated name of ``offset``
    """

    def __init__(
        self,
        dataloader: Iterable,
        lam: float = CNN_DEFAULT_LAM,
        max_spikes: int = 32,
        p: float = 0.99,
        per_channel: bool = False,
        channel_dim: int = 1,
        offset: float = CNN_DEFAULT_V_INIT,
        levels: torch.Tensor | None = None,
        num_batches: int | None = None,
        fuse_bn: bool = True,
        max_samples: int = 1 << 17,
        backend: str = "auto",
        progress: bool = True,
        spike_inputs: bool = True,
        keep_state: bool = False,
        v_init: float | None = None,
    ) -> None:
        if v_init is not None:
            warnings.warn("SFNRecipe(v_init=...) is deprecated: the threshold offset is called offset", DeprecationWarning, stacklevel=2)
            offset = check_offset(v_init, "v_init")
        self.dataloader = dataloader
        self.spike_inputs = spike_inputs
        self.lam = lam
        self.max_spikes = max_spikes
        self.p = p
        self.per_channel = per_channel
        self.channel_dim = channel_dim
        self.offset = offset
        self.keep_state = keep_state
        self.levels = levels
        self.num_batches = num_batches
        self.fuse_bn = fuse_bn
        self.max_samples = max_samples
        self.backend = backend
        self.progress = progress
        self._sites: list[tuple[str, str, str | None, str, float | None]] = []
        self._input_sites: list[str] = []

    # -- hooks -------------------------------------------------------------------------
    def validate(self, converter: FXConverter) -> None:
        self.dataloader = calibration_loader(self.dataloader, "SFNRecipe")  # a tensor or dict is one batch
        _positive(self.lam, "lam (λ)")
        _positive_int(self.max_spikes, "max_spikes (N)")
        check_quantile(self.p)
        check_offset(self.offset, "offset")
        if not isinstance(self.keep_state, bool):
            raise TypeError(f"keep_state must be a bool, got {self.keep_state!r}")
        if self.num_batches is not None:
            _positive_int(self.num_batches, "num_batches")
        if not isinstance(self.channel_dim, int) or isinstance(self.channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {self.channel_dim!r}")

    def before_trace(self, converter: FXConverter, ann: nn.Module) -> nn.Module:
        self._reference = _eval_copy(check_model(ann, type(self).__name__))
        return self._reference

    def after_trace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        # in-place ops rewritten out of place first (SFNs are out of place, fusion prunes nodes), and the
        # graph checked against the model on the first calibration batch
        fx_model = faithful_graph(self._reference, fx_model, self.dataloader, converter.device, type(self).__name__)
        self._reference = None
        if self.fuse_bn:
            fx_model = fuse_conv_bn(fx_model)
        return fx_model.to(converter.device)

    def insert_observers(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        modules = dict(fx_model.named_modules())
        uses: dict[str, int] = {}
        self._sites = []
        for node in list(fx_model.graph.nodes):
            match = match_relu_family(node, modules)
            if match is None:
                bad = unsupported_activation(node, modules)
                if bad is not None and not self.spike_inputs:
                    raise ValueError(
                        f"SFNRecipe cannot convert the activation {bad}: only the ReLU family (ReLU, ReLU6, "
                        "Hardtanh(0, c), clamp(min=0[, max=c])) maps to positive-only SFN sites. Replace it by "
                        "nn.ReLU/nn.ReLU6 and fine-tune, or convert Transformers with sj_sfn.sformer.convert."
                    )
                continue
            if self.spike_inputs and not feeds_weight_layer(node, modules):
                continue  # its values reach no weight layer: the activation stays as it is
            if node.op == "call_module":
                uses[node.target] = uses.get(node.target, 0) + 1
            obs_target = _unique_target(fx_model, f"sfn_observer_{node.name}")
            obs = SiteObserver(
                p=float(self.p), signed=False, channel_dim=self.channel_dim if self.per_channel else None,
                max_samples=self.max_samples, name=node.name,
            )
            fx_model.add_submodule(obs_target, obs)
            with fx_model.graph.inserting_after(node):
                fx_model.graph.call_module(obs_target, args=(node,))
            self._sites.append((node.name, obs_target, node.target if node.op == "call_module" else None, match.kind, match.ceiling))
        self._input_sites = []
        if self.spike_inputs:
            relu_nodes = {n for n in fx_model.graph.nodes if n.name in {s[0] for s in self._sites}}
            for value, users in analog_weight_inputs(fx_model.graph, modules, relu_nodes):
                target = _unique_target(fx_model, f"sfn_input_{value.name}")
                obs = SiteObserver(
                    p=float(self.p), signed=True, channel_dim=self.channel_dim if self.per_channel else None,
                    max_samples=self.max_samples, name=f"{value.name} (input of {users[0].name})",
                )
                fx_model.add_submodule(target, obs)
                with fx_model.graph.inserting_after(value):
                    site = fx_model.graph.call_module(target, args=(value,))
                for user in users:
                    user.replace_input_with(value, site)
                self._input_sites.append(target)
        if not self._sites and not self._input_sites:
            raise ValueError(
                "SFNRecipe found no SFN site in the traced model: no ReLU-family activation (nn.ReLU, F.relu, torch.relu, "
                ".relu(), nn.ReLU6, F.relu6, nn.Hardtanh(0, c), clamp(min=0)) and no weight layer (Conv, Linear) "
                "fed by another weight layer: nothing to convert"
            )
        self._module_uses = uses
        fx_model.graph.lint()
        fx_model.recompile()
        return fx_model.to(converter.device)

    def calibrate(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        calibrate(fx_model, self.dataloader, num_batches=self.num_batches, device=converter.device,
                  progress=self.progress, desc="SFN calibration")
        return fx_model

    def make_input_node(self, stats: dict[str, Any]) -> SFNode:
        """The signed SFN in front of a weight layer whose input is not spiking: ``θ± `` from the quantiles."""
        per_channel = self.per_channel and stats["pos"].numel() > 1
        pos, neg = (stats[k] if per_channel else stats[k].reshape(()) for k in ("pos", "neg"))
        return SFNode(
            theta_pos=pos, theta_neg=neg, lam=float(self.lam), max_spikes=int(self.max_spikes),
            channel_dim=self.channel_dim if per_channel else None, offset=float(self.offset), levels=self.levels,
            backend=self.backend, kind="input",
        )

    def make_node(self, stats: dict[str, Any], ceiling: float | None, kind: str = "") -> SFNode:
        """The SFN for one site of the given ``kind`` (``"relu"``, ``"relu6"``, ...): ``θ = min(q_p, ceiling)``."""
        theta = stats["pos"]
        if ceiling is not None:
            theta = torch.clamp(theta, max=ceiling)
        channel_dim = self.channel_dim if self.per_channel and theta.numel() > 1 else None
        if theta.numel() == 1:
            theta = theta.reshape(())
        return SFNode.from_statistics(
            {"pos": theta}, lam=float(self.lam), max_spikes=int(self.max_spikes), signed=False, channel_dim=channel_dim,
            offset=float(self.offset), ceiling=ceiling, levels=self.levels, backend=self.backend, kind=kind,
        )

    def replace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        nodes = {n.name: n for n in fx_model.graph.nodes}
        for name, obs_target, module_target, kind, ceiling in self._sites:
            act = nodes[name]
            obs_node = next(u for u in act.users if u.op == "call_module" and u.target == obs_target)
            obs = fx_model.get_submodule(obs_target)
            sfn = self.make_node(obs.statistics(), ceiling, kind.lower()).to(converter.device)
            if module_target is not None and self._module_uses.get(module_target) == 1:
                target = module_target
                parent, _, leaf = target.rpartition(".")
                setattr(fx_model.get_submodule(parent) if parent else fx_model, leaf, sfn)
            else:
                base = module_target if module_target is not None else f"sfn_{name}"
                target = _unique_target(fx_model, base if module_target is None else f"{base}_sfn")
                fx_model.add_submodule(target, sfn)
            fx_model.graph.erase_node(obs_node)
            with fx_model.graph.inserting_after(act):
                new = fx_model.graph.call_module(target, args=(activation_input(act),))
            act.replace_all_uses_with(new)
            fx_model.graph.erase_node(act)
        for target in self._input_sites:  # signed sites at weight-layer inputs: the observer's slot becomes the SFN
            stats = fx_model.get_submodule(target).statistics()
            sfn = self.make_input_node(stats).to(converter.device)
            parent, _, leaf = target.rpartition(".")
            setattr(fx_model.get_submodule(parent) if parent else fx_model, leaf, sfn)
        fx_model.graph.lint()
        fx_model.delete_all_unused_submodules()
        fx_model.recompile()
        return adapt_step_mode(fx_model, "SFNRecipe").to(converter.device)

    def finalize(self, converter: FXConverter, fx_model: fx.GraphModule) -> nn.Module:
        fx_model.eval()
        set_stateful(fx_model, bool(self.keep_state))
        fire_temporaries_in_place(fx_model)  # sites over a temporary nothing else reads write their spike over it
        return fx_model


# -- MTN (Theorem 2) --------------------------------------------------------------------


class MTNRecipe(RateCodingRecipe):
    r"""The ``T``-step IF network of SpikingJelly's ``RateCodingRecipe``, as a one-step MTN network.

    Calibration and Conv-BN fusion are ``RateCodingRecipe``'s own (``VoltageHook`` with
    ``mode``/``momentum``, ``nn.ReLU`` modules, layer-wise scale ``s``). Each ``ReLU`` becomes
    ``x·(1/s) → MTNode(θ = 1/T, N = T, v_init = r/T) → ·s`` where the rate-coding network has
    ``x·(1/s) → IF(θ = 1, v(0) = r) → ·s``. Theorem 2: one MTN step on input ``x`` equals the
    IF network's output averaged over ``T`` steps of constant input ``x`` whenever every IF
    input stays in ``[0, 1]`` (after the ``1/s`` scaler) and ``0 <= r < 1``.

    :param dataloader: calibration batches
    :param time_steps: ``T`` of the IF network this one replaces
    :param v_init: the IF network's initial potential as a fraction ``r`` of its threshold
        (``RateCodingRecipe`` uses ``0``; a half-threshold IF network uses ``0.5``)
    :param mode: ``VoltageHook`` statistic (``"Max"``, ``"99.9%"``, or a fraction of the max)
    :param momentum: ``VoltageHook`` momentum over batches
    :param fuse_flag: fold BatchNorm into convolutions
    """

    def __init__(
        self,
        dataloader: Iterable,
        time_steps: int,
        v_init: float = 0.0,
        mode: str | float = "Max",
        momentum: float = 0.1,
        fuse_flag: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(dataloader, mode=mode, momentum=momentum, fuse_flag=fuse_flag)
        self.time_steps = time_steps
        self.v_init = v_init
        self.backend = backend

    def validate(self, converter: FXConverter) -> None:
        self.dataloader = calibration_loader(self.dataloader, "MTNRecipe")
        super().validate(converter)
        _positive_int(self.time_steps, "time_steps (T)")
        check_offset(self.v_init, "v_init")

    def before_trace(self, converter: FXConverter, ann: nn.Module) -> nn.Module:
        self._reference = _eval_copy(check_model(ann, type(self).__name__))
        return self._reference

    def after_trace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        fx_model = faithful_graph(self._reference, fx_model, self.dataloader, converter.device, type(self).__name__)
        self._reference = None
        return super().after_trace(converter, fx_model)

    def replace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        modules = dict(fx_model.named_modules())
        t = int(self.time_steps)
        count = 0
        for hook_node in list(fx_model.graph.nodes):
            if hook_node.op != "call_module" or not isinstance(modules.get(hook_node.target), VoltageHook):
                continue
            act = hook_node.args[0]
            if not (isinstance(act, fx.Node) and act.op == "call_module" and type(modules.get(act.target)) is nn.ReLU):
                continue
            scale = float(modules[hook_node.target].scale.item())
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"site {act.target!r}: calibrated scale must be finite and > 0, got {scale}")
            parent, _, leaf = hook_node.target.rpartition(".")
            prefix = f"{parent}.{leaf.replace('voltage_hook_', 'mtn_')}" if parent else leaf.replace("voltage_hook_", "mtn_")
            chain = [
                ("scaler0", VoltageScaler(1.0 / scale)),
                ("mtn_node", MTNode(v_threshold=1.0 / t, max_spikes=t, v_init=float(self.v_init) / t, backend=self.backend)),
                ("scaler1", VoltageScaler(scale)),
            ]
            prev, after = act.args[0], hook_node
            for leaf_name, module in chain:
                fx_model.add_submodule(f"{prefix}.{leaf_name}", module)
                with fx_model.graph.inserting_after(after):
                    prev = after = fx_model.graph.call_module(f"{prefix}.{leaf_name}", args=(prev,))
            hook_node.replace_all_uses_with(prev)
            act.replace_all_uses_with(prev)
            fx_model.graph.erase_node(hook_node)
            fx_model.graph.erase_node(act)
            count += 1
        if count == 0:
            raise ValueError("MTNRecipe found no nn.ReLU module to convert (RateCodingRecipe's calibration handles nn.ReLU only)")
        fx_model.graph.lint()
        fx_model.delete_all_unused_submodules()
        fx_model.recompile()
        return adapt_step_mode(fx_model, "MTNRecipe").to(converter.device)

    def finalize(self, converter: FXConverter, fx_model: fx.GraphModule) -> nn.Module:
        fx_model.eval()
        return fx_model
