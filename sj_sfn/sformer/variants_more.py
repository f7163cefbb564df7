"""Spiking wrappers for more timm attention families (the hierarchical and hybrid backbones).

The same contract as :mod:`sj_sfn.sformer.variants`: each wrapper is an
:class:`~sj_sfn.sformer.SFormerAttention` that takes over the source module's parameters under
their names and places the SFormer sites — the projection inputs (``qkv_in``, ``kv_in``,
``proj_in``), ``q``, ``k``, ``v`` right before the two products and the SoftMax output ``attn``;
what the family adds stays floating point where the source applies it:

==============================  ==================================================================
family                          what stays floating point / where the sites sit
==============================  ==================================================================
Visformer ``Attention``         (none); the 1×1-conv projections read ``[B, C, H, W]`` maps, the
                                ``qkv_in``/``proj_in`` sites fire on their ``[B, HW, C]`` tokens
NesT ``Attention``              (none); attention inside each image block: ``q [B, H, T, N, D]``
TNT ``Attention``               (none); q, k from ``qk``, v from ``v``, both on ``qkv_in``
MetaFormer ``Attention``        (none) (CAFormer)
EfficientFormer ``Attention``   the attention biases ``B[:, idx]``
TinyViT ``Attention``           the LayerNorm before ``qkv`` (``qkv_in`` fires after it), the
                                attention biases
CrossViT ``CrossAttention``     (none); q from the class token only (``L_q = 1``)
PVT-v2 ``Attention``            the LayerNorm after the spatial-reduction conv ``sr`` (``sr``
                                reads the ``qkv_in`` spikes, ``kv_in`` fires before ``kv``)
DaViT ``WindowAttention``       (none) (windows cut outside the module)
DaViT ``ChannelAttention``      (none); ``softmax(kᵀ·d^-1/2·v)`` over channels applied to ``qᵀ``: the
                                ``q``/``k``/``v`` sites fire on the left/right operand of the first
                                product and the right operand of the second (``kᵀ``, ``vᵀ``, ``qᵀ``)
Hiera ``MaskUnitAttention``     the max-pool of q over the query stride (before the ``q`` site)
Swin V2 ``WindowAttention``     the l2 normalisation of q and k, the per-head logit scale, the
                                continuous position bias ``16·σ(cpb_mlp(table))``, the shift mask
MViTv2 ``MultiScaleAttention``  the LayerNorms after the q/k/v pooling, the decomposed relative
                                positions; ``pool_in`` fires on the inputs of the pooling convolutions
VOLO ``OutlookAttention``       (none); the attention comes from a Linear on the average-pooled
                                input (``logits_in`` fires before it), one product ``a·v``
VOLO ``Attention`` /            (none); ``[B, H, W, C]`` maps / q from the class token only
``ClassAttention``
MobileViTV2                     (none); separable attention, sites on channels-last tokens; the
``LinearSelfAttention``         products ``softmax(i)·k`` and ``relu(v) ⊙ context`` take the
                                ``attn``/``v`` and ``q``/``k`` sites
==============================  ==================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import SiteFactory, fire, register_variant
from .variants import VariantAttention, as_tokens, from_tokens, timm_attr

__all__ = [
    "SpikingVisformerAttention",
    "SpikingNestAttention",
    "SpikingTntAttention",
    "SpikingMetaFormerAttention",
    "SpikingEfficientFormerAttention",
    "SpikingTinyVitAttention",
    "SpikingCrossAttention",
    "SpikingPvtV2Attention",
    "SpikingDavitWindowAttention",
    "SpikingDavitChannelAttention",
    "SpikingHieraAttention",
    "SpikingSwinV2WindowAttention",
    "SpikingMultiScaleAttention",
    "SpikingVoloAttention",
    "SpikingVoloClassAttention",
    "SpikingOutlookAttention",
    "SpikingLinearSelfAttention",
]


def _split_qkv(qkv: torch.Tensor, heads: int, dims: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """``[.., N, 3·H·D] → q, k, v [.., H, N, D]`` (``dims``: per-head sizes of q, k, v when they differ, grouped per head)."""
    *lead, n, _ = qkv.shape
    if dims is None:
        t = qkv.reshape(*lead, n, 3, heads, -1).movedim(-3, 0).transpose(-3, -2)
        return t.unbind(0)
    t = qkv.reshape(*lead, n, heads, -1).transpose(-3, -2)
    return t.split(list(dims), dim=-1)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[.., H, N, D] → [.., N, H·D]``."""
    return x.transpose(-3, -2).flatten(-2)


class _Plain(VariantAttention):
    """``qkv`` → ``softmax(s_q(q)·d^-1/2·s_k(k)ᵀ)·s_v(v)`` → ``proj`` on tokens ``[.., N, C]``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory, *, head_dim: int | None = None, **kw):
        heads = int(src.num_heads)
        head_dim = int(head_dim if head_dim is not None else src.qkv.out_features // (3 * heads))
        super().__init__(src, site_factory, num_heads=heads, head_dim=head_dim, scale=float(src.scale), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fire(self.sfn_qkv_in, x)
        x = self._attend(*_split_qkv(self.qkv(x), self.num_heads))
        x = fire(self.sfn_proj_in, _merge(x))
        return self.proj_drop(self.proj(x)) if hasattr(self, "proj_drop") else self.proj(x)


class SpikingNestAttention(_Plain):
    """timm NesT ``Attention``: ViT attention inside each image block, ``x [B, T, N, C]``; the heads are merged
    channel-major (``[.., N, D, H]``, as NesT does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fire(self.sfn_qkv_in, x)
        x = self._attend(*_split_qkv(self.qkv(x), self.num_heads))  # [B, T, H, N, D]
        x = fire(self.sfn_proj_in, x.permute(0, 1, 3, 4, 2).flatten(-2))
        return self.proj_drop(self.proj(x))


class SpikingMetaFormerAttention(_Plain):
    """timm MetaFormer ``Attention`` (CAFormer): ViT attention with ``head_dim`` fixed and no qk-norm."""


class SpikingDavitWindowAttention(_Plain):
    """timm DaViT ``WindowAttention``: ViT attention on the windows the block cuts (no position bias, no mask)."""


class SpikingVisformerAttention(VariantAttention):
    """timm Visformer ``Attention`` on ``[B, C, H, W]`` maps: 1×1-conv ``qkv`` and ``proj``, ``head_dim`` from ``head_dim_ratio``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, shape = as_tokens(x)
        t = fire(self.sfn_qkv_in, t)
        qkv = as_tokens(self.qkv(from_tokens(t, shape)))[0]
        x = _merge(self._attend(*_split_qkv(qkv, self.num_heads)))
        x = fire(self.sfn_proj_in, x)
        b, _, h, w = shape
        return self.proj_drop(self.proj(from_tokens(x, (b, self.attn_dim, h, w))))


class SpikingTntAttention(VariantAttention):
    """timm TNT ``Attention``: q, k from ``qk`` (``head_dim = hidden_dim/H``), v from ``v`` (``dim/H`` per head)."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        q, k = self.qk(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        x = fire(self.sfn_proj_in, _merge(self._attend(q, k, v)))
        return self.proj_drop(self.proj(x))


class _BiasedAttention(VariantAttention):
    """LeViT-style attention with biases ``B[:, idx]`` and per-head sizes ``(key_dim, key_dim, val_dim)``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.key_dim, scale=src.scale)
        self.key_dim, self.val_dim = int(src.key_dim), int(src.val_dim)

    def _qkv_attend(self, x: torch.Tensor) -> torch.Tensor:
        x = fire(self.sfn_qkv_in, x)
        q, k, v = _split_qkv(self.qkv(x), self.num_heads, (self.key_dim, self.key_dim, self.val_dim))
        x = self._attend(q, k, v, self.attention_biases[:, self.attention_bias_idxs])
        return self.proj(fire(self.sfn_proj_in, _merge(x)))


class SpikingEfficientFormerAttention(_BiasedAttention):
    """timm EfficientFormer ``Attention``: ``softmax(q·kᵀ·d^-1/2 + B[:, idx])·v``, ``d`` = ``key_dim``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv_attend(x)


class SpikingTinyVitAttention(_BiasedAttention):
    """timm TinyViT ``Attention``: a LayerNorm before ``qkv`` (``qkv_in`` fires after it), attention biases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv_attend(self.norm(x))


class SpikingCrossAttention(VariantAttention):
    """timm CrossViT ``CrossAttention``: ``wq`` of the class token, ``wk``, ``wv`` of every token; returns ``[B, 1, C]``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.wq.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        x = fire(self.sfn_qkv_in, x)
        q, k, v = (_split(t, h) for t in (self.wq(x[:, :1]), self.wk(x), self.wv(x)))
        x = fire(self.sfn_proj_in, _merge(self._attend(q, k, v)))
        return self.proj_drop(self.proj(x))


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D] → [B, H, N, D]``."""
    return t.reshape(*t.shape[:-1], heads, -1).transpose(-3, -2)


class SpikingPvtV2Attention(VariantAttention):
    """timm PVT-v2 ``Attention`` (spatial-reduction attention): q from every token, k, v from ``kv`` of the
    ``sr``-strided map, ``kv(s_kv(norm(sr(s_x(x)))))`` (``kv(s_x(x))`` when ``sr_ratio = 1``)."""

    @classmethod
    def refusal(cls, src: nn.Module) -> str | None:
        if getattr(src, "pool", None) is not None:
            return "linear_attn=True: the average-pooled input would enter sr's convolution as a floating-point activation"
        return None

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        why = self.refusal(src)
        if why is not None:
            raise TypeError(f"unsupported attention module {type(src).__module__}.{type(src).__qualname__}: {why}")
        sites = self.SITES if src.sr is None else ("qkv_in", "kv_in", "q", "k", "v", "attn", "proj_in")
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim, scale=src.scale, sites=sites)
        self.reduces = src.sr is not None

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        b, n, c = x.shape
        x = fire(self.sfn_qkv_in, x)
        q = _split(self.q(x), self.num_heads)
        if self.reduces:
            x = self.sr(x.transpose(1, 2).reshape(b, c, *feat_size)).flatten(2).transpose(1, 2)
            x = fire(self.sfn_kv_in, self.norm(x))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = fire(self.sfn_proj_in, _merge(self._attend(q, k, v)))
        return self.proj_drop(self.proj(x))


class SpikingDavitChannelAttention(VariantAttention):
    """timm DaViT ``ChannelAttention``: ``out = (softmax(kᵀ·d^-1/2 · v) · qᵀ)ᵀ`` per head, over channels.

    The operands ``kᵀ``, ``vᵀ`` (``[B, H, D, N]``) and ``qᵀ`` take the ``q``, ``k`` and ``v`` sites (the
    left and right operand of the first product, the right operand of the second).
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.qkv.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fire(self.sfn_qkv_in, x)
        q, k, v = (t.transpose(-2, -1) for t in _split_qkv(self.qkv(x), self.num_heads))
        x = self._attend(k, v, q).transpose(-2, -1)  # [B, H, N, D]
        return self.proj(fire(self.sfn_proj_in, _merge(x)))


class SpikingHieraAttention(VariantAttention):
    """timm Hiera ``MaskUnitAttention``: global or per-mask-unit attention, q max-pooled over ``q_stride`` groups."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.heads, head_dim=src.head_dim, scale=src.scale)
        self.dim_out, self.q_stride = int(src.dim_out), int(src.q_stride)
        self.window_size, self.use_mask_unit_attn = int(src.window_size), bool(src.use_mask_unit_attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        h, d = self.num_heads, self.head_dim
        if self.use_mask_unit_attn:  # [B, H, windows, tokens, D]
            windows = n // (self.q_stride * self.window_size)
            q, k, v = self.qkv(x).reshape(b, -1, windows, 3, h, d).permute(3, 0, 4, 2, 1, 5).unbind(0)
            if self.q_stride > 1:
                q = q.view(b, h, windows, self.q_stride, -1, d).amax(dim=3)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            if self.q_stride > 1:
                q = q.view(b, h, self.q_stride, -1, d).amax(dim=2)
        x = self._attend(q, k, v)
        x = x.transpose(1, 3) if self.use_mask_unit_attn else x.transpose(1, 2)
        return self.proj(fire(self.sfn_proj_in, x.reshape(b, -1, self.dim_out)))


class SpikingSwinV2WindowAttention(VariantAttention):
    """timm Swin V2 ``WindowAttention`` (cosine attention):

    ``attn = softmax(τ_h · s_q(q̂)·s_k(k̂)ᵀ + 16·σ(B_cpb) + M_shift)``, ``q̂ = q/‖q‖₂``, ``k̂ = k/‖k‖₂`` over the
    channels of a head, ``τ_h = exp(min(logit_scale_h, ln 100))``; ``B_cpb`` = ``cpb_mlp(relative_coords_table)``
    indexed by ``relative_position_index``. ``qkv`` bias ``[b_q, 0, b_v]``.
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.qkv.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=1.0)
        self.window_area = int(src.window_size[0] * src.window_size[1])

    def _position_bias(self) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        return 16 * torch.sigmoid(bias.permute(2, 0, 1)).unsqueeze(0)  # [1, H, Wa, Wa]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = _split_qkv(qkv, self.num_heads)
        bias = self._position_bias()
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(b // num_win, -1, -1, -1, -1)
            bias = bias.reshape(b, self.num_heads, n, n)
        tau = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        x = self._attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, bias, scale=tau)
        x = fire(self.sfn_proj_in, _merge(x))
        return self.proj_drop(self.proj(x))


class SpikingMultiScaleAttention(VariantAttention):
    """timm MViTv2 ``MultiScaleAttention`` (pooling attention, ``pool_first=False``):

    ``q, k, v = qkv(s_x(x))``; each pooled one is ``norm(pool(s_p(·)))`` (``s_p`` = ``pool_in``, one site on the
    inputs of the pooling convolutions, fired on them stacked along the batch; pooling by ``avg``/``max`` needs
    none); ``attn = softmax(s_q(q)·d^-1/2·s_k(k)ᵀ + R(s_q(q)))`` with the decomposed relative positions ``R``
    (``rel_pos_h``/``rel_pos_w``, floating point), ``out = s_a(attn)·s_v(v) (+ s_q(q))`` (residual pooling).
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        conv_pool = tuple(isinstance(p, nn.Conv2d) for p in (src.pool_q, src.pool_k, src.pool_v))
        sites = ("qkv_in", "pool_in", "q", "k", "v", "attn", "proj_in") if any(conv_pool) else self.SITES
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim, scale=src.scale, sites=sites)
        self.conv_pool = conv_pool
        self.dim_out, self.has_cls_token = int(src.dim_out), bool(src.has_cls_token)
        self.rel_pos_type, self.residual_pooling = src.rel_pos_type, bool(src.residual_pooling)
        for name in ("pool_q", "pool_k", "pool_v", "norm_q", "norm_k", "norm_v"):
            if getattr(src, name) is None:
                setattr(self, name, None)

    def _pool(self, t: torch.Tensor, pool: nn.Module | None, norm: nn.Module | None,
              feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        from timm.models.mvitv2 import reshape_post_pool, reshape_pre_pool

        size = feat_size
        if pool is not None:
            t, tok = reshape_pre_pool(t, feat_size, self.has_cls_token)
            t, size = reshape_post_pool(pool(t), self.num_heads, tok)
        return (t if norm is None else norm(t)), size

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        from timm.models.mvitv2 import cal_rel_pos_type

        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        qkv = list(self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0))
        conv = [i for i, c in enumerate(self.conv_pool) if c]
        if conv:
            for i, t in zip(conv, fire(self.sfn_pool_in, torch.cat([qkv[i] for i in conv])).split(b)):
                qkv[i] = t
        q, q_size = self._pool(qkv[0], self.pool_q, self.norm_q, feat_size)
        k, k_size = self._pool(qkv[1], self.pool_k, self.norm_k, feat_size)
        v, _ = self._pool(qkv[2], self.pool_v, self.norm_v, feat_size)
        q, k, v = fire(self.sfn_q, q), fire(self.sfn_k, k), fire(self.sfn_v, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_type == "spatial":
            attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
        x = fire(self.sfn_attn, attn.softmax(dim=-1)) @ v
        if self.residual_pooling:
            x = x + q
        x = fire(self.sfn_proj_in, _merge(x))
        return self.proj(x), q_size


class SpikingVoloAttention(_Plain):
    """timm VOLO ``Attention``: ViT attention on a ``[B, H, W, C]`` map (returned in that shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return super().forward(x.reshape(b, h * w, c)).reshape(b, h, w, -1)


class SpikingVoloClassAttention(VariantAttention):
    """timm VOLO ``ClassAttention``: ``q`` of the class token, ``k, v`` from ``kv`` of every token; returns ``[B, 1, C]``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = _split(self.q(x[:, :1]), self.num_heads)
        x = fire(self.sfn_proj_in, _merge(self._attend(q, k, v)))
        return self.proj_drop(self.proj(x))


class SpikingOutlookAttention(VariantAttention):
    """timm VOLO ``OutlookAttention``: per output location, a ``k²×k²`` attention generated by a Linear.

    ``a = softmax(d^-1/2 · attn(s_l(pool(s_x(x)))))`` (``[B, H·N, k², k²]``; ``s_l`` = ``logits_in`` on the
    average-pooled spikes, absent when ``stride = 1``), ``v = unfold(v(s_x(x)))`` (``[B, H·N, k², D]``),
    ``out = proj(s_p(fold(s_a(a)·s_v(v))))``: one spike product (``a·v``), no ``q·kᵀ``.
    """

    PRODUCTS = (("av", "attn", "v"),)

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.v.in_features
        sites = ("qkv_in", "logits_in", "v", "attn", "proj_in") if src.stride > 1 else ("qkv_in", "v", "attn", "proj_in")
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=src.scale,
                         sites=sites)
        self.kernel_size, self.padding, self.stride = int(src.kernel_size), int(src.padding), int(src.stride)

    def energy_ops(self) -> list[dict]:
        """The one spike product ``attn·v`` (see :meth:`SFormerAttention.energy_ops`)."""
        from .modules import product_ops, site_costs

        return [product_ops("av", site_costs(self.sfn_attn), site_costs(self.sfn_v), "av")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, c = x.shape
        heads, kk = self.num_heads, self.kernel_size ** 2
        h, w = math.ceil(hh / self.stride), math.ceil(ww / self.stride)
        x = fire(self.sfn_qkv_in, x)
        v = self.unfold(self.v(x).permute(0, 3, 1, 2)).reshape(b, heads, c // heads, kk, h * w)
        v = v.permute(0, 1, 4, 3, 2).reshape(b, heads * h * w, kk, -1)
        a = self.pool(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)  # [B, N, C]
        if self.stride > 1:
            a = fire(self.sfn_logits_in, a)
        attn = self.attn(a).reshape(b, h * w, heads, kk, kk).transpose(1, 2).reshape(b, heads * h * w, kk, kk)
        attn = fire(self.sfn_attn, self.attn_drop((attn * self.scale).softmax(dim=-1)))
        x = (attn @ fire(self.sfn_v, v)).reshape(b, heads, h * w, kk, -1).permute(0, 1, 4, 3, 2)
        x = F.fold(x.reshape(b, c * kk, h * w), output_size=(hh, ww), kernel_size=self.kernel_size, padding=self.padding,
                   stride=self.stride)
        x = fire(self.sfn_proj_in, x.permute(0, 2, 3, 1))
        return self.proj_drop(self.proj(x))


class SpikingLinearSelfAttention(VariantAttention):
    """timm MobileViTV2 ``LinearSelfAttention`` (separable self-attention, one query channel) on ``[B, C, P, N]``:

    ``i, k, v = qkv_proj(s_x(x))`` (``1 + d + d`` channels), ``a = softmax_N(i)``, context ``c = Σ_N s_a(a)·s_v(k)``
    (``[B, P, 1, d]``), ``out = out_proj(s_p(s_q(relu(v)) ⊙ s_k(c)))``. The two spike products keep the SFormer
    site roles: ``a·k`` is the ``av`` product (``attn [B, P, 1, N]``, ``v`` = the keys ``[B, P, N, d]``), the
    broadcast product ``relu(v) ⊙ c`` the ``qk`` product (``q`` = ``relu(v) [B, P, N, d]``, ``k`` = ``c``).
    Sites fire on channels-last tokens. The cross-attention call (``x_prev``) is not supported.
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=1, head_dim=src.embed_dim, scale=1.0)
        self.embed_dim = int(src.embed_dim)

    def forward(self, x: torch.Tensor, x_prev: torch.Tensor | None = None) -> torch.Tensor:
        if x_prev is not None:
            raise NotImplementedError("SpikingLinearSelfAttention: the cross-attention call (x_prev) is not supported")
        x = fire(self.sfn_qkv_in, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        a = fire(self.sfn_attn, self.attn_drop(F.softmax(query, dim=-1)).transpose(1, 2))  # [B, P, 1, N]
        context = a @ fire(self.sfn_v, key.permute(0, 2, 3, 1))  # [B, P, 1, d]
        out = fire(self.sfn_q, F.relu(value).permute(0, 2, 3, 1)) * fire(self.sfn_k, context)
        out = fire(self.sfn_proj_in, out).permute(0, 3, 1, 2)
        return self.out_drop(self.out_proj(out))


register_variant(timm_attr("timm.models.visformer", "Attention"), SpikingVisformerAttention)
register_variant(timm_attr("timm.models.nest", "Attention"), SpikingNestAttention)
register_variant(timm_attr("timm.models.tnt", "Attention"), SpikingTntAttention)
register_variant(timm_attr("timm.models.metaformer", "Attention"), SpikingMetaFormerAttention)
register_variant(timm_attr("timm.models.efficientformer", "Attention"), SpikingEfficientFormerAttention)
register_variant(timm_attr("timm.models.tiny_vit", "Attention"), SpikingTinyVitAttention)
register_variant(timm_attr("timm.models.crossvit", "CrossAttention"), SpikingCrossAttention)
register_variant(timm_attr("timm.models.pvt_v2", "Attention"), SpikingPvtV2Attention)
register_variant(timm_attr("timm.models.davit", "WindowAttention"), SpikingDavitWindowAttention)
register_variant(timm_attr("timm.models.davit", "ChannelAttention"), SpikingDavitChannelAttention)
register_variant(timm_attr("timm.models.hiera", "MaskUnitAttention"), SpikingHieraAttention)
register_variant(timm_attr("timm.models.swin_transformer_v2", "WindowAttention"), SpikingSwinV2WindowAttention)
register_variant(timm_attr("timm.models.mvitv2", "MultiScaleAttention"), SpikingMultiScaleAttention)
register_variant(timm_attr("timm.models.volo", "Attention"), SpikingVoloAttention)
register_variant(timm_attr("timm.models.volo", "ClassAttention"), SpikingVoloClassAttention)
register_variant(timm_attr("timm.models.volo", "OutlookAttention"), SpikingOutlookAttention)
register_variant(timm_attr("timm.models.mobilevit", "LinearSelfAttention"), SpikingLinearSelfAttention)
