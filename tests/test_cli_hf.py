"""``sj-sfn convert/eval`` on local Hugging Face model directories (tiny random-weight models saved here)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sj_sfn.cli.main import main  # noqa: E402
from sj_sfn.hf.metrics import embedding_fidelity, perplexity, sentence_embeddings, spearman  # noqa: E402
from sj_sfn.hf.pretrained import load_hf_model, token_batches  # noqa: E402
from sj_sfn.io import load_converted  # noqa: E402

WORDS = ("the cat dog sat ran on a mat log red blue big small fast slow house tree river sun moon light dark "
         "old new good bad cold warm day night").split()


def _tokenizer(folder) -> transformers.PreTrainedTokenizerBase:
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)) + " .")
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A BERT encoder and a GPT-2 causal LM, random weights, each saved with a tokenizer; and a text file."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    enc = root / "bert"
    enc.mkdir()
    tok = _tokenizer(enc)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(enc)
    tok.save_pretrained(enc)
    dec = root / "gpt2"
    dec.mkdir()
    tok = _tokenizer(dec)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(dec)
    tok.save_pretrained(dec)
    text = root / "texts.txt"
    text.write_text("\n".join(_texts(40, 1)) + "\n\n")
    return enc, dec, text


def test_load_hf_model_tells_encoders_from_causal_lms(hf_dirs):
    enc, dec, _ = hf_dirs
    assert load_hf_model(str(enc))[2] == "encoder"
    model, tok, task = load_hf_model(str(dec))
    assert task == "causal-lm" and isinstance(model, transformers.GPT2LMHeadModel) and tok.pad_token is not None


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_convert_then_eval_a_hf_directory(hf_dirs, tmp_path, capsys, arch):
    """The saved SNN reloads to the same outputs, and eval reports the fidelity measured here independently."""
    enc, dec, text = hf_dirs
    folder = enc if arch == "bert" else dec
    out = tmp_path / "snn.pth"
    calibration = [] if arch == "bert" else ["--lam", "0.05"]  # the energy-budget default, and the paper's quantile
    rc = main(["convert", str(folder), "--data", str(text), "--out", str(out), "--calib-samples", "16", *calibration,
               "--batch-size", "8", "--max-length", "24", "--eval", "--quiet", "--json", str(tmp_path / "c.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["task"] == ("encoder" if arch == "bert" else "causal-lm") and summary["texts"] == 24
    assert summary["energy_ratio"] > 0
    if arch == "bert":  # the energy budget 0.35 (the allocation's prediction; measured 0.35 on this model)
        assert summary["energy_ratio"] < 0.5
    snn, meta = load_converted(out)
    ann, tok, task = load_hf_model(str(folder))
    batches = token_batches(tok, _texts(6, 7), 3, 24)
    if task == "encoder":
        fid = embedding_fidelity(sentence_embeddings(ann, batches), sentence_embeddings(snn, batches))
        assert fid["cos_mean"] > 0.9  # T=1 at the default energy budget on a random-weight model: a loose bound
        assert 0.5 < summary["cos_mean"] <= 1.0 + 1e-6
    else:
        p_ann, p_snn = perplexity(ann, batches), perplexity(snn, batches)
        assert abs(p_snn / p_ann - 1) < 0.05
        assert abs(summary["snn_perplexity"] / summary["ann_perplexity"] - 1) < 0.05
    capsys.readouterr()
    rc = main(["eval", str(out), "--quiet", "--json", str(tmp_path / "e.json"), "--batch-size", "8"])
    assert rc == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    key = "cos_mean" if arch == "bert" else "snn_perplexity"
    assert ev[key] == pytest.approx(summary[key], rel=1e-5)  # the same test split, the same reloaded network


def test_hf_directory_errors_are_one_line(hf_dirs, tmp_path, capsys):
    enc, _, text = hf_dirs
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["convert", str(enc), "--data", str(empty), "--out", str(tmp_path / "a.pth")]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert main(["convert", str(enc), "--data", str(text), "--out", str(tmp_path / "a.pth"), "--checkpoint", str(text)]) == 2
    assert "carries its own weights" in capsys.readouterr().err
    assert main(["convert", str(enc), "--data", str(text), "--out", str(tmp_path / "a.pth"), "--eval",
                 "--calib-samples", "39"]) == 2  # 40 texts: one left to evaluate an encoder on
    assert "evaluation needs at least 3 texts besides the 39" in capsys.readouterr().err


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 6, (200,), generator=g).double()
    b = a + torch.randn(200, generator=g, dtype=torch.float64)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="same length"):
        spearman(a, b[:10])


def test_perplexity_masks_padding():
    """Padding appended to a sequence changes nothing: only next tokens under the attention mask are scored."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 20, (1, 10))
    plain = perplexity(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    assert perplexity(model, [{"input_ids": padded, "attention_mask": mask}]) == pytest.approx(plain, rel=1e-5)
