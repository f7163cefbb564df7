"""Hugging Face ``transformers`` models at T=1: BERT-family encoders, Llama-family decoders, GPT-2.

    from transformers import AutoModel
    import sj_sfn
    snn = sj_sfn.convert(AutoModel.from_pretrained(path), calib_loader)   # loader: dicts of input_ids, attention_mask
    out = snn(**batch)                                                     # the ANN's output type
    snn.generate(input_ids, max_new_tokens=20)                             # causal LMs, with the KV cache

Sites follow SFormer's kinds (``sj_sfn.sformer.sites(snn)`` lists them); see docs/language_models.md.
Needs the ``hf`` extra: ``pip install "sj-sfn[hf]"``.
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError('sj_sfn.hf needs Hugging Face transformers: pip install "sj-sfn[hf]"') from e

from .core import SUPPORTED_MODEL_TYPES, batch_kwargs, convert, is_converted, is_hf_model, prepare, run_batches
from .sites import ATTN_IMPLEMENTATION, SpikingAttention, token_mask

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_MODEL_TYPES",
    "SpikingAttention",
    "batch_kwargs",
    "convert",
    "is_converted",
    "is_hf_model",
    "prepare",
    "run_batches",
    "token_mask",
]
