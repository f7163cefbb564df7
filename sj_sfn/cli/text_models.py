"""``sj-sfn convert/eval`` on a local Hugging Face model directory and a text file.

    sj-sfn convert ./all-MiniLM-L6-v2 --data sentences.txt --out minilm_snn.pth --eval
    sj-sfn eval minilm_snn.pth --data other_sentences.txt

MODEL is a directory that ``from_pretrained`` reads (``config.json``, weights, tokenizer). Causal
LMs (``*ForCausalLM``, ``*LMHeadModel`` in the config's ``architectures``) load with
``AutoModelForCausalLM`` and are scored by perplexity; every other model loads with ``AutoModel``
and is scored by its mean-pooled sentence embeddings (cosine to the ANN's, Spearman ρ of the
pairwise similarities). ``--data`` is a UTF-8 text file with one text per line (blank lines
skipped), or a directory of ``*.txt`` files. The texts are shuffled with ``--seed``; the first
``--calib-samples`` calibrate, the next ``--test-samples`` evaluate.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import time
from typing import Any

import torch
from torch import nn

from ..utils import UserError

__all__ = ["is_hf_directory", "read_texts", "split_texts", "run_convert", "run_eval", "text_metrics"]

CALIB_TEXTS = 64
TEST_TEXTS = 256


def is_hf_directory(spec: str) -> bool:
    """Whether ``spec`` names a local Hugging Face model directory (it holds ``config.json``)."""
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def _hf():
    try:
        from ..hf import pretrained
    except ImportError as e:
        raise UserError('a Hugging Face model directory needs transformers: pip install "sj-sfn[hf]"') from e
    return pretrained


def read_texts(path: str) -> list[str]:
    """The non-blank lines of a text file, or of every ``*.txt`` file under a directory (sorted)."""
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)) if os.path.isdir(path) else [path]
    if not os.path.exists(path):
        raise UserError(f"--data {path}: no such file or directory (a Hugging Face model takes a text file, one text per line)")
    texts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                texts += [line.strip() for line in fh if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"--data {f} is not UTF-8 text ({e.reason}); a Hugging Face model takes a text file") from e
    if not texts:
        raise UserError(f"--data {path} holds no text (one text per line, blank lines are skipped)")
    return texts


def split_texts(texts: list[str], calib: int | None, test: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed``; the first ``calib`` texts calibrate, the next ``test`` evaluate (disjoint; maybe none)."""
    order = texts[:]
    random.Random(seed).shuffle(order)
    n_cal = min(calib or CALIB_TEXTS, len(order))
    return order[:n_cal], order[n_cal:][:test or TEST_TEXTS]


def _check_test_texts(test: list[str], task: str, n_calib: int, n_texts: int) -> None:
    need = 3 if task == "encoder" else 1
    if len(test) < need:
        raise UserError(f"evaluation needs at least {need} texts besides the {n_calib} that calibrate; --data holds "
                        f"{n_texts}: give more texts or a lower --calib-samples")


def _to(batches: list[dict[str, torch.Tensor]], device: str | None) -> list[dict[str, torch.Tensor]]:
    return batches if device is None else [{k: v.to(device) for k, v in b.items()} for b in batches]


def text_metrics(snn: nn.Module, ann: nn.Module | None, batches: list[dict[str, torch.Tensor]], task: str) -> dict[str, Any]:
    """Causal LMs: perplexity of the SNN (and the ANN); encoders: sentence-embedding fidelity to the ANN. Plus energy."""
    from ..energy import measure_energy
    from ..hf.metrics import embedding_fidelity, perplexity, sentence_embeddings

    out: dict[str, Any] = {"texts": sum(len(b["input_ids"]) for b in batches)}
    t0 = time.perf_counter()
    if task == "causal-lm":
        out["snn_perplexity"] = perplexity(snn, batches)
        out["snn_seconds"] = time.perf_counter() - t0
        if ann is not None:
            out["ann_perplexity"] = perplexity(ann, batches)
    else:
        emb = sentence_embeddings(snn, batches)
        out["snn_seconds"] = time.perf_counter() - t0
        if ann is not None:
            if len(emb) < 3:
                raise UserError("embedding fidelity needs at least 3 test texts")
            out.update(embedding_fidelity(sentence_embeddings(ann, batches), emb))
    rep = measure_energy(snn, batches, ann=ann)
    out.update(energy_ratio=rep.ratio, event_ratio=rep.event_ratio, sops_per_sample=rep.sops, snn_macs_per_sample=rep.macs,
               ann_macs_per_sample=rep.ann_macs)
    return out


def _prepare(args: argparse.Namespace, path: str) -> tuple[nn.Module, Any, str, list[str], list[str]]:
    ann, tok, task = _hf().load_hf_model(path)
    texts = read_texts(args.data)
    calib, test = split_texts(texts, args.calib_samples, args.test_samples, args.seed)
    return ann, tok, task, calib, test


def run_convert(args: argparse.Namespace, common_mod: Any) -> int:
    """``sj-sfn convert HF_DIR --data TEXT --out SNN``: calibrate on token batches, save, optionally evaluate."""
    from ..conversion import convert
    from ..io import save_converted
    from ..report import report
    from ..tune import current_lams
    from ..version import __version__

    if args.checkpoint:
        raise UserError("--checkpoint is for timm/torchvision/zoo models: a Hugging Face directory carries its own weights")
    if args.tune:
        raise UserError("--tune takes an image data set; for a language model use sj_sfn.tune.tune_lambda with a metric")
    path = os.path.abspath(args.model)
    ann, tok, task, calib, test = _prepare(args, path)
    if args.eval:  # before any work
        _check_test_texts(test, task, len(calib), len(calib) + len(test))
    device = args.device
    if device:
        ann.to(device)
    cal_b = _to(_hf().token_batches(tok, calib, args.batch_size, args.max_length), device)
    common_mod.log(args, f"{task} {type(ann).__name__} from {path}; {len(calib)} calibration texts, {len(test)} test texts")
    ck = {"lam": args.lam, "max_spikes": args.max_spikes, "offset": args.offset}
    ck = {k: v for k, v in ck.items() if v is not None}
    if args.lam is None:
        ck["energy_budget"] = args.energy_budget
        if args.level_sets:
            ck["level_sets"] = common_mod.level_sets(args)
    else:
        ck["p"] = args.p
    t0 = time.perf_counter()
    try:
        snn = convert(ann, cal_b, device=device, progress=not args.quiet, **ck, **common_mod.reconstruct_kwargs(args))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"cannot convert {path}: {str(e).splitlines()[0]}") from e
    t_conv = time.perf_counter() - t0
    rep = report(snn, ann, cal_b[:1], num_batches=1)
    common_mod.log(args, str(rep))
    meta = {"model": path, "hf_task": task, "data": os.path.abspath(args.data), "convert_kwargs": ck,
            "max_length": args.max_length, "calib_samples": len(calib), "seed": args.seed, "lams": current_lams(snn), "version": __version__,
            "checkpoint": None, "tune": None}
    save_converted(args.out, snn.cpu() if device else snn, meta)
    summary: dict[str, Any] = {"out": os.path.abspath(args.out), "model": path, "task": task, "convert_seconds": t_conv,
                               "sites": len(meta["lams"]), "conversion_path": rep.path, "report": rep.to_dict()}
    alloc = getattr(snn, "sfn_allocation", None)
    if alloc is not None:
        summary.update(energy_budget=args.energy_budget, predicted_energy_ratio=alloc.predicted_ratio)
    if args.eval:
        if device:
            snn.to(device)
        summary.update(text_metrics(snn, ann, _to(_hf().token_batches(tok, test, args.batch_size, args.max_length), device), task))
    common_mod.write_json_main(args.json, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=None if args.quiet else 2))
    return 0


def run_eval(args: argparse.Namespace, snn: nn.Module, meta: dict[str, Any], common_mod: Any) -> int:
    """``sj-sfn eval SNN`` of a converted Hugging Face model on ``--data`` (default: the text it was converted on)."""
    ann, tok, task = _hf().load_hf_model(meta["model"])
    if args.no_ann:
        ann = None
    if args.data:  # every text of the given file (up to --test-samples)
        data, test = args.data, read_texts(args.data)[:args.test_samples or TEST_TEXTS]
    else:  # the test split of the conversion's text, disjoint from its calibration texts
        data = meta["data"]
        texts = read_texts(data)
        _, test = split_texts(texts, meta.get("calib_samples"), args.test_samples, meta.get("seed", 0))
        _check_test_texts(test, task, meta.get("calib_samples") or CALIB_TEXTS, len(texts))
    device = args.device
    if device:
        snn.to(device)
        if ann is not None:
            ann.to(device)
    out = {"snn": os.path.abspath(args.snn), "model": meta["model"], "task": task, "data": data}
    out.update(text_metrics(snn, ann, _to(_hf().token_batches(tok, test, args.batch_size, meta.get("max_length", 128)), device), task))
    common_mod.write_json_main(args.json, out)
    print(json.dumps(out, indent=None if args.quiet else 2))
    return 0
