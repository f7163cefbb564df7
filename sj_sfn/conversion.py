"""``sj_sfn.convert`` (defined here, in ``sj_sfn.conversion``): the one entry point from a trained ANN to a one-timestep SNN.

CNN-like models (ReLU family) go through :class:`~sj_sfn.ann2snn.SFNRecipe` and SpikingJelly's
FX ``Converter``; a model ``torch.fx`` cannot trace (data-dependent control flow) falls back to
module-level placement (:mod:`sj_sfn.ann2snn.module_placement`: a site on the input of every
weight layer, no graph needed). Transformers (timm ``VisionTransformer``/``Eva``, or any model
holding ``nn.MultiheadAttention`` or a timm ``Attention``) go to :func:`sj_sfn.sformer.convert`,
and the weight layers outside its attention/MLP blocks (a MobileViT's convolutions) then get
input sites by module-level placement. ``snn.sfn_conversion_path`` says which path ran
(``'fx'``, ``'module'``, ``'sformer'``, ``'sformer+module'``, ``'hf'``).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .calibration.budget import allocate_thresholds, check_budget
from .calibration.reconstruction import DEFAULT_RECONSTRUCTION_STEPS
from .calibration.reconstruction import reconstruct as reconstruct_outputs
from .checks import check_max_spikes, check_offset, check_positive_float, check_quantile
from .neuron import MultiLevelNode, set_lambda, set_stateful
from .utils import model_device

if TYPE_CHECKING:
    from .ann2snn.module_placement import ModulePlacement

__all__ = ["convert", "is_transformer", "DEFAULT_ENERGY_BUDGET", "raised_while_tracing"]

#: The energy ratio ``E_SNN/E_ANN`` that ``sj_sfn.convert`` calibrates to by default.
DEFAULT_ENERGY_BUDGET = 0.35

_TRANSFORMER_CLASSES = {"VisionTransformer", "Eva", "VisionTransformerDistilled", "Beit", "DeiT"}


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a Transformer: a timm ViT/Eva, or it holds an attention module SFormer converts
    (:func:`sj_sfn.sformer.core.attention_modules`: timm's ``Attention`` family and its variants, ``nn.MultiheadAttention``)."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, nn.MultiheadAttention):
            return True
        if cls.__module__.startswith("timm.") and (cls.__name__ in _TRANSFORMER_CLASSES or cls.__name__.endswith("Attention")):
            return True
    try:
        from .sformer.core import attention_modules
    except ImportError:  # SFormer unavailable in this installation
        return False
    return bool(attention_modules(model))


def _sformer_convert():
    try:
        module = importlib.import_module("sj_sfn.sformer")
    except ImportError as e:
        raise NotImplementedError(
            "converting Transformers is not supported yet in this installation: sj_sfn.sformer "
            f"could not be imported ({e}); CNNs convert through sj_sfn.SFNRecipe"
        ) from e
    fn = getattr(module, "convert", None)
    if fn is None:
        raise NotImplementedError("converting Transformers is not supported yet: sj_sfn.sformer has no convert()")
    return fn


def convert(
    model: nn.Module,
    dataloader: Iterable,
    lam: float | None = None,
    max_spikes: int = 32,
    p: float = 0.99,
    *,
    per_channel: bool = False,
    offset: float | None = None,
    keep_state: bool = False,
    calibration: str | None = None,
    energy_budget: float = DEFAULT_ENERGY_BUDGET,
    level_sets: str | Iterable[str] | None = None,
    v_init: float | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    placement: str = "auto",
    reconstruct: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    r"""Convert a trained ANN into a one-timestep SNN (the caller's model is not modified).

    Every activation site gets an SFN with thresholds ``λ·θ·i`` (``i = 1..N``), ``θ`` the
    ``p``-quantile of that site's activations on ``dataloader``; ``sj_sfn.set_lambda(snn, λ')``
    rescales later without recalibrating.

    :param model: a CNN with ReLU-family activations, or a timm Vision Transformer
    :param dataloader: calibration batches (``x`` or ``(x, y, ...)``); a single tensor ``x`` (or a dict) is ONE
        batch, a lone ``(x, y)`` pair must be wrapped: ``[(x, y)]``
    :param lam: ``λ``; ``None`` = the family default (CNNs: ``0.05``, see
        :data:`sj_sfn.ann2snn.recipes.CNN_DEFAULT_LAM`; Transformers: :func:`sj_sfn.sformer.convert`'s)
    :param max_spikes: ``N``
    :param p: calibration quantile
    :param per_channel: per-channel thresholds
    :param offset: threshold offset ``r ∈ [0, 1)`` (``0.5`` = round, ``0`` = floor); ``None`` = the family
        default (CNNs: ``0.5``, measured to beat flooring; Transformers: the SFormer default)
    :param keep_state: ``False`` (default): every SFN starts from rest on every call, so the same input
        gives the same output without ``functional.reset_net``; ``True``: SpikingJelly's stateful nodes
        (multi-step use, Theorem 2; see docs/spikingjelly.md)
    :param calibration: how thresholds are chosen. ``'budget'`` (the default when ``lam`` is not given):
        every site's step is allocated to minimise the predicted output error at the energy ratio
        ``energy_budget`` (:func:`sj_sfn.calibration.allocate_thresholds`; ``λ = 1`` = as allocated).
        ``'quantile'`` (the default when ``lam`` is given): the paper's ``θ = p``-quantile, step ``λθ``
    :param energy_budget: the target ``E_SNN / E_ANN`` of ``calibration='budget'``
    :param level_sets: the level sets ``calibration='budget'`` chooses from per site (``None``: evenly spaced,
        ``'float2s'`` and ``'float3s'``; ``'uniform'`` = evenly spaced only; see
        :func:`sj_sfn.calibration.allocate_thresholds` and docs/calibration.md)
    :param v_init: deprecated name of ``offset``
    :param num_batches: calibrate on at most this many batches
    :param device: conversion device (default: the model's)
    :param progress: progress bar while calibrating
    :param placement: CNN-like models: ``'auto'`` (the FX recipe; module-level placement when ``torch.fx`` cannot
        trace the model, with a warning), ``'fx'`` (no fallback) or ``'module'`` (module-level placement:
        a site on the input of every weight layer, found with forward hooks; see
        :mod:`sj_sfn.ann2snn.module_placement`). Transformers take ``'auto'`` only
    :param reconstruct: Adam steps of output reconstruction after the thresholds are set: the converted
        network's weights and steps are fitted to the ANN's outputs on ``dataloader``, with a held-out quarter
        of the rows choosing what is kept (:func:`sj_sfn.calibration.reconstruct`; ``snn.sfn_reconstruction``
        reports it). ``None``: :data:`~sj_sfn.calibration.DEFAULT_RECONSTRUCTION_STEPS` with
        ``calibration='budget'``, none with the paper's quantile; ``0``: none (the weights stay the ANN's)
    :param kwargs: passed on to :class:`~sj_sfn.ann2snn.SFNRecipe` or :func:`sj_sfn.sformer.convert`
    :returns: an ``nn.Module``; ``snn(x)`` takes the ANN's input and returns its kind of output
    """
    from .ann2snn.inputs import calibration_loader, check_model

    check_model(model, "sj_sfn.convert")  # an nn.Module, not converted yet, no meta tensors, a weight layer
    dataloader = calibration_loader(dataloader, "sj_sfn.convert")  # a single tensor (or dict) is one batch
    if v_init is not None:
        warnings.warn("convert(v_init=...) is deprecated: the threshold offset is called offset", DeprecationWarning, stacklevel=2)
        offset = check_offset(v_init, "v_init") if offset is None else offset
    if calibration is None:
        calibration = "quantile" if lam is not None else "budget"
    if calibration not in ("budget", "quantile"):
        raise ValueError(f"calibration must be 'budget' or 'quantile', got {calibration!r}")
    if placement not in ("auto", "fx", "module"):
        raise ValueError(f"placement must be 'auto', 'fx' or 'module', got {placement!r}")
    if reconstruct is None:
        reconstruct = DEFAULT_RECONSTRUCTION_STEPS if calibration == "budget" else 0
    if isinstance(reconstruct, bool) or not isinstance(reconstruct, int) or reconstruct < 0:
        raise ValueError(f"reconstruct must be a number of steps >= 0 (0: none), got {reconstruct!r}")
    if calibration == "budget":
        check_budget(energy_budget)
        lam = 1.0 if lam is None else lam
    elif level_sets is not None:
        raise ValueError("level_sets chooses levels in calibration='budget'; the quantile calibration keeps evenly spaced levels")
    optional = {k: v for k, v in (("lam", lam), ("offset", offset)) if v is not None}
    common = {"max_spikes": max_spikes, "p": p, "per_channel": per_channel, "num_batches": num_batches, "progress": progress}
    if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from .hf import convert as hf_convert  # Hugging Face models: sj_sfn.hf (the "hf" extra)

        snn = hf_convert(model, dataloader, device=device, **common, **optional, **kwargs)
        path = "hf"
    elif placement != "auto" and is_transformer(model):
        raise ValueError(f"placement={placement!r} applies to CNN-like models; Transformers convert with placement='auto'")
    elif is_transformer(model):
        fn = _sformer_convert()
        snn = fn(model, dataloader, device=device, **common, **optional, **kwargs)
        path = "sformer"
        placed = _hybrid_sites(snn, dataloader, device=device, spike_head=kwargs.get("spike_head", True),
                               offset=optional.get("offset", 0.5), **common)
        if placed.sites:
            path = "sformer+module"
        snn.sfn_placement = placed
    else:
        reason = "placement='module'" if placement == "module" else None
        if reason is None:
            try:
                snn = _fx_convert(model, dataloader, device, keep_state, common, optional, kwargs)
                path = "fx"
            except _trace_failures() as e:
                raise type(e)(f"{e}; sj_sfn.convert(..., placement='module') converts without a graph") from e
            except Exception as e:  # torch.fx could not trace the model (on the converter's copy of it)
                if placement == "fx" or not raised_while_tracing(e):
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if reason is not None:
            if placement == "auto":
                warnings.warn(
                    f"sj_sfn.convert: torch.fx cannot trace {type(model).__name__} ({reason}); converting with "
                    "module-level placement (a site on the input of every weight layer; functional weight calls stay "
                    "analog, see sj_sfn.report)", stacklevel=2,
                )
            snn = _module_convert(model, dataloader, device=device, **common, **optional, **kwargs)
            path = "module"
    snn.sfn_conversion_path = path
    _neurons_to(snn, model_device(model) if device is None else torch.device(device))  # sites made on the CPU join the model (e.g. on CUDA)
    set_stateful(snn, keep_state)  # Transformers: the SFormer/HF sites follow keep_state too
    if calibration == "budget":
        sets = {} if level_sets is None else {"level_sets": level_sets}
        allocation = allocate_thresholds(snn, dataloader, energy_budget, num_batches=num_batches, device=device,
                                         progress=progress, **sets)
        if lam != 1.0:
            set_lambda(snn, lam)
        snn.sfn_allocation = allocation
    if reconstruct:
        snn.sfn_reconstruction = reconstruct_outputs(snn, model, dataloader, steps=reconstruct, num_batches=num_batches,
                                                     device=device, progress=progress)
    return snn


def _neurons_to(snn: nn.Module, device: torch.device) -> None:
    """Move every SFN/MTN node's thresholds, λ and levels to ``device``: a site whose buffers stay on the CPU
    beside CUDA weights would copy them to the GPU on every forward (or fail on mixed devices)."""
    for m in snn.modules():
        if isinstance(m, MultiLevelNode) and any(t.device != device for t in m.buffers()):
            m.to(device)


def raised_while_tracing(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.fx``'s symbolic tracing (``Tracer.trace``)."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "trace" and code.co_filename.replace("\\", "/").endswith("fx/_symbolic_trace.py"):
            return True
        tb = tb.tb_next
    return False


def _trace_failures() -> tuple[type, ...]:
    from .ann2snn.inputs import TraceMismatchError
    from .ann2snn.passes import InPlaceError

    return TraceMismatchError, InPlaceError


def _fx_convert(model: nn.Module, dataloader: Iterable, device: Any, keep_state: bool, common: dict, optional: dict,
                kwargs: dict) -> nn.Module:
    from spikingjelly.activation_based.ann2snn import Converter

    from .ann2snn import SFNRecipe

    recipe = SFNRecipe(dataloader, keep_state=keep_state, **common, **optional, **kwargs)
    return Converter(recipe, device=device).convert(model)


_MODULE_OPTIONS = {"backend"}


def _module_convert(model: nn.Module, dataloader: Iterable, *, device: Any, max_spikes: int, p: float, per_channel: bool,
                    num_batches: int | None, progress: bool, lam: float | None = None, offset: float | None = None,
                    **kwargs: Any) -> nn.Module:
    """Module-level placement on a copy of ``model`` (the CNN defaults: λ = 0.05, rounding)."""
    from .ann2snn.module_placement import place_input_sites
    from .ann2snn.recipes import CNN_DEFAULT_LAM, CNN_DEFAULT_V_INIT

    unsupported = sorted(set(kwargs) - _MODULE_OPTIONS)
    if unsupported:
        raise ValueError(f"module-level placement does not take {unsupported} (SFNRecipe options of the FX path)")
    lam = check_positive_float(CNN_DEFAULT_LAM if lam is None else lam, "lam (λ)")
    offset = check_offset(CNN_DEFAULT_V_INIT if offset is None else offset)
    snn = copy.deepcopy(model).eval()
    if device is not None:
        snn.to(device)
    placed = place_input_sites(snn, dataloader, lam=lam, max_spikes=check_max_spikes(max_spikes), p=check_quantile(p),
                               per_channel=per_channel, offset=offset, num_batches=num_batches, device=device,
                               progress=progress, **kwargs)
    if not placed.sites:
        raise ValueError(f"module-level placement found no weight layer of {type(model).__name__} whose input is not the "
                         "model input: nothing to convert")
    snn.sfn_placement = placed
    return snn


def _hybrid_sites(snn: nn.Module, dataloader: Iterable, *, device: Any, spike_head: bool, offset: float, max_spikes: int,
                  p: float, per_channel: bool, num_batches: int | None, progress: bool) -> ModulePlacement:
    """Input sites on the weight layers a Transformer converter left analog outside its own blocks (not the image's)."""
    from .ann2snn.module_placement import place_input_sites
    from .neuron import sfn_nodes

    converted = [n for n, m in snn.named_modules() if type(m).__module__.startswith("sj_sfn.") and n]
    head = snn.get_classifier() if not spike_head and callable(getattr(snn, "get_classifier", None)) else None
    exclude = {n for n, m in snn.named_modules() if m is head or any(n.startswith(c + ".") for c in converted)}
    lams = [float(m.lam.reshape(-1)[0]) for _, m in sfn_nodes(snn)]
    return place_input_sites(snn, dataloader, lam=lams[0] if lams else 1.0, max_spikes=max_spikes, p=p,
                             per_channel=per_channel, offset=offset, exclude=exclude, num_batches=num_batches,
                             device=device, progress=progress)
