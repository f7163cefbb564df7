"""Hugging Face transformers models at T=1 (sj_sfn.hf): tiny random-weight configs, no downloads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import sj_sfn  # noqa: E402
from sj_sfn import hf, sformer  # noqa: E402
from sj_sfn.energy import measure_energy  # noqa: E402

VOCAB = 96
FINE = {"lam": 1 / 4096, "max_spikes": 16384}  # full scale 4θ, step θ/4096
# fine-resolution bound: max |SNN - ANN| / max |ANN| over the outputs (measured at most 1.9e-3 over 3 seeds of each config)
FINE_REL_ERR = 1e-2


def _bert(cls_name: str = "BertModel", model_type: str = "bert") -> nn.Module:
    cfg_cls = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=1 if model_type == "roberta" else 0)
    return getattr(transformers, cls_name)(cfg)


def _decoder(name: str) -> nn.Module:
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0}
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, **common))
    if name == "qwen2":  # grouped-query attention: 4 query heads share 2 key/value heads
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **common))
    if name == "mistral":  # sliding-window attention shorter than the test sequences
        return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=6, **common))
    if name == "gpt2":  # transformers' Conv1D weight layers
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)
        return transformers.GPT2LMHeadModel(cfg)
    raise ValueError(name)


ARCHS = {
    "bert": lambda: _bert("BertModel"),
    "bert-cls": lambda: _bert("BertForSequenceClassification"),
    "roberta": lambda: _bert("RobertaModel", "roberta"),
    "llama": lambda: _decoder("llama"),
    "qwen2": lambda: _decoder("qwen2"),
    "qwen3": lambda: _decoder("qwen3"),
    "mistral": lambda: _decoder("mistral"),
    "gpt2": lambda: _decoder("gpt2"),
}
DECODERS = ("llama", "qwen2", "mistral", "gpt2")


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch]().eval()


def _batches(seed: int, n: int = 2, batch: int = 4, length: int = 12, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches with right padding (the last rows are shorter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(1, batch):
            mask[row, length - 2 * row:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask})
    return out


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None and a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fine_resolution_matches_ann(arch: str) -> None:
    model = _model(arch)
    calib, test = _batches(1), _batches(2, n=1)[0]
    snn = sj_sfn.convert(model, calib, progress=False, **FINE)
    assert type(snn) is type(model) and snn.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert model.config._attn_implementation != hf.ATTN_IMPLEMENTATION  # the caller's model is untouched
    with torch.no_grad():
        ref, out = model(**test), snn(**test)
    assert type(out) is type(ref)
    err = _rel_err(_main_output(out), _main_output(ref), test["attention_mask"])
    assert err < FINE_REL_ERR, f"{arch}: relative error {err:.2e}"
    kinds = {k for _, k, _ in sformer.site_modules(snn)}
    assert {"qkv_in", "q", "k", "v", "attn", "proj_in", "fc1_in", "fc2_in"} <= kinds
    # coarse default resolution: it runs, and differs from the ANN (the sites do quantise)
    coarse = hf.convert(model, calib, progress=False)
    with torch.no_grad():
        err_coarse = _rel_err(_main_output(coarse(**test)), _main_output(ref), test["attention_mask"])
    assert err_coarse > err


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_identity_sites_are_the_ann(arch: str) -> None:
    """prepare() with identity sites runs the spiking attention path and gives the ANN's outputs."""
    model = _model(arch)
    exact = hf.prepare(model, lambda kind, name: nn.Identity())
    batch = _batches(3, n=1)[0]
    with torch.no_grad():
        assert torch.allclose(_main_output(exact(**batch)), _main_output(model(**batch)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_parity(arch: str) -> None:
    model = _model(arch)
    snn = sj_sfn.convert(model, _batches(4), progress=False, **FINE)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(prompt, **kw)
    assert torch.equal(snn.generate(prompt, **kw), ref)
    # at the default (coarse) resolution the KV cache changes nothing: cached k/v fire as in a full forward
    coarse = hf.convert(model, _batches(4), progress=False)
    assert torch.equal(coarse.generate(prompt, use_cache=True, **kw), coarse.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("arch", ["bert", "qwen2", "gpt2"])
@pytest.mark.filterwarnings("ignore:site .*quantile is 0")
def test_state_dict_round_trip(arch: str) -> None:
    model = _model(arch)
    snn = sj_sfn.convert(model, _batches(6), progress=False, lam=0.3, max_spikes=8, per_channel=True)
    fresh = hf.prepare(model)  # uncalibrated SFN sites
    fresh.load_state_dict(snn.state_dict())
    batch = _batches(7, n=1)[0]
    with torch.no_grad():
        assert torch.equal(_main_output(fresh(**batch)), _main_output(snn(**batch)))
    names = {n for n, _ in sj_sfn.sfn_nodes(snn)}
    assert names == {n for n, _ in sj_sfn.sfn_nodes(fresh)}
    # the ANN's own keys are unchanged: the weights load back into the original class
    ann_keys = set(model.state_dict())
    assert ann_keys <= set(snn.state_dict())


def _thresholds(snn: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.theta_pos.clone() for n, m in sj_sfn.sfn_nodes(snn)}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_padding_excluded_from_calibration(arch: str) -> None:
    model = _model(arch)
    batches = _batches(8, n=1)
    other = [{"input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 5), "attention_mask": b["attention_mask"]}
             for b in batches]
    a = _thresholds(hf.convert(model, batches, progress=False))
    b = _thresholds(hf.convert(model, other, progress=False))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"padding changed the threshold of {name}"


def test_padding_excluded_reference_quantile() -> None:
    """BERT's first qkv_in site sees the embeddings' output: θ± are its quantiles over the real tokens."""
    model = _model("bert")
    batch = _batches(9, n=1)[0]
    snn = hf.convert(model, [batch], progress=False, p=0.99)
    with torch.no_grad():
        emb = model.embeddings(input_ids=batch["input_ids"])
    real = emb[batch["attention_mask"].bool()].flatten()
    site = snn.encoder.layer[0].attention.self.sfn_qkv_in
    assert torch.allclose(site.theta_pos, torch.quantile(real, 0.99), rtol=1e-5)
    assert torch.allclose(site.theta_neg, -torch.quantile(real, 0.01), rtol=1e-5)
    assert not torch.allclose(site.theta_pos, torch.quantile(emb.flatten(), 0.99), rtol=1e-3)  # padding would change it


def _linear_macs(model: nn.Module, tokens: int) -> float:
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * tokens
        elif type(m).__name__ == "Conv1D":
            total += m.weight.numel() * tokens
    return total


@pytest.mark.parametrize("arch", ["bert", "qwen2", "gpt2"])
def test_energy_with_dict_batches(arch: str) -> None:
    model = _model(arch)
    snn = hf.convert(model, _batches(10), progress=False)
    batches = _batches(11, n=1)
    rep = measure_energy(snn, batches, ann=model)
    b, length = batches[0]["input_ids"].shape
    heads, layers = 4, 2
    head_dim = 8
    products = 2 * layers * b * heads * length * length * head_dim  # q·kᵀ and P·v, every position
    lm_macs = _linear_macs(model, b * length)
    if arch == "bert":  # the pooler reads one token per sequence
        lm_macs -= 32 * 32 * (b * length - b)
    assert rep.ann_macs * rep.samples == pytest.approx(lm_macs + products, rel=1e-9)
    assert 0.0 < rep.ratio < 1.0
    names = [r.name for r in rep.per_layer]
    assert sum(n.endswith(".qk") for n in names) == layers and sum(n.endswith(".av") for n in names) == layers
    spiking = [r for r in rep.per_layer if r.kind != "matmul"]
    assert spiking and all(r.spiking_input for r in spiking)  # every weight layer reads spikes


def test_sformer_tools_work_on_hf_models() -> None:
    model = _model("llama")
    snn = sj_sfn.convert(model, _batches(12), progress=False, lam=0.2)
    sites = sformer.sites(snn)
    assert {s.kind for s in sites} == {"qkv_in", "q", "k", "v", "attn", "proj_in", "fc1_in", "fc2_in", "head_in"}
    assert all(abs(s.lam - 0.2) < 1e-7 for s in sites)
    assert sformer.set_lambda(snn, 0.5, kinds="attn") == 2
    assert {s.lam for s in sformer.sites(snn) if s.kind == "attn"} == {0.5}


def test_unsupported_architecture_and_attention() -> None:
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    with pytest.raises(TypeError, match="not supported by sj_sfn.hf"):
        sj_sfn.convert(transformers.DistilBertModel(cfg), _batches(0), progress=False)
    model = _model("llama")
    model.config._attn_implementation_internal = "paged|eager"
    with pytest.raises(ValueError, match="attention implementation 'paged\\|eager'"):
        hf.prepare(model)
    with pytest.raises(TypeError, match="PreTrainedModels"):
        hf.prepare(nn.Linear(2, 2))
    snn = hf.prepare(_model("llama"))
    with pytest.raises(ValueError, match="already has SFN sites"):
        hf.prepare(snn)
    with pytest.raises(TypeError, match="mappings"):
        sj_sfn.convert(_model("bert"), [(torch.zeros(2, 3, dtype=torch.long),)], progress=False)


@pytest.mark.parametrize("arch", ["bert", "qwen2", "mistral", "gpt2"])
def test_attention_in_pieces_equals_the_whole(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference runs the attention products in (batch, head) pieces (sformer.ATTENTION_CHUNK scores each): bit for bit
    the output of the whole, padding and causal masks, GQA and sliding windows included; counts and
    output_attentions keep the whole."""
    from sj_sfn.sformer import modules as sm

    model = _model(arch)
    snn = sj_sfn.convert(model, _batches(7), progress=False, reconstruct=0)
    batch = _batches(8, n=1, batch=3, length=10)[0]
    with torch.no_grad():
        whole = _main_output(snn(**batch))
        monkeypatch.setattr(sm, "ATTENTION_CHUNK", 7)  # one (batch, head) matrix of 100 scores per piece
        calls = []
        real = sm.attention_chunks
        monkeypatch.setattr(hf.sites, "attention_chunks", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
        pieces = _main_output(snn(**batch))
        assert calls and all(c is not None and len(c) > 1 for c in calls), "the attention did not run in pieces"
        assert torch.equal(pieces, whole)
        out = snn(**batch, output_attentions=True)  # the probabilities are asked for: one piece
        assert torch.equal(_main_output(out), whole)
        assert out.attentions is not None and all(a is not None for a in out.attentions)
    report = measure_energy(snn, [batch], progress=False)  # counts: one piece
    monkeypatch.setattr(sm, "ATTENTION_CHUNK", 1 << 30)
    assert measure_energy(snn, [batch], progress=False).ratio == report.ratio


def _spiking_attentions(snn: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(transformers attention module, its SpikingAttention child) pairs."""
    return [(m, m.spiking_attention) for m in snn.modules() if isinstance(getattr(m, "spiking_attention", None), hf.SpikingAttention)]


@pytest.mark.parametrize("arch", ["bert", "qwen2", "gpt2"])
def test_attention_probabilities_only_when_read(arch: str) -> None:
    """The attention returns its probabilities only when someone may read them (output_attentions, a forward hook on
    the attention module); otherwise None, as SDPA does, so that a decoder layer's ``out, _ = self_attn(...)`` does not
    keep B·H·L·S values alive through its MLP. The output is the same either way."""
    snn = sj_sfn.convert(_model(arch), _batches(7), progress=False, reconstruct=0)
    batch = _batches(8, n=1, batch=3, length=10)[0]
    pairs = _spiking_attentions(snn)
    assert len(pairs) == 2
    returned: list = []
    for _, child in pairs:
        child.register_forward_hook(lambda m, a, out: returned.append(out[1]))
    with torch.no_grad():
        plain = _main_output(snn(**batch))
        assert len(returned) == 2 and all(p is None for p in returned)
        returned.clear()
        read: list = []
        handle = pairs[0][0].register_forward_hook(lambda m, a, out: read.append(out[1]))
        hooked = _main_output(snn(**batch))
        handle.remove()
        assert read and read[0] is not None and read[0].shape[-2:] == (10, 10)
        assert returned[0] is not None and returned[1] is None  # only the hooked layer keeps them
        assert torch.equal(hooked, plain)
        returned.clear()
        out = snn(**batch, output_attentions=True)
        assert all(a is not None for a in out.attentions) and all(p is not None for p in returned)
        assert torch.equal(_main_output(out), plain)
        returned.clear()
        _main_output(snn(**batch))  # transformers' capturing hooks, installed by the call above, stay quiet now
        assert all(p is None for p in returned)


@pytest.mark.parametrize("arch", ["bert", "qwen2", "mistral", "gpt2"])
def test_boolean_mask_gives_the_eager_masks_output(arch: str) -> None:
    """The boolean mask the spiking attention is registered with gives the same output, bit for bit, as transformers'
    eager additive mask (padding, causal and sliding-window masks; a quarter of its memory)."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    snn = sj_sfn.convert(_model(arch), _batches(7), progress=False, reconstruct=0)
    padded = _batches(9, n=1, batch=4, length=12)[0]
    full = {"input_ids": padded["input_ids"][:1], "attention_mask": torch.ones_like(padded["attention_mask"][:1])}
    with torch.no_grad():
        boolean = [_main_output(snn(**b)) for b in (padded, full)]
        try:
            AttentionMaskInterface.register(hf.sites.ATTN_IMPLEMENTATION, eager_mask)
            additive = [_main_output(snn(**b)) for b in (padded, full)]
        finally:
            hf.sites.register_attention()
    assert all(torch.equal(a, b) for a, b in zip(boolean, additive))


def test_spiking_attention_checks_its_head_counts() -> None:
    """Query heads must come in whole groups per key/value head; the counts are kept for the energy count."""
    attn = hf.sites.SpikingAttention(lambda kind: nn.Identity())
    q, kv = torch.randn(1, 6, 4, 8), torch.randn(1, 2, 4, 8)
    out, _ = attn(q, kv, kv, None)
    assert out.shape == (1, 4, 6, 8) and (attn.num_heads, attn.num_kv_heads) == (6, 2)
    with pytest.raises(ValueError, match="6 query heads cannot share 4"):
        attn(q, torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8), None)
