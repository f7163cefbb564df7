"""Explicit SFormer attention and MLP modules with SFN sites in place.

They take over the parameters of timm's ``Attention`` / ``AttentionRope`` / ``EvaAttention``
and ``Mlp`` / ``GluMlp`` / ``SwiGLU`` under the same names (so the ANN's state-dict keys are
unchanged) and add one site module per SFN site, named ``sfn_<kind>``:

attention:  x → sfn_qkv_in → qkv → (q_norm, k_norm, rope) → sfn_q, sfn_k, sfn_v →
            softmax(q·kᵀ·scale + mask) → sfn_attn → attn·v → norm (gate) → sfn_proj_in → proj
MLP:        x → sfn_fc1_in → fc1 → act (GLU) → norm → sfn_fc2_in → fc2

A site is any module: an :class:`~sj_sfn.SFNode` in a converted model, a
:class:`~sj_sfn.calibration.SiteObserver` during calibration, ``nn.Identity`` for the exact
ANN on the explicit path. LayerNorm, GELU/SiLU, SoftMax and the residual additions stay
floating-point. The fused ``scaled_dot_product_attention`` is never used: the SoftMax output
must exist as a tensor for its site.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.modules import module as _m

from ..functional import multi_threshold_fire
from ..neuron import SFNode

__all__ = [
    "SITE_KINDS", "FIRE_PATHS", "SFormerAttention", "SFormerMlp", "HeadSite", "attention_types", "mlp_types", "fire",
    "set_fire_path", "register_variant", "wrapper_for", "adopt_parameters", "base_attention_types", "softmax_",
    "scaled", "dropped",
]

#: every site kind, in the order a token meets them inside a block (``head_in`` feeds the classifier).
#: ``kv_in``/``v_in``: the key/value inputs of a cross-attention (``nn.MultiheadAttention``; PVT-v2's reduced map);
#: ``logits_in``/``attn_mix``: the talking-heads mixes before and after the SoftMax (CaiT; ``logits_in`` also the
#: input of VOLO's attention-generating Linear); ``pool_in``: the inputs of the q/k/v pooling convolutions (MViTv2)
SITE_KINDS = ("qkv_in", "kv_in", "v_in", "pool_in", "q", "k", "v", "logits_in", "attn", "attn_mix", "proj_in", "fc1_in",
              "fc2_in", "head_in")

SiteFactory = Callable[[str], nn.Module]

# attention variants (sj_sfn.sformer.variants): (loader of the source classes, wrapper class)
_VARIANTS: list[tuple[Callable[[], tuple[type, ...]], type]] = []


def base_attention_types() -> tuple[type, ...]:
    """timm attention classes that :class:`SFormerAttention` itself replaces."""
    from timm.layers.attention import Attention, AttentionRope
    from timm.models.eva import EvaAttention

    return (Attention, AttentionRope, EvaAttention)


def register_variant(source_types: Callable[[], tuple[type, ...]], wrapper: type) -> None:
    """Register ``wrapper`` (an :class:`SFormerAttention` subclass) for the classes ``source_types()`` returns.

    ``source_types`` is called lazily and may raise ``ImportError`` (an optional package that is
    not installed: its classes cannot occur in a model).
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, SFormerAttention)):
        raise TypeError(f"an attention variant must subclass SFormerAttention, got {wrapper!r}")
    _VARIANTS.append((source_types, wrapper))


def _variant_types() -> list[tuple[tuple[type, ...], type]]:
    out = []
    for loader, wrapper in _VARIANTS:
        try:
            out.append((tuple(loader()), wrapper))
        except ImportError:
            continue
    return out


def attention_types() -> tuple[type, ...]:
    """Every attention class SFormer converts: timm's Attention/AttentionRope/EvaAttention and the registered variants."""
    return base_attention_types() + tuple(t for types, _ in _variant_types() for t in types)


def wrapper_for(module: nn.Module) -> type | None:
    """The SFormer class that replaces ``module`` (``None`` if it is no attention SFormer converts).

    A subclass of a registered variant class matches only if it keeps that class's ``forward``
    (a subclass with its own math is not what the wrapper reproduces).
    """
    if isinstance(module, SFormerAttention):
        return None
    for types, wrapper in _variant_types():
        for t in types:
            if isinstance(module, t):
                return wrapper if type(module).forward is t.forward else None
    return SFormerAttention if isinstance(module, base_attention_types()) else None


def mlp_types() -> tuple[type, ...]:
    """timm MLP classes that :class:`SFormerMlp` replaces."""
    from timm.layers.mlp import GluMlp, Mlp, SwiGLU

    return (Mlp, GluMlp, SwiGLU)


FIRE_PATHS = ("module", "compiled")
_fire_path = os.environ.get("SJ_SFN_SFORMER_FIRE", "module")
_compiled_fire: Callable | None = None


def set_fire_path(path: str) -> str:
    """Choose how SFormer sites fire in inference; returns the previous choice.

    ``'module'`` (default): every site runs its :class:`SFNode` forward (a stateless float32 CPU
    site takes the node's fast inference fire: one pass through the C kernel of :mod:`sj_sfn.cpu`, or
    :func:`~sj_sfn.functional.fast_fire` without a compiler; bit for bit the reference's either way). ``'compiled'``: in eval without autograd, a site whose spike counts and
    hooks nobody asked for fires through the reference :func:`~sj_sfn.functional.multi_threshold_fire` compiled by ``torch.compile`` into
    one fused loop (the same arithmetic as the reference, bit for bit; the first call compiles
    for tens of seconds and needs a C++ compiler on CPU). Energy measurement, hooks,
    ``store_counts`` and training always take the module path. Also set by the environment
    variable ``SJ_SFN_SFORMER_FIRE``.
    """
    global _fire_path
    if path not in FIRE_PATHS:
        raise ValueError(f"fire path must be one of {FIRE_PATHS}, got {path!r}")
    previous, _fire_path = _fire_path, path
    return previous


def hooked(*modules: nn.Module) -> bool:
    """Whether a call of any of ``modules`` runs hooks (its own forward/backward hooks, or global ones)."""
    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks or _m._global_backward_pre_hooks:
        return True
    for m in modules:  # a loop, not any(generator): this runs several times per block of every forward
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


def dropped(drop: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``, without the module call where it returns ``x`` anyway: an ``nn.Dropout`` out of training, without hooks."""
    if type(drop) is nn.Dropout and not drop.training and not hooked(drop):
        return x
    return drop(x)


def _fast_ok(site: SFNode, x: torch.Tensor) -> bool:
    return (
        not site.store_counts
        and not site.store_v_seq
        and site.levels is None
        and site.step_mode == "s"
        and site.backend != "cupy"
        and x.dtype in (torch.float32, torch.float64)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not hooked(site)
    )


def _fire_compiled(site: SFNode, x: torch.Tensor) -> torch.Tensor:
    """One step from rest through the reference :func:`~sj_sfn.functional.multi_threshold_fire`, compiled."""
    global _compiled_fire
    if _compiled_fire is None:
        _compiled_fire = torch.compile(multi_threshold_fire, dynamic=True)
    tp, tn = site.broadcast_thresholds(x)
    lam = site.lam.to(x.dtype)
    tp = tp.to(x.dtype) * lam
    tn = None if tn is None else tn.to(x.dtype) * lam
    ceiling = None if site.ceiling is None else site.ceiling.to(x.dtype)
    return _compiled_fire(x, tp, tn, int(site.max_spikes), None, float(site.v_init), ceiling).spike


def fire(site: nn.Module, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Run one site at T=1: an SFN starts from a zero membrane on every forward (see :func:`set_fire_path`).

    A site without hooks fires through its bound kernel call without the module call
    (:meth:`SFNode.fire_fast`: stateless CPU inference, what its forward would run); any other call is the
    module's. ``inplace``: ``x`` is a temporary of the caller that nothing else reads (nor any hook of the
    modules that made it); a site without hooks may then write its spike over ``x``, as
    ``nn.ReLU(inplace=True)`` does.
    """
    if isinstance(site, SFNode):
        if site.stateful:  # a stateless site starts from rest anyway: no reset per call
            site.reset()
        if _fire_path == "compiled" and _fast_ok(site, x):
            return _fire_compiled(site, x)
        if not hooked(site):  # the node's bound kernel call without the module call (what its forward would run)
            out = site.fire_fast(x, inplace)
            if out is not None:
                return out
    return site(x)


#: score elements per piece when attention runs in pieces (:func:`attention_chunks`); 0 keeps every attention whole
ATTENTION_CHUNK = 1 << 18


def attention_chunks(site: nn.Module, b: int, h: int, length: int, keys: int, head_multiple: int = 1) -> list[tuple[slice, slice]] | None:
    """``(batch, heads)`` slices to run the attention products in, one piece at a time, or ``None`` (in one piece).

    The ``[B, H, L, S]`` scores, their SoftMax and the SoftMax site's spikes are the buffers a spiking
    attention adds to the ANN's fused attention; in pieces of at most :data:`ATTENTION_CHUNK` scores
    they stay small. Pieces are taken only in plain inference, where nothing else reads the whole
    tensor: the SoftMax site is a stateless :class:`SFNode` without counts, hooks or autograd, and its
    thresholds are not per batch (per-head thresholds take pieces of whole samples); a Hugging Face
    attention also keeps the whole when someone may read its probabilities
    (:func:`sj_sfn.hf.sites.probabilities_wanted`). Every piece computes the same values as the whole
    (the products, SoftMax and fire are per (batch, head) matrix). Slices of heads hold a multiple of ``head_multiple`` heads
    (the query heads that share one key/value head).
    """
    total = b * h * length * keys
    if ATTENTION_CHUNK <= 0 or total <= ATTENTION_CHUNK or not isinstance(site, SFNode):
        return None
    channel = site.channel_dim
    if (
        site.stateful
        or site.store_counts
        or site.store_v_seq
        or site.step_mode != "s"
        or torch.is_grad_enabled()
        or hooked(site)
        or (channel is not None and (channel if channel >= 0 else channel + 4) == 0)
    ):
        return None
    per_head = channel is not None and (channel if channel >= 0 else channel + 4) == 1 and site.theta_pos.numel() > 1
    per_sample = h * length * keys
    if per_sample <= ATTENTION_CHUNK or per_head:  # per-head thresholds: pieces of whole samples (every head)
        step = max(1, ATTENTION_CHUNK // per_sample)
        return [(slice(i, i + step), slice(None)) for i in range(0, b, step)]
    step = max(1, ATTENTION_CHUNK // (length * keys) // head_multiple) * head_multiple
    return [(slice(i, i + 1), slice(j, j + step)) for i in range(b) for j in range(0, h, step)]


def scaled(site: nn.Module, spikes: torch.Tensor, source: torch.Tensor, scale: float) -> torch.Tensor:
    """``spikes · scale``, written over ``spikes`` when they are a new tensor that ``site`` made from ``source`` and
    nobody else holds (not ``source`` itself, not a view, no hook on the site that could keep them, no autograd);
    else a new tensor."""
    if spikes is source or spikes._base is not None or torch.is_grad_enabled() or hooked(site):
        return spikes * scale
    return spikes.mul_(scale)


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """``softmax(scores, dim=-1)``, written over ``scores`` (a temporary of the caller that nothing else reads) when
    that gives the same bits: a contiguous CPU tensor outside autograd; else a new tensor.

    A spiking attention materialises its scores where the ANN's fused attention does not: in place, the
    scores and their SoftMax share one ``B·H·L·S`` buffer instead of two.
    """
    if scores.device.type == "cpu" and scores.is_contiguous() and not (torch.is_grad_enabled() and scores.requires_grad):
        return torch._softmax(scores, -1, False, out=scores)
    return scores.softmax(dim=-1)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` per head, with ``b`` shared by groups of ``g = H_a / H_b`` consecutive heads of ``a`` (GQA).

    ``a [B, H_a, L, ·] → [B, H_b, g·L, ·]`` (a view for a contiguous ``a``), one product per key/value
    head, back to ``[B, H_a, L, ·]``: ``b`` is never repeated (``repeat_interleave`` would copy it ``g``
    times).
    """
    ha, hb = a.shape[1], b.shape[1]
    if ha == hb:
        return a @ b
    g = ha // hb
    out = a.reshape(a.shape[0], hb, g * a.shape[2], a.shape[3]) @ b
    return out.view(a.shape[0], ha, a.shape[2], out.shape[-1])


def head_slice(h: slice, groups: int, heads: int) -> slice:
    """The key/value heads of the query heads ``h`` (a slice from :func:`attention_chunks`), ``groups`` query heads each."""
    if groups == 1 or h.start is None:
        return h
    return slice(h.start // groups, -(-min(h.stop, heads) // groups))


def adopt_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Move ``src``'s parameters, buffers (with their persistence) and children onto ``dst``."""
    for name, p in src._parameters.items():
        dst.register_parameter(name, p)
    for name, b in src._buffers.items():
        dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
    for name, m in src._modules.items():
        dst.add_module(name, m)


class SFormerAttention(nn.Module):
    """Multi-head self-attention on the explicit path with SFN sites (see the module doc).

    ``attn = softmax((s_q(q)·d^-1/2) · s_k(k)ᵀ + mask)``, ``out = proj(s_p(norm(s_a(attn) · s_v(v))))``
    with ``s_·`` the sites; accepts the ``rope``, ``attn_mask`` and ``is_causal`` arguments of
    timm's attention modules (rope is applied after qk-norm and before the q/k sites, to all
    tokens but the ``num_prefix_tokens`` class/register tokens).
    """

    SITES = ("qkv_in", "q", "k", "v", "attn", "proj_in")
    #: the two spike×spike products counted by :meth:`energy_ops`: ``(name, left site, right site)``
    PRODUCTS = (("qk", "q", "k"), ("av", "attn", "v"))
    #: sites a forward may leave unused (a cross-attention input): left uncalibrated when no batch reached them
    OPTIONAL_SITES: tuple[str, ...] = ()

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__()
        if not isinstance(src, base_attention_types()):
            raise TypeError(
                f"unsupported attention module {type(src).__module__}.{type(src).__qualname__}: SFormer converts "
                "timm's Attention, AttentionRope and EvaAttention"
            )
        self.source_type = type(src).__name__
        self.num_heads = int(src.num_heads)
        self.head_dim = int(src.head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.num_kv_heads = int(getattr(src, "num_kv_heads", self.num_heads))
        self.scale = float(src.scale)
        self.num_prefix_tokens = int(getattr(src, "num_prefix_tokens", 0))
        self.rotate_half = bool(getattr(src, "rotate_half", False))
        adopt_parameters(self, src)
        for attr in ("qkv", "q_proj", "k_proj", "v_proj", "gate", "q_bias", "k_bias", "v_bias"):
            if not hasattr(self, attr):
                setattr(self, attr, None)
        for kind in self.SITES:
            self.add_module(f"sfn_{kind}", site_factory(kind))
        self._counts: dict[str, torch.Tensor | None] = {}

    def extra_repr(self) -> str:
        return f"from={self.source_type}, num_heads={self.num_heads}, head_dim={self.head_dim}, kv_heads={self.num_kv_heads}"

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat

        B, N, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._project(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=self.rotate_half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=self.rotate_half)], dim=2).type_as(v)
        spikes = fire(self.sfn_q, q)
        k, v = fire(self.sfn_k, k), fire(self.sfn_v, v)
        groups = self.num_heads // self.num_kv_heads  # query heads per key/value head: k and v are not repeated
        q = scaled(self.sfn_q, spikes, q, self.scale)  # scale the spikes of q (N·D values), not the N·N scores
        drop_hooked = hooked(self.attn_drop)  # a hook on it (a common way to read timm's attention maps) must see the whole
        whole = attn_mask is not None or is_causal or self.training or drop_hooked
        pieces = None if whole else attention_chunks(self.sfn_attn, B, q.shape[1], N, N, head_multiple=groups)
        if pieces is None:
            attn = grouped_matmul(q, k.transpose(-2, -1))
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = dropped(self.attn_drop, softmax_(attn))
            attn = fire(self.sfn_attn, attn, inplace=not drop_hooked)
            x = grouped_matmul(attn, v)
        else:  # inference without a mask: the scores one piece at a time (attention_chunks); attn_drop is the identity
            x = v.new_empty(B, q.shape[1], N, v.shape[-1])
            for b, h in pieces:
                kv = head_slice(h, groups, q.shape[1])
                attn = fire(self.sfn_attn, softmax_(grouped_matmul(q[b, h], k[b, kv].transpose(-2, -1))), inplace=True)
                x[b, h] = grouped_matmul(attn, v[b, kv])
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # the attention's own output: a temporary
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = fire(self.sfn_proj_in, x, inplace=not hooked(self.norm))
        return dropped(self.proj_drop, self.proj(x))

    def energy_ops(self) -> list[dict]:
        r"""Operation counts of the two attention products of the last forward (summed over the batch).

        With signed spike counts ``k_q, k_k, k_v`` (``[B, H, N, D]``) and ``k_a`` (``[B, H, N, N]``)
        from the q/k/v/attn sites, each pair of spikes that meets in a product is one
        accumulate (a multi-level spike of count ``k`` is ``|k|`` unit spikes):

        .. math::

            AC_{qk} = \sum_{b,h,d} \Big(\sum_i |k_q[i,d]|\Big)\Big(\sum_j |k_k[j,d]|\Big),\quad
            AC_{av} = \sum_{b,h,j} \Big(\sum_i k_a[i,j]\Big)\Big(\sum_d |k_v[j,d]|\Big)

        ``events`` is the same sum with ``1[k≠0]`` for ``|k|`` (one event per non-zero pair);
        ``ann_macs = B·H·N·N·D`` for each product. The scale ``d^-1/2`` and the spike values
        ``λθ`` are per-tensor constants folded into the result, not counted.
        A site with custom levels (:meth:`~sj_sfn.SFNode.level_costs`) sends graded spikes: a
        power-of-two level counts 1 in place of ``|k|`` (each pair costs the other operand's
        ``|k|`` ACs), any other level makes each of its pairs one MAC (``macs``).
        """
        kinds = {kind for _, a, b in self.PRODUCTS for kind in (a, b)}
        counts = {kind: site_costs(getattr(self, f"sfn_{kind}")) for kind in kinds}
        groups = self.num_heads // self.num_kv_heads
        for kind in ("k", "v"):
            if counts[kind] is not None and groups > 1:
                counts[kind] = tuple(None if t is None else t.repeat_interleave(groups, dim=1) for t in counts[kind])
        return [product_ops(name, counts[a], counts[b], name) for name, a, b in self.PRODUCTS]


def site_costs(site: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """``(ACs, MACs, 1[k≠0])`` per element of a site's last output, or ``None`` without counts."""
    k = getattr(site, "last_counts", None)
    if k is None:
        return None
    ac, mac = site.level_costs(k)
    return ac, mac, k != 0


def product_ops(name: str, a: tuple | None, b: tuple | None, kind: str) -> dict:
    """Counts for ``a @ bᵀ`` (``qk``: a=[..,N,D], b=[..,M,D]) or ``a @ b`` (``av``: a=[..,N,M], b=[..,M,D]).

    ``a``, ``b``: ``(ACs, MACs, non-zero)`` per element (:func:`site_costs`); per pair of spikes that
    meet, ``ac_a·ac_b`` ACs, or one MAC when either spike is graded at a non-power-of-two level.
    """
    if a is None or b is None:
        raise RuntimeError(
            f"energy_ops: the sites of the {name} product kept no spike counts; set store_counts=True on the "
            "SFN sites (sj_sfn.energy.measure_energy does this) and run a forward first"
        )
    shape_a, shape_b = a[0].shape, b[0].shape
    if kind == "qk":  # Σ_d (Σ_i a_id)(Σ_j b_jd)
        n, d, m = shape_a[-2], shape_a[-1], shape_b[-2]
        dim_b = -2
    else:  # Σ_j (Σ_i a_ij)(Σ_d b_jd)
        n, m, d = shape_a[-2], shape_a[-1], shape_b[-1]
        dim_b = -1

    def pairs(x: torch.Tensor | None, y: torch.Tensor | None) -> float:
        if x is None or y is None:
            return 0.0
        return (x.to(torch.float64).sum(-2) * y.to(torch.float64).sum(dim_b)).sum().item()

    (a_ac, a_mac, a_nz), (b_ac, b_mac, b_nz) = a, b
    acs = pairs(a_ac, b_ac)
    events = pairs(a_nz, b_nz)
    macs = pairs(a_mac, b_nz) + pairs(a_nz, b_mac) - pairs(a_mac, b_mac)
    batch = a_ac.numel() // (shape_a[-2] * shape_a[-1])
    ann_macs = float(batch * n * m * d)
    return {"name": name, "kind": "matmul", "macs": macs, "acs": acs, "events": events, "ann_macs": ann_macs}


class SFormerMlp(nn.Module):
    """timm's ``Mlp`` / ``GluMlp`` / ``SwiGLU`` with SFN sites before ``fc1`` and ``fc2``.

    ``Mlp``: ``fc2(s2(norm(act(fc1(s1(x))))))``; ``GluMlp``: ``fc1`` output split in two halves,
    ``act(x1)·x2`` (or ``x1·act(x2)``); ``SwiGLU``: ``act(fc1_g(s1(x)))·fc1_x(s1(x))``.
    """

    SITES = ("fc1_in", "fc2_in")
    #: per variant, the children whose outputs lead to the fc2_in site (a hook on one keeps that tensor from firing in place)
    FC2_IN_MADE_BY = {"mlp": ("fc1", "act", "drop1", "norm"), "glu": ("fc1", "act", "drop1", "norm"),
                      "swiglu": ("fc1_g", "fc1_x", "act", "drop1", "norm")}  # fmt: skip

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__()
        if not isinstance(src, mlp_types()):
            raise TypeError(f"unsupported MLP module {type(src).__qualname__}: SFormer converts timm's Mlp, GluMlp and SwiGLU")
        from timm.layers.mlp import GluMlp, SwiGLU

        self.variant = "swiglu" if isinstance(src, SwiGLU) else "glu" if isinstance(src, GluMlp) else "mlp"
        self.chunk_dim = int(getattr(src, "chunk_dim", -1))
        self.gate_last = bool(getattr(src, "gate_last", True))
        adopt_parameters(self, src)
        linears = ("fc1_g", "fc1_x", "fc2") if self.variant == "swiglu" else ("fc1", "fc2")
        for name in linears:
            if not isinstance(getattr(self, name), nn.Linear):
                raise TypeError(
                    f"unsupported MLP: {type(src).__qualname__}.{name} is {type(getattr(self, name)).__name__}, "
                    "SFormer needs nn.Linear (use_conv MLPs are not supported)"
                )
        for kind in self.SITES:
            self.add_module(f"sfn_{kind}", site_factory(kind))

    def extra_repr(self) -> str:
        return f"variant={self.variant}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fire(self.sfn_fc1_in, x)
        if self.variant == "swiglu":
            x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        else:
            x = self.fc1(x)
            if self.variant == "glu":
                x1, x2 = x.chunk(2, dim=self.chunk_dim)
                x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
            else:
                x = self.act(x)
        x = self.norm(dropped(self.drop1, x))
        # fc1's output and what follows are this MLP's own temporaries, unless a hook kept one
        x = fire(self.sfn_fc2_in, x, inplace=not hooked(*(self._modules[n] for n in self.FC2_IN_MADE_BY[self.variant])))
        return dropped(self.drop2, self.fc2(x))


class HeadSite(nn.Sequential):
    """``head_drop`` followed by the ``head_in`` site: the classifier's input spikes, its output does not."""

    def __init__(self, drop: nn.Module, site: nn.Module):
        super().__init__()
        self.add_module("drop", drop)
        self.add_module("sfn_head_in", site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fire(self.sfn_head_in, dropped(self.drop, x))
