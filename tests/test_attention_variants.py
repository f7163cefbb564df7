"""SFormer on attention variants: Swin, BEiT, LeViT, XCiT, CaiT, torchvision ViT and nn.MultiheadAttention.

Each family is checked on a tiny random model (weights, biases, BatchNorm statistics, relative position
tables, temperatures and layer scales all drawn away from their identity initialisation):

- with every site an ``nn.Identity`` the wrapped model IS the ANN (max abs error <= 1e-5 of the output scale);
- converted at fine resolution (λ = 1e-3, N = 4096: steps of 1e-3·θ covering 4.1·θ) the SNN output is within
  1e-2 relative L2 of the ANN's, and at λ = 0.25, N = 32 it differs (the sites do act);
- ``measure_energy(snn, loader, ann=model)`` accepts the pair (same weight layers) and counts both attention
  products with ``ann_macs = B·H·L_q·L_k·D``;
- a module SFormer cannot convert is refused by name in ``prepare``, before any batch runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sj_sfn import sformer
from sj_sfn.energy import measure_energy
from sj_sfn.neuron import SFNode

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

FINE = {"lam": 1e-3, "max_spikes": 4096}
SEED = 0


def _randomize(model: nn.Module) -> nn.Module:
    """Draw every weight, bias, BN statistic and attention parameter away from its (often identity) init."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.normal_(1, 0.2, generator=g)
        for n, p in model.named_parameters():
            if any(s in n for s in ("bias_table", "attention_biases", "q_bias", "v_bias", "bias_k", "bias_v", "in_proj_bias")):
                p.normal_(0, 0.3, generator=g)
            elif any(s in n for s in ("temperature", "gamma")):
                p.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _swin():
    from timm.models.swin_transformer import SwinTransformer

    # 8x8 tokens, window 4: the second block of stage 1 is shifted (masked); stage 2 is one window
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def _beit(shared: bool = False):
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, use_abs_pos_emb=False,
                use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared)


def _levit(use_conv: bool = False):
    from timm.models.levit import Levit

    return Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=10, use_conv=use_conv)


def _xcit():
    from timm.models.xcit import Xcit

    return Xcit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, cls_attn_layers=1, num_classes=10)


def _cait():
    from timm.models.cait import Cait

    return Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, depth_token_only=1, num_classes=10)


def _tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=10)


class TalkingHeads(nn.Module):
    """Patch embedding, one CaiT talking-heads attention with a residual, mean pool, classifier."""

    def __init__(self):
        super().__init__()
        from timm.models.cait import TalkingHeadAttn

        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.norm = nn.LayerNorm(32)
        self.attn = TalkingHeadAttn(32, num_heads=4, qkv_bias=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


MODELS = {
    "swin": (_swin, 32, "WindowAttention"),
    "beit": (_beit, 32, "Attention"),
    "beit_shared_rel_pos": (lambda: _beit(shared=True), 32, "Attention"),
    "levit": (_levit, 64, "AttentionDownsample"),
    "levit_conv": (lambda: _levit(use_conv=True), 64, "AttentionDownsample"),
    "xcit": (_xcit, 32, "XCA"),
    "cait": (_cait, 32, "TalkingHeadAttn"),
    "talking_heads": (TalkingHeads, 32, "TalkingHeadAttn"),
    "tv_vit": (_tv_vit, 32, "MultiheadAttention"),
}
# CaiT's class-attention blocks receive a view of the cls_token parameter, which SpikingJelly's op counter
# (used by measure_energy) cannot hook; the talking-heads model covers its attention's energy_ops instead
NO_ENERGY = {"cait"}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    build, size, _ = MODELS[name]
    torch.manual_seed(SEED)
    model = _randomize(build())
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(SEED + 2))
    return model, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_sites_reproduce_the_ann(name):
    model, x = _model(name)
    exact = sformer.prepare(model, lambda kind, site: nn.Identity()).eval()
    with torch.no_grad():
        y, z = model(x), exact(x)
    assert y.abs().max() > 0.1, "the test model's output must not be trivially small"
    assert (y - z).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item()), name
    wrapped = [m for m in exact.modules() if isinstance(m, sformer.SFormerAttention)]
    assert wrapped and MODELS[name][2] in {m.source_type for m in wrapped}


@pytest.mark.parametrize("name", list(MODELS))
def test_fine_resolution_conversion_matches_and_coarse_differs(name):
    model, x = _model(name)
    fine = sformer.convert(model, [x], progress=False, **FINE)
    coarse = sformer.convert(model, [x], lam=0.25, max_spikes=32, progress=False)
    with torch.no_grad():
        y, yf, yc = model(x), fine(x), coarse(x)
    assert _rel(yf, y) < 1e-2, f"{name}: fine-resolution SNN is {_rel(yf, y):.2e} from the ANN"
    assert _rel(yc, y) > 10 * _rel(yf, y), f"{name}: the sites do not quantise"
    for m in fine.modules():
        if isinstance(m, sformer.SFormerAttention):
            for kind in ("q", "k", "v", "attn"):
                assert isinstance(getattr(m, f"sfn_{kind}"), SFNode), (name, kind)
            assert not m.sfn_attn.signed and m.sfn_attn.ceiling is not None  # positive-only, capped


@pytest.mark.parametrize("name", [n for n in MODELS if n not in NO_ENERGY])
def test_energy_counts_both_products(name, monkeypatch):
    # nn.MultiheadAttention's fused inference kernel (eval, no grad) is one ATen op that hides the ANN's projections
    # from the counter; measure_energy does not switch it off yet
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    model, x = _model(name)
    snn = sformer.convert(model, [x], lam=0.25, max_spikes=32, progress=False)
    rep = measure_energy(snn, [x], ann=model)
    assert 0 < rep.ratio < 2
    attn = {n: m for n, m in snn.named_modules() if isinstance(m, sformer.SFormerAttention)}
    rows = {r.name: r for r in rep.per_layer}
    for n in attn:
        for product in ("qk", "av"):
            row = rows[f"{n}.{product}"]
            assert row.snn_acs > 0 and row.ann_macs > 0, (n, product)
    # one hand count: the first attention, from its sites' last shapes
    n, m = next(iter(attn.items()))
    shapes = _site_shapes(snn, m, x)
    b_h = math.prod(shapes["q"][:-2])
    expect_qk = b_h * shapes["q"][-2] * shapes["k"][-2] * shapes["q"][-1] / x.shape[0]
    assert rows[f"{n}.qk"].ann_macs == pytest.approx(expect_qk)


def _site_shapes(snn: nn.Module, attn: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(kind):
        def record(module, inputs, out):
            shapes.setdefault(kind, tuple(out.shape))

        return record

    hooks = [getattr(attn, f"sfn_{k}").register_forward_hook(hook(k)) for k in ("q", "k")]
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    return shapes


# -- nn.MultiheadAttention ------------------------------------------------------------------------


class MHANet(nn.Module):
    """Embeddings, one ``nn.MultiheadAttention`` (self or cross), a classifier over the tokens."""

    def __init__(self, batch_first: bool, mode: str, mask: str, **mha):
        super().__init__()
        self.batch_first, self.mode, self.mask = batch_first, mode, mask
        self.embed = nn.Linear(8, 16)
        self.memory = nn.Linear(8, mha.get("kdim", 16))
        self.value = nn.Linear(8, mha.get("vdim", 16))
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **mha)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(x)
        k = q if self.mode == "self" else self.memory(x[:, 1:])
        v = self.value(x[:, 1:]) if self.mode == "cross_qkv" else k
        b, lq, lk = x.shape[0], q.shape[1], k.shape[1]
        kpm = attn_mask = None
        if self.mask in ("padding", "both"):
            kpm = torch.zeros(b, lk, dtype=torch.bool)
            kpm[0, -2:] = True
        if self.mask in ("float", "both"):
            attn_mask = torch.randn(lq, lk, generator=torch.Generator().manual_seed(3))
        if self.mask == "causal":
            attn_mask = torch.ones(lq, lk, dtype=torch.bool).triu(1)
        if not self.batch_first:  # keep self-attention inputs one tensor (the wrapper fires it once)
            q = q.transpose(0, 1)
            k = q if self.mode == "self" else k.transpose(0, 1)
            v = v.transpose(0, 1) if self.mode == "cross_qkv" else k
        out, w = self.mha(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True,
                          is_causal=self.mask == "causal")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out).flatten(1), w


MHA_CASES = [
    (True, "self", "none", {}),
    (False, "self", "padding", {}),
    (True, "cross_kv", "float", {}),
    (False, "cross_qkv", "both", {"kdim": 12, "vdim": 10}),
    (True, "self", "causal", {"add_bias_kv": True}),
    (True, "cross_kv", "padding", {"add_zero_attn": True, "bias": False}),
]


def _mha(case) -> tuple[MHANet, torch.Tensor]:
    batch_first, mode, mask, kw = case
    torch.manual_seed(SEED)
    net = _randomize(MHANet(batch_first, mode, mask, **kw))
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(SEED + 2))
    return net, x


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's own, for a bool + float pair
@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: f"bf{int(c[0])}-{c[1]}-{c[2]}-{'-'.join(c[3]) or 'plain'}")
def test_multihead_attention(case):
    net, x = _mha(case)
    exact = sformer.prepare(net, lambda kind, site: nn.Identity()).eval()
    fine = sformer.convert(net, [x], progress=False, **FINE)
    with torch.no_grad():
        (y, w), (z, wz), (f, wf) = net(x), exact(x), fine(x)
    assert torch.allclose(y, z, atol=1e-5) and torch.allclose(w, wz, atol=1e-6)
    assert _rel(f, y) < 1e-2 and (wf - w).abs().max() < 1e-2
    kinds = {kind for _, kind, m in sformer.site_modules(fine) if isinstance(m, SFNode)}
    used = {"self": set(), "cross_kv": {"kv_in"}, "cross_qkv": {"kv_in", "v_in"}}[case[1]]
    assert kinds == {"qkv_in", "q", "k", "v", "attn", "proj_in"} | used


def test_multihead_attention_unbatched_and_training_dropout():
    torch.manual_seed(SEED)
    mha = _randomize(nn.MultiheadAttention(16, 2, dropout=0.0))
    exact = sformer.prepare(nn.Sequential(mha), lambda kind, site: nn.Identity())[0].eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        (y, w), (z, wz) = mha(x, x, x), exact(x, x, x)
    assert y.shape == z.shape == (5, 16) and torch.allclose(y, z, atol=1e-5) and torch.allclose(w, wz, atol=1e-6)


def test_cross_attention_site_not_calibrated_raises_by_name():
    net, x = _mha((True, "self", "none", {}))
    snn = sformer.convert(net, [x], progress=False)
    assert isinstance(snn.mha.sfn_kv_in, sformer.core.UnreachedSite)
    q = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match=r"mha\.sfn_kv_in saw no calibration data"):
        snn.mha(q, q[:, :2].clone(), q[:, :2].clone())


# -- refusals ---------------------------------------------------------------------------------------


def test_levit_pooled_downsample_is_refused_before_running():
    from timm.models.levit import AttentionDownsample

    att = AttentionDownsample(32, 48, key_dim=8, num_heads=2, resolution=4, use_pool=True)
    model = nn.Sequential(nn.Linear(32, 32), att)
    with pytest.raises(TypeError, match=r"1 \(timm\.models\.levit\.AttentionDownsample\): use_pool=True"):
        sformer.convert(model, [torch.randn(2, 16, 32)], progress=False)


def test_unknown_attention_is_refused_by_name():
    class CosineAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            return self.qkv(x)[..., :8]

    model = nn.Sequential(nn.Linear(8, 8), CosineAttention(), nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match=r"1 \(.*CosineAttention\)") as e:
        sformer.prepare(model)
    assert "MultiheadAttention" not in str(e.value).split(". Supported")[0]


def test_subclass_with_its_own_forward_is_refused():
    class GatedMHA(nn.MultiheadAttention):
        def forward(self, query, key, value, **kw):
            out, w = super().forward(query, key, value, **kw)
            return out.sigmoid(), w

    model = nn.Sequential(nn.Linear(8, 8), GatedMHA(8, 2))
    with pytest.raises(TypeError, match=r"1 \(.*GatedMHA\): a subclass with its own forward"):
        sformer.prepare(model)


def test_attention_modules_lists_what_sformer_converts():
    model, _ = _model("cait")
    names = sformer.core.attention_modules(model)
    assert "blocks.0.attn" in names and "blocks_token_only.0.attn" in names


# -- hierarchical and hybrid families (sj_sfn.sformer.variants_more) ------------------------------


def _caformer():
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), token_mixers=[SepConv, SepConv, Attention, Attention],
                      norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=10)


def _timm_model(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _mvitv2():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    # pooled k, v in every block, pooled q at the stage transitions; a class token (kept out of the pooling)
    cfg = MultiScaleVitCfg(depths=(1, 1, 1), embed_dim=16, num_heads=(1, 2, 2), use_cls_token=True)
    return MultiScaleVit(cfg, img_size=(64, 64), num_classes=10)


class SeparableMixerNet(nn.Module):
    """Patch embedding to ``[B, C, P, N]`` (2×2 pixels per patch, 4×4 patches), one MobileViTV2 separable
    self-attention with a residual, mean pool, classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        from timm.models.mobilevit import LinearSelfAttention

        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.GroupNorm(1, 16)
        self.attn = LinearSelfAttention(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # [B, 16, 8, 8]
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c, 4, -1)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean((2, 3)))


def _volo():
    from timm.models.volo import VOLO

    # an outlooker stage (stride-2 outlook attention), three transformer stages, one class-attention block
    return VOLO(img_size=64, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), stem_hidden_dim=8,
                num_classes=10)


#: (builder, image size, attention classes the conversion must wrap); every model is the family's smallest timm
#: architecture shrunk to a few blocks, so that the whole model (conv stems and stages included) converts in < 2 s
MORE_MODELS = {
    "visformer": (_timm_model("visformer_tiny", img_size=32, init_channels=8, embed_dim=48, depth=(1, 1, 1), num_heads=2),
                  32, {"Attention"}),
    "nest": (lambda: timm.models.nest.Nest(img_size=32, patch_size=4, embed_dims=(16, 32, 64), num_heads=(2, 2, 4),
                                           depths=(1, 1, 1), num_classes=10), 32, {"Attention"}),
    "tnt": (_timm_model("tnt_s_patch16_224", img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=2,
                        num_heads_outer=2, num_heads_inner=2), 32, {"Attention"}),
    "caformer": (_caformer, 64, {"Attention"}),
    "efficientformer": (_timm_model("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(8, 16, 32, 64), num_vit=1),
                        224, {"Attention"}),
    "tiny_vit": (_timm_model("tiny_vit_5m_224", embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                             window_sizes=(2, 2, 2, 2)), 64, {"Attention"}),
    "crossvit": (_timm_model("crossvit_tiny_240", img_size=(32, 48), patch_size=(8, 16), embed_dim=(16, 32),
                             depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1)), 48, {"Attention", "CrossAttention"}),
    "pvt_v2": (_timm_model("pvt_v2_b0", embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
               64, {"Attention"}),
    "davit": (_timm_model("davit_tiny", depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 2, 4),
                          window_size=2), 64, {"WindowAttention", "ChannelAttention"}),
    "hiera": (_timm_model("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), 64,
              {"MaskUnitAttention"}),
    "swinv2": (_timm_model("swinv2_tiny_window8_256", img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                           num_heads=(2, 4)), 32, {"WindowAttention"}),
    "mvitv2": (_mvitv2, 64, {"MultiScaleAttention"}),
    "volo": (_volo, 64, {"OutlookAttention", "Attention", "ClassAttention"}),
    "mobilevitv2_attention": (SeparableMixerNet, 32, {"LinearSelfAttention"}),
}


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_more_families_identity_and_fine_resolution(name):
    """Identity sites reproduce the ANN; ``sj_sfn.convert`` at fine resolution (the attention wrappers and the
    module-level sites of the conv stages) is within 1e-2 of it, and every attention of the family is wrapped."""
    import sj_sfn

    build, size, sources = MORE_MODELS[name]
    torch.manual_seed(SEED)
    model = _randomize(build())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED + 2))
    exact = sformer.prepare(model, lambda kind, site: nn.Identity()).eval()
    with torch.no_grad():
        y, z = model(x), exact(x)
    assert y.abs().max() > 0.1, "the test model's output must not be trivially small"
    assert (y - z).abs().max().item() <= 1e-5 * max(1.0, y.abs().max().item()), name
    assert {m.source_type for m in exact.modules() if isinstance(m, sformer.SFormerAttention)} == sources
    assert not sformer.core._unsupported(model)
    fine = sj_sfn.convert(model, [x], progress=False, calibration="quantile", **FINE)
    with torch.no_grad():
        yf = fine(x)
    assert _rel(yf, y) < 1e-2, f"{name}: fine-resolution SNN is {_rel(yf, y):.2e} from the ANN"
    for m in fine.modules():
        if isinstance(m, sformer.SFormerAttention):
            assert all(isinstance(getattr(m, f"sfn_{kind}"), SFNode) for kind in m.SITES), name


@pytest.mark.parametrize("name", list(MORE_MODELS))
def test_more_families_energy_counts_their_products(name):
    """``measure_energy`` pairs the SNN with the ANN and counts every spike product a wrapper names in ``PRODUCTS``."""
    build, size, _ = MORE_MODELS[name]
    torch.manual_seed(SEED)
    model = _randomize(build())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED + 2))
    snn = sformer.convert(model, [x], lam=0.25, max_spikes=32, progress=False)
    rep = measure_energy(snn, [x], ann=model)
    assert 0 < rep.ratio < 2
    rows = {r.name: r for r in rep.per_layer}
    for n, m in snn.named_modules():
        if isinstance(m, sformer.SFormerAttention):
            for product, *_ in m.PRODUCTS:
                row = rows[f"{n}.{product}"]
                assert row.snn_acs > 0 and row.ann_macs > 0, (n, product)


def test_outlook_attention_counts_one_product_by_hand():
    """VOLO's outlook attention: ``attn [H·N, k², k²]`` times ``v [H·N, k², D]``, ``N`` the stride-2 locations."""
    build, size, _ = MORE_MODELS["volo"]
    torch.manual_seed(SEED)
    model = _randomize(build())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED + 2))
    snn = sformer.convert(model, [x], lam=0.25, max_spikes=32, progress=False)
    rows = {r.name: r for r in measure_energy(snn, [x], ann=model).per_layer}
    name, att = next((n, m) for n, m in snn.named_modules() if getattr(m, "source_type", None) == "OutlookAttention")
    assert att.PRODUCTS == (("av", "attn", "v"),) and f"{name}.qk" not in rows
    tokens = size // 8  # VOLO's patch embedding: 8x8 pixels per token
    n, kk, d = (tokens // att.stride) ** 2, att.kernel_size ** 2, att.attn_dim // att.num_heads
    assert rows[f"{name}.av"].ann_macs == pytest.approx(att.num_heads * n * kk * kk * d)


def test_separable_attention_cross_call_is_refused():
    model = _randomize(SeparableMixerNet())
    snn = sformer.prepare(model, lambda kind, site: nn.Identity())
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(NotImplementedError, match="cross-attention call"):
        snn.attn(x, x)


def test_pvt_v2_linear_attention_is_refused_before_running():
    from timm.models.pvt_v2 import Attention

    model = nn.Sequential(nn.Linear(16, 16), Attention(16, num_heads=2, linear_attn=True))
    with pytest.raises(TypeError, match=r"1 \(timm\.models\.pvt_v2\.Attention\): linear_attn=True"):
        sformer.prepare(model)
