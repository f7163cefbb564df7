"""One-timestep conversion of Hugging Face ``transformers`` models (BERT family, Llama family, GPT-2).

Sites (the paper's SFN sites, placed as in SFormer, see docs/language_models.md), per layer:
the input of the q/k/v projections (``qkv_in``, the first layer's is the embeddings' output
in post-norm BERTs), ``q``, ``k`` and ``v`` before the two attention products, the SoftMax
output ``attn``, the input of the attention output projection (``proj_in``), of the MLP's first
Linear(s) (``fc1_in``; shared by ``gate_proj`` and ``up_proj`` in SwiGLU MLPs) and of its last
Linear (``fc2_in``); outside the layers, the input of every other Linear / ``Conv1D`` (the LM
head, a pooler, a classifier: ``head_in``). Signed sites everywhere except ``attn``:

    θ+ = mean over batches of the p-quantile,  θ- = |mean of the (1-p)-quantile|,
    o = ±λθ±·clip(round(±h/(λθ±)), 0, N)

over the real tokens only (padding, per the ``attention_mask``, is left out of the statistics).
``attn`` is positive-only with ``N_a`` levels under the cap ``c`` (the largest probability seen,
``softmax_cap='max'``): ``θ_a = c/(λ·N_a)``, as :func:`sj_sfn.sformer.convert`. LayerNorm/RMSNorm,
GELU/SiLU and the SwiGLU product, rotary embeddings and the residual stream stay floating point.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..calibration import calibrate
from ..checks import check_max_spikes, check_positive_float, check_quantile
from ..neuron import SFNode
from ..sformer.core import place_calibrated_sites, site_observers
from .sites import ATTN_IMPLEMENTATION, SpikingAttention, add_input_site, register_attention, track_padding

__all__ = ["SUPPORTED_MODEL_TYPES", "is_hf_model", "is_converted", "prepare", "convert", "batch_kwargs", "run_batches"]

#: ``config.model_type`` of the architectures this module converts (each tested on a tiny random config)
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gpt2")

# attention modules: their q/k/v projections (one input site on the attention module)
_QKV_GROUPS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("c_attn",))
# gated MLPs: the Linears that share the MLP's input (one input site on the MLP module)
_GATE_GROUPS = (("gate_proj", "up_proj"),)
# single weight layers inside the layers: qualified-name pattern -> site kind
_LAYER_SITES = (
    (re.compile(r"\.(o_proj|out_proj)$"), "proj_in"),
    (re.compile(r"\.attn\.c_proj$"), "proj_in"),
    (re.compile(r"\.attention\.output\.dense$"), "proj_in"),
    (re.compile(r"\.mlp\.(down_proj|c_proj)$"), "fc2_in"),
    (re.compile(r"\.output\.dense$"), "fc2_in"),
    (re.compile(r"\.intermediate\.dense$"), "fc1_in"),
    (re.compile(r"\.mlp\.c_fc$"), "fc1_in"),
)
_SUPPORTED_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention",
                   ATTN_IMPLEMENTATION)


def _check_cap(softmax_cap: Any) -> str | float:
    if isinstance(softmax_cap, str) and softmax_cap in ("max", "one"):
        return softmax_cap
    if isinstance(softmax_cap, numbers.Real) and not isinstance(softmax_cap, bool) and 0.0 < float(softmax_cap) <= 1.0:
        return float(softmax_cap)
    raise ValueError(f"softmax_cap must be 'max', 'one' or a quantile in (0, 1], got {softmax_cap!r}")


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` already has SFN attention sites in place."""
    return any(isinstance(m, SpikingAttention) for m in model.modules())


def _is_weight_layer(m: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (a Linear with its weight stored transposed)."""
    cls = type(m)
    return isinstance(m, nn.Linear) or (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."))


def _default_site(kind: str, name: str) -> SFNode:
    if kind == "attn":
        return SFNode(theta_pos=1.0, theta_neg=None, ceiling=1.0)
    return SFNode(theta_pos=1.0, theta_neg=1.0)


def _check_model(model: nn.Module) -> None:
    if not is_hf_model(model):
        raise TypeError(f"sj_sfn.hf converts transformers PreTrainedModels, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported by sj_sfn.hf; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} already has SFN sites: convert the original ANN")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl is not None and impl not in _SUPPORTED_ATTN:
        raise ValueError(
            f"attention implementation {impl!r} of {type(model).__name__} is not supported: load the model with "
            f"attn_implementation= one of {', '.join(_SUPPORTED_ATTN[:-1])} (sj_sfn replaces it by its own)"
        )
    if not type(model)._can_set_attn_implementation():
        raise TypeError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
    if getattr(model.config, "is_encoder_decoder", False) or getattr(model.config, "add_cross_attention", False):
        raise TypeError("cross-attention (encoder-decoder models) is not supported by sj_sfn.hf")


def prepare(
    model: nn.Module,
    site_factory: Callable[[str, str], nn.Module] | None = None,
    spike_head: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Place a site at every SFN position of a Hugging Face model (see the module doc).

    ``site_factory(kind, name)`` builds the site ``name`` of kind ``kind``; the default places
    uncalibrated :class:`SFNode` sites (what a converted state_dict loads into),
    ``lambda kind, name: nn.Identity()`` gives the exact ANN through the spiking attention path.
    The model keeps its class and interface (``model(**batch)``, ``generate``); its attention
    implementation becomes :data:`~sj_sfn.hf.sites.ATTN_IMPLEMENTATION`.

    :param spike_head: also place ``head_in`` sites on the Linears outside the layers (LM head, pooler, classifier)
    :raises TypeError: for an unsupported architecture or attention implementation (named in the message)
    """
    _check_model(model)
    if site_factory is None:
        site_factory = _default_site
    if not inplace:
        model = copy.deepcopy(model)
    register_attention()
    covered: set[int] = set()
    n_attn = 0
    for name, m in list(model.named_modules()):
        children = dict(m.named_children())
        for group in _QKV_GROUPS:
            if all(c in children and _is_weight_layer(children[c]) for c in group):
                add_input_site(m, "qkv_in", site_factory("qkv_in", f"{name}.sfn_qkv_in"))
                m.add_module(
                    "spiking_attention",
                    SpikingAttention(lambda kind, _p=name: site_factory(kind, f"{_p}.spiking_attention.sfn_{kind}")),
                )
                covered.update(id(children[c]) for c in group)
                n_attn += 1
                break
        for group in _GATE_GROUPS:
            if all(c in children and _is_weight_layer(children[c]) for c in group):
                add_input_site(m, "fc1_in", site_factory("fc1_in", f"{name}.sfn_fc1_in"))
                covered.update(id(children[c]) for c in group)
    if n_attn == 0:
        raise TypeError(f"no attention module with q/k/v projections found in {type(model).__name__}")
    for name, m in model.named_modules():
        if not _is_weight_layer(m) or id(m) in covered:
            continue
        kind = next((k for pat, k in _LAYER_SITES if pat.search(name)), "head_in")
        if kind == "head_in" and not spike_head:
            continue
        add_input_site(m, kind, site_factory(kind, f"{name}.sfn_{kind}"))
    for m in model.modules():
        if is_hf_model(m):
            track_padding(m)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise TypeError(f"{type(model).__name__} did not accept the attention implementation {ATTN_IMPLEMENTATION!r}")
    return model


# -- batches ---------------------------------------------------------------------------------


def batch_kwargs(batch: Any, device: torch.device | str | None = None) -> dict[str, Any]:
    """The keyword inputs of a loader batch: a mapping (``input_ids``, ``attention_mask``, ...) or an ``input_ids`` tensor."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"a Hugging Face model takes batches that are mappings (input_ids, attention_mask, ...) or input_ids "
            f"tensors, got {type(batch).__name__}"
        )
    if "input_ids" not in batch and "inputs_embeds" not in batch:
        raise KeyError(f"the batch has no input_ids (keys: {sorted(batch)})")
    out = dict(batch)
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


@torch.no_grad()
def run_batches(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "calibrating",
) -> int:
    """Run ``model(**batch)`` (eval mode, no KV cache) over ``loader``; returns the batches seen.

    Under an initialised ``torch.distributed`` group every observer is all-reduced afterwards
    and the count returned is the total over processes (as :func:`sj_sfn.calibration.calibrate`).
    """
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def call(m: nn.Module, batch: Any, dev: torch.device) -> Any:
        return m(**batch_kwargs(batch, dev), **extra)

    return calibrate(model, loader, num_batches=num_batches, device=device, progress=progress, desc=desc, call=call)


# -- conversion ------------------------------------------------------------------------------


@torch.no_grad()
def convert(
    model: nn.Module,
    loader: Iterable,
    lam: float = 0.25,
    max_spikes: int = 32,
    p: float = 0.99,
    softmax_max_spikes: int | None = None,
    softmax_cap: str | float = "max",
    softmax_theta: str = "cap",
    num_batches: int | None = None,
    progress: bool = True,
    spike_head: bool = True,
    offset: float | None = None,
    v_init: float | None = None,
    per_channel: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Convert a Hugging Face model into a one-timestep SNN of the same class (the caller's model is not touched).

    Calibrates every site on ``loader`` (batches: mappings of ``input_ids``, ``attention_mask``, ...;
    ``num_batches`` of them, all by default; padding is not counted), then places an SFN with
    ``θ`` from the statistics, scale ``lam`` and ``max_spikes`` levels per sign; the SoftMax site
    gets ``softmax_max_spikes`` levels (default ``max_spikes``) under the cap ``softmax_cap``
    (as :func:`sj_sfn.sformer.convert`, also for ``softmax_theta``).

    :param offset: threshold offset ``r ∈ [0, 1)`` (``0.5``, the default, rounds; ``0`` floors); ``v_init`` is its old name
    :param per_channel: per-channel thresholds (last dim: hidden features, head dim) instead of one per tensor
    :returns: the converted model: ``snn(**batch)`` returns the ANN's output type, ``snn.generate`` works for causal LMs
    """
    lam = check_positive_float(lam, "lam (λ)")
    max_spikes = check_max_spikes(max_spikes)
    softmax_max_spikes = max_spikes if softmax_max_spikes is None else check_max_spikes(softmax_max_spikes)
    p = check_quantile(p)
    cap_mode = _check_cap(softmax_cap)
    if softmax_theta not in ("cap", "quantile"):
        raise ValueError(f"softmax_theta must be 'cap' or 'quantile', got {softmax_theta!r}")
    if not isinstance(per_channel, bool):
        raise TypeError("per_channel must be a bool")
    if offset is not None and v_init is not None and offset != v_init:
        raise ValueError(f"give the threshold offset once: offset={offset!r}, v_init={v_init!r}")
    r = 0.5 if offset is None and v_init is None else (offset if offset is not None else v_init)

    snn = prepare(model, site_observers(p, cap_mode, per_channel), spike_head=spike_head, inplace=False)
    snn.eval()
    if device is not None:
        snn.to(device)
    run_batches(snn, loader, num_batches=num_batches, device=device, progress=progress, desc="calibrating (HF)")
    place_calibrated_sites(snn, lam=lam, max_spikes=max_spikes, softmax_max_spikes=softmax_max_spikes, cap_mode=cap_mode,
                           softmax_theta=softmax_theta, per_channel=per_channel, offset=r, device=device)
    return snn
