"""Local Hugging Face model directories: load one with its tokenizer, make token batches, rebuild a saved SNN.

    model, tok, task = load_hf_model("path/to/all-MiniLM-L6-v2")   # task: 'encoder' or 'causal-lm'
    batches = token_batches(tok, texts, batch_size=32, max_length=128)
    snn = sj_sfn.convert(model, batches)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..utils import UserError, add_missing_biases

__all__ = ["load_hf_model", "token_batches", "load_converted_hf"]


def load_hf_model(path: str) -> tuple[nn.Module, Any, str]:
    """``(model in eval mode, tokenizer, task)`` from a local directory; ``task`` is ``'causal-lm'`` or ``'encoder'``."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        archs = list(getattr(config, "architectures", None) or [])
        task = "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
        auto = tf.AutoModelForCausalLM if task == "causal-lm" else tf.AutoModel
        model = auto.from_pretrained(path, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the Hugging Face model in {path}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"the tokenizer in {path} has neither a padding nor an end-of-sequence token to pad batches with")
        tok.pad_token = tok.eos_token
    return model.eval(), tok, task


def token_batches(tok: Any, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Padded, truncated token batches (dicts of ``input_ids``, ``attention_mask``, ...)."""
    return [dict(tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def load_converted_hf(obj: dict[str, Any]) -> nn.Module:
    """Rebuild a converted Hugging Face model from its directory and the saved ``state_dict`` (see :func:`sj_sfn.io.load_converted`)."""
    import warnings

    from ..conversion import convert

    ann, tok, _ = load_hf_model(obj["model"])
    ck = {k: v for k, v in obj["convert_kwargs"].items() if k not in ("energy_budget", "level_sets", "reconstruct")}
    ck.setdefault("lam", 1.0)
    batch = token_batches(tok, ["a short text to build the network", "another one"], 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = convert(ann, batch, progress=False, calibration="quantile", reconstruct=0, **ck)
    add_missing_biases(snn, obj["state_dict"])
    snn.load_state_dict(obj["state_dict"])
    return snn.eval()


