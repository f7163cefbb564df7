"""Site placement inside Hugging Face models: input sites on weight layers, spiking attention.

Every site is a child module named ``sfn_<kind>`` (the kinds of :data:`sj_sfn.sformer.SITE_KINDS`),
so the SFormer tools (``sformer.sites``, ``sformer.set_lambda(kinds=...)``, ``tune_lambda(groups='kind')``)
and every tool that walks :class:`~sj_sfn.SFNode` sites work on a converted Hugging Face model.

- An *input site* fires on the input of a module through a forward pre-hook: on the attention
  module (``sfn_qkv_in``, shared by the q/k/v projections), on a gated MLP (``sfn_fc1_in``, shared
  by ``gate_proj``/``up_proj``) or on a single ``nn.Linear`` / transformers ``Conv1D``
  (``sfn_proj_in``, ``sfn_fc1_in``, ``sfn_fc2_in``, ``sfn_head_in``). The module keeps its class and
  its parameter names, so the ANN's state-dict keys are unchanged.
- :class:`SpikingAttention` (the child ``spiking_attention`` of every attention module) holds
  ``sfn_q``, ``sfn_k``, ``sfn_v`` and ``sfn_attn`` and computes the attention products; it runs
  through transformers' own attention interface (:data:`ATTN_IMPLEMENTATION`), so masks, GQA,
  rotary embeddings and the KV cache stay the model's.

Calibration statistics exclude padding: the ``attention_mask`` given to the model (read by a
pre-hook on every ``PreTrainedModel`` of the converted model) selects the tokens an observer sees.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any

import torch
import torch.nn as nn

from ..calibration import SiteObserver
from ..sformer.modules import SFormerAttention, attention_chunks, fire, grouped_matmul, head_slice, scaled, softmax_

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SpikingAttention",
    "add_input_site",
    "register_attention",
    "sfn_attention_forward",
    "token_mask",
]

#: the name under which the spiking attention is registered in transformers' ``AttentionInterface``
ATTN_IMPLEMENTATION = "sj_sfn"

# the [B, S] boolean attention mask of the model call in progress (None: every token counts)
_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("sj_sfn_token_mask", default=None)


def token_mask() -> torch.Tensor | None:
    """The ``[B, S]`` boolean mask of real (non-padding) tokens of the model call in progress."""
    return _TOKEN_MASK.get()


def _observers(site: nn.Module) -> list[SiteObserver] | None:
    """The observers of a calibration site (an observer or a Sequential of observers), else ``None``."""
    if isinstance(site, SiteObserver):
        return [site]
    if isinstance(site, nn.Sequential) and len(site) and all(isinstance(m, SiteObserver) for m in site):
        return list(site)
    return None


def _real_tokens(x: torch.Tensor, layout: str, mask: torch.Tensor) -> torch.Tensor | None:
    """The entries of ``x`` that belong to real tokens (padding dropped), or ``None`` if the mask does not fit.

    ``tokens``: ``x [B, L, C] → [M, C]``; ``heads``: ``x [B, H, L, D] → [M, H, D]``;
    ``attn``: ``x [B, H, L, S] → [K]`` (real query rows and real key columns only).
    """
    b = mask.shape[0]
    if x.shape[0] != b:
        return None
    if layout == "tokens" and x.dim() == 3 and x.shape[1] <= mask.shape[1]:
        return x[mask[:, -x.shape[1]:]]
    if layout == "heads" and x.dim() == 4 and x.shape[2] <= mask.shape[1]:
        return x.transpose(1, 2)[mask[:, -x.shape[2]:]]
    if layout == "attn" and x.dim() == 4 and x.shape[2] <= mask.shape[1] and x.shape[3] <= mask.shape[1]:
        keep = mask[:, None, -x.shape[2]:, None] & mask[:, None, None, -x.shape[3]:]
        return x[keep.expand_as(x)]
    return None


def run_site(site: nn.Module, x: torch.Tensor, layout: str, inplace: bool = False) -> torch.Tensor:
    """Fire ``site`` on ``x`` at T=1; a calibration observer sees only the real tokens of ``x``.

    ``inplace``: ``x`` is the caller's own temporary (see :func:`sj_sfn.sformer.modules.fire`).
    """
    obs = _observers(site)
    mask = _TOKEN_MASK.get()
    if obs is not None and mask is not None:
        real = _real_tokens(x, layout, mask)
        if real is not None:
            for o in obs:
                if o.enabled:
                    o.observe(real)
            return x
    return fire(site, x, inplace)


# -- input sites ---------------------------------------------------------------------------


def _input_site_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: replace the module's input (first argument or ``hidden_states``) by its site's output."""
    site = getattr(module, module._sj_sfn_input_site)
    if args:
        return (run_site(site, args[0], "tokens"), *args[1:]), kwargs
    for key in ("hidden_states", "x", "input"):
        if key in kwargs:
            kwargs[key] = run_site(site, kwargs[key], "tokens")
            return args, kwargs
    raise RuntimeError(f"{type(module).__name__} was called without a hidden-state input for its SFN site")


def add_input_site(module: nn.Module, kind: str, site: nn.Module) -> None:
    """Place ``site`` as ``module.sfn_<kind>`` and fire it on the module's input on every call."""
    attr = f"sfn_{kind}"
    if getattr(module, "_sj_sfn_input_site", None) is not None:
        raise ValueError(f"{type(module).__name__} already has an input site ({module._sj_sfn_input_site})")
    module.add_module(attr, site)
    module._sj_sfn_input_site = attr
    module.register_forward_pre_hook(_input_site_hook, with_kwargs=True)


# -- padding mask of the model call ----------------------------------------------------------


def _mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        try:
            mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            mask = None
    token = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        token = _TOKEN_MASK.set(mask.to(torch.bool))
    module.__dict__.setdefault("_sj_sfn_mask_tokens", []).append(token)


def _mask_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    tokens = module.__dict__.get("_sj_sfn_mask_tokens")
    token = tokens.pop() if tokens else None
    if token is not None:
        _TOKEN_MASK.reset(token)


def track_padding(model: nn.Module) -> None:
    """Hooks on ``model`` that expose its call's ``attention_mask`` to the sites (see :func:`token_mask`)."""
    model.register_forward_pre_hook(_mask_pre_hook, with_kwargs=True)
    model.register_forward_hook(_mask_post_hook, with_kwargs=True, always_call=True)


# -- attention -------------------------------------------------------------------------------


class SpikingAttention(nn.Module):
    r"""The attention products with SFN sites, called through transformers' attention interface.

    ``P = softmax(s_q(q)·d^{-1/2} · s_k(k)ᵀ + mask)``, ``out = s_a(P) · s_v(v)``, with ``s_·`` the
    sites ``sfn_q``, ``sfn_k``, ``sfn_v`` (on the model's q/k/v after rotary embeddings, k/v
    as stored in the KV cache) and ``sfn_attn`` (the SoftMax output). Key/value heads are
    shared by ``H/H_kv`` query heads (GQA). The operation counts of the two products come from
    :meth:`energy_ops`, as for :class:`~sj_sfn.sformer.SFormerAttention`. ``P`` is returned only when
    someone may read it (training, ``output_attentions``, a hook: :func:`probabilities_wanted`); otherwise
    ``None``, as transformers' SDPA attention returns, and the scores may go one piece at a time. ``owner``
    is the transformers attention module that calls it (:func:`sfn_attention_forward`), whose hooks may read ``P``.
    """

    SITES = ("q", "k", "v", "attn")
    PRODUCTS = SFormerAttention.PRODUCTS

    def __init__(self, site_factory):
        super().__init__()
        for kind in self.SITES:
            self.add_module(f"sfn_{kind}", site_factory(kind))
        self.num_heads = 0
        self.num_kv_heads = 0

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        owner: nn.Module | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for name in ("s_aux", "softcap"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"sj_sfn attention does not support {name!r} (attention sinks / logit soft-capping)")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        heads = int(query.shape[1]), int(key.shape[1])
        if heads != (self.num_heads, self.num_kv_heads):  # set only on a change: a module attribute is slow to set
            if heads[0] % heads[1]:
                raise ValueError(f"{heads[0]} query heads cannot share {heads[1]} key/value heads")
            self.num_heads, self.num_kv_heads = heads
        q = run_site(self.sfn_q, query, "heads")
        k = run_site(self.sfn_k, key, "heads")
        v = run_site(self.sfn_v, value, "heads")
        groups = self.num_heads // self.num_kv_heads
        q = scaled(self.sfn_q, q, query, scaling)  # scale the spikes of q (L·D values), not the L·S scores
        mask = attention_mask
        keep = self.training or probabilities_wanted(owner, kwargs)
        pieces = None
        if not keep and (mask is None or mask.dim() == 4):
            pieces = attention_chunks(self.sfn_attn, q.shape[0], q.shape[1], q.shape[2], k.shape[2], head_multiple=groups)
        if pieces is not None:  # inference, nobody reads the probabilities: the scores one piece at a time
            out = v.new_empty(*q.shape[:3], v.shape[-1])
            for b, h in pieces:
                part = None
                if mask is not None:
                    part = mask[b if mask.shape[0] > 1 else slice(None), h if mask.shape[1] > 1 else slice(None)]
                kv = head_slice(h, groups, q.shape[1])
                probs = run_site(self.sfn_attn, self._probabilities(q[b, h], k[b, kv], part, query.dtype), "attn", True)
                out[b, h] = grouped_matmul(probs, v[b, kv])
            return out.transpose(1, 2).contiguous(), None
        probs = self._probabilities(q, k, mask, query.dtype)
        if self.training and dropout:
            probs = nn.functional.dropout(probs, p=dropout)
        probs = run_site(self.sfn_attn, probs, "attn", True)  # the SoftMax's (or dropout's) own output
        out = grouped_matmul(probs, v).transpose(1, 2).contiguous()
        # the probabilities go back only when someone reads them: a decoder layer's `out, _ = self.self_attn(...)`
        # would keep B·H·L·S values alive through its MLP
        return out, probs if keep else None

    @staticmethod
    def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``softmax(q·kᵀ + mask)`` (``q`` already scaled; a boolean mask keeps where True), in float32, returned in ``dtype``;
        ``k`` may have fewer heads than ``q`` (:func:`~sj_sfn.sformer.modules.grouped_matmul`).

        The mask and the SoftMax go into the scores in place where they can (one ``L·S`` buffer, not three:
        :func:`~sj_sfn.sformer.modules.softmax_`); a boolean mask is added as :func:`additive_mask` (a vectorised add:
        ``masked_fill_`` with a broadcast mask is eight times slower).
        """
        scores = grouped_matmul(q, k.transpose(-2, -1))
        if mask is not None:
            if mask.dtype != torch.bool:
                mask = mask[..., : k.shape[-2]]
            # in place when the mask broadcasts into the scores' shape (torch.broadcast_shapes costs ~1 ms a call)
            inplace = mask.dim() <= scores.dim() and all(m in (1, n) for m, n in zip(reversed(mask.shape), reversed(scores.shape)))
            if mask.dtype == torch.bool:
                mask = additive_mask(mask, scores.dtype)
            scores = scores.add_(mask) if inplace else scores + mask
        if scores.dtype == torch.float32:
            return softmax_(scores).to(dtype)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)

    def energy_ops(self) -> list[dict]:
        """Counts of ``q·kᵀ`` and ``P·v`` of the last forward, as :meth:`SFormerAttention.energy_ops`."""
        return SFormerAttention.energy_ops(self)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean attention mask (True: attend): 0 where True, ``finfo(dtype).min`` elsewhere,
    over the mask's distinct values only (a dimension the mask broadcasts along, stride 0, stays of size 1)."""
    strides = mask.stride()
    if 0 in strides:
        mask = mask.as_strided([1 if st == 0 else n for n, st in zip(mask.shape, strides)], strides)
    values = _MASK_VALUES.get(dtype)
    if values is None:
        values = _MASK_VALUES[dtype] = (torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
    return torch.where(mask, *values)


_MASK_VALUES: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # (0, finfo.min) per dtype, made once


def _capture_hook(hook: Any) -> bool:
    """Whether a forward hook is transformers' output-capturing hook (it reads outputs only when asked, see below)."""
    return getattr(hook, "__name__", "") == "output_capturing_hook"


def _capture_requested() -> bool | None:
    """Whether transformers' output capture of the model call in progress asks for attention probabilities
    (``output_attentions=True``); ``None`` when this version of transformers has no such capture."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    collected = _active_collector.get()
    return bool(collected) and any("attention" in key for key in collected)


def probabilities_wanted(module: nn.Module | None, kwargs: dict) -> bool:
    """Whether anyone may read the attention probabilities that ``module`` (a transformers attention module) returns.

    True with ``output_attentions=True`` (as a keyword, or through transformers' output capture), with a global
    forward hook, or with a forward hook on ``module`` other than transformers' own capturing hook (pre-hooks,
    such as the input sites', see only inputs); else the attention returns ``None`` in their place, as SDPA does.
    """
    if kwargs.get("output_attentions"):
        return True
    if module is None:
        return True
    if nn.modules.module._global_forward_hooks:
        return True
    hooks = module._forward_hooks.values()
    if not hooks:
        return False
    requested = _capture_requested()
    return any(requested is not False or not _capture_hook(h) for h in hooks)


def sfn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention function: runs ``module.spiking_attention`` (see :class:`SpikingAttention`)."""
    spiking = getattr(module, "spiking_attention", None)
    if not isinstance(spiking, SpikingAttention):
        raise RuntimeError(
            f"{type(module).__name__} has no SFN attention sites but the model's attention implementation is "
            f"{ATTN_IMPLEMENTATION!r}: convert the model with sj_sfn.convert / sj_sfn.hf.prepare"
        )
    return spiking(query, key, value, attention_mask, scaling=scaling, dropout=dropout, owner=module, **kwargs)


def boolean_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' boolean attention mask (``sdpa_mask``: True where a query attends) without the causal skip:
    :class:`SpikingAttention` masks its scores itself, so a causal mask is never left out. ``None`` only for a
    bidirectional mask without padding. A broadcast boolean (``L·S`` values for a causal mask at any batch size,
    where the eager additive mask holds ``B·L·S`` floats); each attention adds it as :func:`additive_mask`, the
    eager mask's arithmetic, so the probabilities are the same bit for bit."""
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("dtype", None)
    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


def register_attention() -> None:
    """Register :func:`sfn_attention_forward` (and :func:`boolean_mask`) under :data:`ATTN_IMPLEMENTATION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sfn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, boolean_mask)
