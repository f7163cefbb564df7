"""``sj_sfn.convert`` (defined here, in ``sj_sfn.conversion``): the one entry point from a trained ANN to a one-timestep SNN.

CNN-like models (ReLU family) go through :class:`~sj_sfn.ann2snn.SFNRecipe` and SpikingJelly's
FX ``Converter``; Transformers (timm ``VisionTransformer``/``Eva``, or any model holding
``nn.MultiheadAttention`` or a timm ``Attention``) go to :func:`sj_sfn.sformer.convert`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from .calibration.budget import allocate_thresholds, check_budget
from .checks import check_offset
from .neuron import set_lambda, set_stateful

__all__ = ["convert", "is_transformer", "DEFAULT_ENERGY_BUDGET"]

#: The energy ratio ``E_SNN/E_ANN`` that ``sj_sfn.convert`` calibrates to by default.
DEFAULT_ENERGY_BUDGET = 0.35

_TRANSFORMER_CLASSES = {"VisionTransformer", "Eva", "VisionTransformerDistilled", "Beit", "DeiT"}


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a Transformer: a timm ViT/Eva, or it holds multi-head attention."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, nn.MultiheadAttention):
            return True
        if cls.__module__.startswith("timm.") and (cls.__name__ in _TRANSFORMER_CLASSES or cls.__name__.endswith("Attention")):
            return True
    return False


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
    v_init: float | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
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
    :param v_init: deprecated name of ``offset``
    :param num_batches: calibrate on at most this many batches
    :param device: conversion device (default: the model's)
    :param progress: progress bar while calibrating
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
    if calibration == "budget":
        check_budget(energy_budget)
        lam = 1.0 if lam is None else lam
    optional = {k: v for k, v in (("lam", lam), ("offset", offset)) if v is not None}
    if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__):
        from .hf import convert as hf_convert  # Hugging Face models: sj_sfn.hf (the "hf" extra)

        snn = hf_convert(model, dataloader, max_spikes=max_spikes, p=p, per_channel=per_channel, num_batches=num_batches,
                         device=device, progress=progress, **optional, **kwargs)
    elif is_transformer(model):
        fn = _sformer_convert()
        snn = fn(model, dataloader, max_spikes=max_spikes, p=p, per_channel=per_channel, num_batches=num_batches,
                 device=device, progress=progress, **optional, **kwargs)
    else:
        from spikingjelly.activation_based.ann2snn import Converter

        from .ann2snn import SFNRecipe

        recipe = SFNRecipe(dataloader, max_spikes=max_spikes, p=p, per_channel=per_channel, num_batches=num_batches,
                           progress=progress, keep_state=keep_state, **optional, **kwargs)
        snn = Converter(recipe, device=device).convert(model)
    set_stateful(snn, keep_state)  # Transformers: the SFormer/HF sites follow keep_state too
    if calibration == "budget":
        allocation = allocate_thresholds(snn, dataloader, energy_budget, num_batches=num_batches, device=device,
                                         progress=progress)
        if lam != 1.0:
            set_lambda(snn, lam)
        snn.sfn_allocation = allocation
    return snn
