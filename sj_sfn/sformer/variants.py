"""Spiking wrappers for the attention families beyond timm's ``Attention`` (one class per family).

Every wrapper is an :class:`~sj_sfn.sformer.SFormerAttention` (same sites, same
:meth:`~sj_sfn.sformer.SFormerAttention.energy_ops`, same ``fire`` path): it takes over the
source module's parameters and buffers under their own names, and places the SFormer sites
of docs/method.md — the inputs of the projections (``qkv_in``, ``proj_in``), ``q``, ``k`` and
``v`` right before the two products, the SoftMax output ``attn`` (positive, with its
ceiling). What a family adds on top — relative position biases, window masks, attention
biases, temperatures, l2-normalised q/k, BatchNorm after a projection — stays floating point
and is applied exactly where the source module applies it. Every site tensor is laid out as
``q [.., L_q, D]``, ``k [.., L_k, D]``, ``attn [.., L_q, L_k]``, ``v [.., L_k, D_v]``:

=========================  ==================================================================
family                     what stays floating point
=========================  ==================================================================
Swin ``WindowAttention``   relative position bias, shifted-window mask (added to the scores)
BEiT ``Attention``         q/v bias (k bias is zero), relative position bias (own or shared)
LeViT ``Attention`` /      attention biases, BatchNorm of the LinearNorm/ConvNorm projections,
``AttentionDownsample``    the activation before ``proj`` (``proj_in`` fires after it)
XCiT ``XCA``               l2 normalisation of q and k over the tokens, per-head temperature;
                           the products are over channels: ``q, k, v [B, H, C_h, N]``
CaiT/XCiT ``ClassAttn``    (none): q from the class token only
CaiT ``TalkingHeadAttn``   the two head mixes: ``logits_in`` fires on the scores into
                           ``proj_l``, ``attn`` on the SoftMax into ``proj_w``, ``attn_mix``
                           (signed) on the mixed probabilities before ``·v``
``nn.MultiheadAttention``  masks (bool or float, key padding), ``bias_k``/``bias_v``, zero
                           attention; ``qkv_in`` fires on the query, ``kv_in``/``v_in`` on a
                           different key/value (cross-attention)
=========================  ==================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import SFormerAttention, SiteFactory, adopt_parameters, fire, register_variant

__all__ = [
    "SpikingWindowAttention",
    "SpikingBeitAttention",
    "SpikingLevitAttention",
    "SpikingLevitAttentionDownsample",
    "SpikingXCA",
    "SpikingClassAttn",
    "SpikingTalkingHeadAttn",
    "SpikingMultiheadAttention",
]


class VariantAttention(SFormerAttention):
    """Common set-up: the source's parameters under their names, one site per :attr:`SITES` entry."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory, *, num_heads: int, head_dim: int, scale: float,
                 sites: tuple[str, ...] | None = None):
        """``sites``: the site kinds of this instance when they depend on its configuration (default :attr:`SITES`)."""
        nn.Module.__init__(self)
        if sites is not None:
            self.SITES = tuple(sites)
        self.source_type = type(src).__name__
        self.num_heads = int(num_heads)
        self.num_kv_heads = self.num_heads
        self.head_dim = int(head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = float(scale)
        adopt_parameters(self, src)
        if not hasattr(self, "attn_drop"):  # LeViT has no attention dropout
            self.attn_drop = nn.Identity()
        for kind in self.SITES:
            self.add_module(f"sfn_{kind}", site_factory(kind))
        self._counts = {}

    @classmethod
    def refusal(cls, src: nn.Module) -> str | None:
        """Why ``src`` cannot be converted by this wrapper (``None``: it can)."""
        return None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """``s_a(softmax(s_q(q)·scale·s_k(k)ᵀ + bias)) · s_v(v)`` with ``q [.., L_q, D]``, ``k [.., L_k, D]``, ``v [.., L_k, D_v]``.

        More than one dimension between the batch and the tokens (NesT's image blocks, Hiera's mask units) is
        flattened into one for the sites: ``[B, H', L, D]``, the layout the energy counts read (heads on dim -3).
        """
        lead = q.shape[:-2]
        if q.dim() > 4:
            q, k, v = (t.flatten(1, -3) for t in (q, k, v))
            if bias is not None and bias.dim() > 4:
                bias = bias.flatten(1, -3)
        q, k, v = fire(self.sfn_q, q), fire(self.sfn_k, k), fire(self.sfn_v, v)
        attn = (q * self.scale if scale is None else q) @ k.transpose(-2, -1)
        if scale is not None:
            attn = attn * scale
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = fire(self.sfn_attn, attn) @ v
        return out.reshape(*lead, *out.shape[-2:])


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D] → [B, H, N, D]``."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


# -- Swin ----------------------------------------------------------------------------------------


class SpikingWindowAttention(VariantAttention):
    """timm Swin ``WindowAttention``: ``softmax(q·kᵀ·d^-1/2 + B_rel + M_shift)·v`` per window.

    ``B_rel`` = ``relative_position_bias_table[relative_position_index]`` (``[H, W_a, W_a]``),
    ``M_shift`` the 0/-inf mask of a shifted window (``[n_win, W_a, W_a]``), both floating point.
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.qkv.out_features // (3 * src.num_heads),
                         scale=src.scale)
        self.window_area = int(src.window_area)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)  # [1, H, Wa, Wa]
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(b // num_win, -1, -1, -1, -1)
            bias = bias.reshape(b, self.num_heads, n, n)
        x = self._attend(q, k, v, bias)
        x = fire(self.sfn_proj_in, x.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(self.proj(x))


# -- BEiT ----------------------------------------------------------------------------------------


class SpikingBeitAttention(VariantAttention):
    """timm BEiT ``Attention``: ``qkv(x) + [b_q, 0, b_v]``, scores ``+ B_rel (+ B_shared)``."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.qkv.out_features // (3 * src.num_heads),
                         scale=src.scale)
        self.rel_window = None if src.relative_position_bias_table is None else tuple(int(s) for s in src.window_size)

    def _rel_pos_bias(self) -> torch.Tensor | None:
        if self.rel_window is None:
            return None
        n = self.rel_window[0] * self.rel_window[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        x = fire(self.sfn_qkv_in, x)
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._rel_pos_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = self._attend(q, k, v, bias)
        x = fire(self.sfn_proj_in, x.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(self.proj(x))


# -- LeViT ---------------------------------------------------------------------------------------


def as_tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """A ``[B, C, H, W]`` map as ``[B, HW, C]`` tokens (sites work on tokens), with the shape to restore."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2), tuple(x.shape)
    return x, None


def from_tokens(x: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    return x if shape is None else x.transpose(1, 2).reshape(shape)


class _LevitBase(VariantAttention):
    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.key_dim, scale=src.scale)
        self.use_conv = bool(src.use_conv)
        self.key_dim, self.val_dim = int(src.key_dim), int(src.val_dim)
        self.val_attn_dim = int(src.val_attn_dim)

    def _biases(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def _project(self, ln: nn.Module, x: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """``LinearNorm``/``ConvNorm`` on spiking tokens ``x``, back to tokens ``[B, N, C_out]``."""
        if shape is None:
            return ln(x)
        return as_tokens(ln(from_tokens(x, shape)))[0]

    def _output(self, x: torch.Tensor, hw: tuple[int, ...] | None) -> torch.Tensor:
        """``proj = ln(s_p(act(x)))`` on ``x [B, H, N, D_v]`` (the activation stays floating point); a map of
        spatial size ``hw`` for ConvNorm projections, tokens otherwise."""
        b, _, n, _ = x.shape
        x = self.proj.act(x.transpose(1, 2).reshape(b, n, self.val_attn_dim))
        x = fire(self.sfn_proj_in, x)
        if hw is None:
            return self.proj.ln(x)
        return self.proj.ln(from_tokens(x, (b, self.val_attn_dim, *hw)))


class SpikingLevitAttention(_LevitBase):
    """timm LeViT ``Attention``: ``softmax(q·kᵀ·d^-1/2 + B[:, idx])·v``, ``proj = ln(act(·))``; q, k, v from one LinearNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = as_tokens(x) if self.use_conv else (x, None)
        x = fire(self.sfn_qkv_in, x)
        b, n, _ = x.shape
        qkv = self._project(self.qkv, x, shape)
        if shape is None:
            q, k, v = qkv.view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
            q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        else:  # ConvNorm channels are grouped per head: [H, (k_d, k_d, v_d)]
            q, k, v = qkv.transpose(1, 2).reshape(b, self.num_heads, -1, n).split([self.key_dim, self.key_dim, self.val_dim], dim=2)
            q, k, v = (t.transpose(-2, -1) for t in (q, k, v))
        x = self._attend(q, k, v, self._biases())
        return self._output(x, None if shape is None else shape[2:])


class SpikingLevitAttentionDownsample(_LevitBase):
    """timm LeViT ``AttentionDownsample``: k, v from every token, q from every ``stride``-th one (subsampling)."""

    @classmethod
    def refusal(cls, src: nn.Module) -> str | None:
        down = src.q.down
        if isinstance(down, nn.AvgPool2d) and down.kernel_size not in (1, (1, 1)) or getattr(down, "pool", None) is not None:
            return "use_pool=True: the average-pooled query input would enter q's projection as a floating-point activation"
        return None

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        why = self.refusal(src)
        if why is not None:
            raise TypeError(f"unsupported attention module {type(src).__module__}.{type(src).__qualname__}: {why}")
        super().__init__(src, site_factory)
        self.stride = int(src.stride)
        self.resolution = tuple(int(r) for r in src.resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = as_tokens(x) if self.use_conv else (x, None)
        x = fire(self.sfn_qkv_in, x)
        b, n, c = x.shape
        s = self.stride
        if shape is None:
            k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
            k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            h, w = self.resolution
            xq = x.view(b, h, w, c)[:, ::s, ::s].reshape(b, -1, c)  # timm's Downsample without pooling
            q = self.q.ln(xq).view(b, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
            hw = None
        else:
            kv = self._project(self.kv, x, shape)
            k, v = kv.transpose(1, 2).reshape(b, self.num_heads, -1, n).split([self.key_dim, self.val_dim], dim=2)
            k, v = k.transpose(-2, -1), v.transpose(-2, -1)
            xq = from_tokens(x, shape)[:, :, ::s, ::s]  # AvgPool2d(kernel 1, stride s) = subsampling
            q = self.q.ln(xq)
            hw = tuple(q.shape[-2:])
            q = q.reshape(b, self.num_heads, self.key_dim, -1).transpose(-2, -1)
        x = self._attend(q, k, v, self._biases())
        return self._output(x, hw)


# -- XCiT ----------------------------------------------------------------------------------------


class SpikingXCA(VariantAttention):
    """timm XCiT ``XCA`` (cross-covariance attention), over channels:

    ``q̂ = q/‖q‖₂, k̂ = k/‖k‖₂`` (over the tokens), ``attn = softmax(τ_h · s_q(q̂)·s_k(k̂)ᵀ)`` (``[C_h, C_h]``
    per head), ``out = s_a(attn)·s_v(v)`` with ``q, k, v [B, H, C_h, N]``; the temperature ``τ`` and the
    normalisation stay floating point.
    """

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.qkv.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = fire(self.sfn_qkv_in, x)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x = self._attend(q, k, v, scale=self.temperature)
        x = fire(self.sfn_proj_in, x.permute(0, 3, 1, 2).reshape(b, n, c))
        return self.proj_drop(self.proj(x))


# -- CaiT / XCiT class attention -------------------------------------------------------------------


class SpikingClassAttn(VariantAttention):
    """timm CaiT/XCiT ``ClassAttn``: ``q`` of the class token only, ``k``, ``v`` of every token (``L_q = 1``)."""

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.q.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = fire(self.sfn_qkv_in, x)
        q = _heads(self.q(x[:, :1]), self.num_heads)
        k, v = _heads(self.k(x), self.num_heads), _heads(self.v(x), self.num_heads)
        x = self._attend(q, k, v)
        x = fire(self.sfn_proj_in, x.transpose(1, 2).reshape(b, 1, c))
        return self.proj_drop(self.proj(x))


class SpikingTalkingHeadAttn(VariantAttention):
    """timm CaiT ``TalkingHeadAttn``: the heads are mixed by ``proj_l`` before and ``proj_w`` after the SoftMax.

    ``s = s_q(q)·d^-1/2·s_k(k)ᵀ``, ``a = s_a(softmax(P_l·s_l(s)))``, ``out = s_m(P_w·a)·s_v(v)`` with the
    sites ``s_l`` = ``logits_in`` (signed: the input of ``proj_l``), ``s_a`` = ``attn`` (the input of
    ``proj_w``) and ``s_m`` = ``attn_mix`` (signed: the mixed probabilities can be negative).
    """

    SITES = ("qkv_in", "q", "k", "v", "logits_in", "attn", "attn_mix", "proj_in")
    PRODUCTS = (("qk", "q", "k"), ("av", "attn_mix", "v"))

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        dim = src.qkv.in_features
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=dim // src.num_heads, scale=src.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = fire(self.sfn_qkv_in, x)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = fire(self.sfn_q, q), fire(self.sfn_k, k), fire(self.sfn_v, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(fire(self.sfn_logits_in, attn).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = fire(self.sfn_attn, attn.softmax(dim=-1))
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = fire(self.sfn_attn_mix, self.attn_drop(attn))
        x = fire(self.sfn_proj_in, (attn @ v).transpose(1, 2).reshape(b, n, c))
        return self.proj_drop(self.proj(x))


# -- torch nn.MultiheadAttention -------------------------------------------------------------------


class SpikingMultiheadAttention(VariantAttention):
    """``torch.nn.MultiheadAttention`` (either ``batch_first``), the same call and return value.

    ``qkv_in`` fires on the query; a key that is not the query fires through ``kv_in``, a value
    that is neither through ``v_in`` (unused sites of a self-attention stay uncalibrated and
    raise if a later call needs them). ``attn_mask`` / ``key_padding_mask`` (bool or float),
    ``bias_k``/``bias_v`` and ``add_zero_attn`` act as in :func:`torch.nn.functional.multi_head_attention_forward`;
    the returned weights are the attention site's output.
    """

    SITES = ("qkv_in", "kv_in", "v_in", "q", "k", "v", "attn", "proj_in")
    OPTIONAL_SITES = ("kv_in", "v_in")

    def __init__(self, src: nn.Module, site_factory: SiteFactory):
        super().__init__(src, site_factory, num_heads=src.num_heads, head_dim=src.head_dim,
                         scale=1.0 / math.sqrt(src.head_dim))
        self.embed_dim = int(src.embed_dim)
        self.batch_first = bool(src.batch_first)
        self.dropout = float(src.dropout)
        self.add_zero_attn = bool(src.add_zero_attn)
        self.packed = bool(src._qkv_same_embed_dim)
        self.bias_k, self.bias_v = src.bias_k, src.bias_v  # parameters, or None (then plain attributes)

    def _weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        if self.packed:
            w = self.in_proj_weight.chunk(3)
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return w, b

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        same_k, same_v, v_is_q = key is query, value is key, value is query
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # [L, B, E] -> [B, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        xq = fire(self.sfn_qkv_in, query)
        xk = xq if same_k else fire(self.sfn_kv_in, key)
        xv = xk if same_v else xq if v_is_q else fire(self.sfn_v_in, value)
        (wq, wk, wv), (bq, bk, bv) = self._weights()
        q, k, v = F.linear(xq, wq, bq), F.linear(xk, wk, bk), F.linear(xv, wv, bv)
        bsz, tgt_len, _ = q.shape
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=q.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=q.dtype, check_other=False)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(bsz, 1, -1)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q, k, v = _heads(q, self.num_heads), _heads(k, self.num_heads), _heads(v, self.num_heads)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, self.num_heads, 1, self.head_dim)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[2]
        bias = None
        if attn_mask is not None:
            bias = attn_mask.view(bsz, self.num_heads, tgt_len, src_len) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            bias = kpm if bias is None else bias + kpm
        q, k, v = fire(self.sfn_q, q), fire(self.sfn_k, k), fire(self.sfn_v, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        attn = fire(self.sfn_attn, attn)
        out = (attn @ v).transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = self.out_proj(fire(self.sfn_proj_in, out))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


# -- registry --------------------------------------------------------------------------------------


def timm_attr(module: str, *names: str):
    def load() -> tuple[type, ...]:
        import importlib

        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)

    return load


register_variant(timm_attr("timm.models.swin_transformer", "WindowAttention"), SpikingWindowAttention)
register_variant(timm_attr("timm.models.beit", "Attention"), SpikingBeitAttention)
register_variant(timm_attr("timm.models.levit", "Attention"), SpikingLevitAttention)
register_variant(timm_attr("timm.models.levit", "AttentionDownsample"), SpikingLevitAttentionDownsample)
register_variant(timm_attr("timm.models.xcit", "XCA"), SpikingXCA)
register_variant(timm_attr("timm.models.cait", "ClassAttn"), SpikingClassAttn)
register_variant(timm_attr("timm.models.xcit", "ClassAttn"), SpikingClassAttn)
register_variant(timm_attr("timm.models.cait", "TalkingHeadAttn"), SpikingTalkingHeadAttn)
register_variant(lambda: (nn.MultiheadAttention,), SpikingMultiheadAttention)
