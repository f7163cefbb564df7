#!/usr/bin/env python
"""sj-sfn at T=1 against SpikingJelly's IF conversion at the T it needs to match the ANN: accuracy and wall time.

The same trained ANN is converted twice:

* ``sj_sfn.convert(ann, calib)`` (defaults: energy budget 0.35, N = 32), run for ONE step;
* SpikingJelly's ``ann2snn.Converter(RateCodingRecipe(calib, mode='99.9%'))`` (IF neurons), run for
  ``--max-steps`` steps (the input presented at every step, the prediction the arg-max of the
  outputs summed over the first ``T``); the T it needs is the first power of two whose accuracy
  comes within ``--tolerance`` points of the ANN's.

Wall time is the time to classify the test images (batches of ``--batch``, ``no_grad``, after
``functional.reset_net`` per batch), one thread by default: for the ANN and sj-sfn the fastest of
``--repeats`` runs, for the IF network the time of the first ``T`` steps of one run. The speed-up
is IF time / sj-sfn time. When IF never comes within the tolerance, the table gives
``> max_steps`` and the speed-up at ``max_steps`` as a lower bound.

Models: the 3-conv digits CNN (scikit-learn's handwritten digits, trained in seconds) and the
Fashion-MNIST small ResNet of ``bench/accuracy_vs_t.py`` (needs ``dataset-fashion-mnist``; trained in
minutes, cached under ``.cache/bench``). SpikingJelly's rate-coding recipe converts ReLU networks only.

    python bench/end_to_end.py --out runs/end_to_end          # ~6 min on one thread
    python bench/end_to_end.py --models digits --quiet
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings

import torch
from accuracy_vs_t import train_or_load  # bench/accuracy_vs_t.py: the cached Fashion-MNIST / digits models
from torch.utils.data import DataLoader, Subset

MODELS = ("digits", "fashion-mnist")


def _batches(dataset, limit: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(Subset(dataset, range(min(limit, len(dataset)))), batch_size=batch)
    return [(x, y) for x, y in loader]


@torch.no_grad()
def run_steps(model: torch.nn.Module, batches, steps: int, marks: set[int]) -> dict[int, tuple[float, float]]:
    """``{T: (accuracy %, seconds)}`` for every ``T`` in ``marks``: the arg-max of the outputs summed over the first
    ``T`` steps, and the wall time of those ``T`` steps over all batches (a reset before each batch)."""
    from spikingjelly.activation_based import functional

    correct = {t: 0 for t in marks}
    seconds = {t: 0.0 for t in marks}
    total = 0
    for x, y in batches:
        functional.reset_net(model)
        acc = None
        t0 = time.perf_counter()
        for t in range(1, steps + 1):
            out = model(x)
            acc = out if acc is None else acc + out
            if t in marks:
                seconds[t] += time.perf_counter() - t0
                t_pause = time.perf_counter()
                correct[t] += int((acc.argmax(-1) == y).sum())
                t0 += time.perf_counter() - t_pause  # the bookkeeping is not the network's time
        total += len(y)
    functional.reset_net(model)
    return {t: (100.0 * correct[t] / total, seconds[t]) for t in marks}


def measure(name: str, args, log) -> dict:
    from spikingjelly.activation_based.ann2snn import Converter
    from spikingjelly.activation_based.ann2snn.recipes.rate_coding import RateCodingRecipe

    import sj_sfn
    from sj_sfn.data import make_splits

    dataset = "digits" if name == "digits" else "fashion-mnist"
    splits = make_splits(dataset, seed=0, train_limit=None if dataset == "digits" else 12000)
    cfg = argparse.Namespace(dataset=dataset, cache=args.cache, epochs=12 if dataset == "digits" else 4, seed=0, train_limit=12000)
    with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
        ann = train_or_load(cfg, splits)
    calib = [b for _, b in zip(range(4), splits.loader("train", 128, shuffle=True, seed=1))]
    test = _batches(splits.test, args.images, args.batch)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        snn = sj_sfn.convert(ann, calib, progress=False)
        if_snn = Converter(RateCodingRecipe(calib, mode="99.9%")).convert(ann).eval()
    for model in (ann, snn, if_snn):  # warm-up: first calls build kernels and caches
        run_steps(model, test[:1], 1, {1})
    ann_runs = [run_steps(ann, test, 1, {1})[1] for _ in range(args.repeats)]  # short runs: the fastest of a few
    snn_runs = [run_steps(snn, test, 1, {1})[1] for _ in range(args.repeats)]
    ann_acc, ann_s = ann_runs[0][0], min(s for _, s in ann_runs)
    snn_acc, snn_s = snn_runs[0][0], min(s for _, s in snn_runs)
    log(f"{name}: ANN {ann_acc:.2f}% in {ann_s:.2f} s; sj-sfn T=1 {snn_acc:.2f}% in {snn_s:.2f} s")
    marks = {1 << i for i in range(args.max_steps.bit_length()) if 1 << i <= args.max_steps}
    if_curve = run_steps(if_snn, test, max(marks), marks)  # one run: the time at T is that of its first T steps
    for t, (a, s) in sorted(if_curve.items()):
        log(f"  IF T={t}: {a:.2f}% in {s:.2f} s")
    matched_at = [t for t, (a, _) in sorted(if_curve.items()) if a >= ann_acc - args.tolerance]
    t_if = matched_at[0] if matched_at else max(marks)
    matched = bool(matched_at)
    return {
        "model": name, "images": sum(len(y) for _, y in test), "batch": args.batch, "threads": torch.get_num_threads(),
        "ann_accuracy": ann_acc, "ann_seconds": ann_s, "sfn_accuracy": snn_acc, "sfn_seconds": snn_s,
        "if_curve": {str(t): {"accuracy": a, "seconds": s} for t, (a, s) in sorted(if_curve.items())},
        "if_steps": t_if, "if_matched": matched, "if_accuracy": if_curve[t_if][0], "if_seconds": if_curve[t_if][1],
        "speedup": if_curve[t_if][1] / snn_s, "tolerance": args.tolerance,
    }


def table(rows: list[dict]) -> str:
    head = "| model | images | ANN % | sj-sfn T=1 % | sj-sfn s | IF T needed | IF % | IF s | speed-up |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        t = str(r["if_steps"]) if r["if_matched"] else f"> {r['if_steps']}"
        x = f"{r['speedup']:.0f}×" if r["if_matched"] else f"> {r['speedup']:.0f}×"
        lines.append(f"| {r['model']} | {r['images']} | {r['ann_accuracy']:.2f} | {r['sfn_accuracy']:.2f} | {r['sfn_seconds']:.3f} | "
                     f"{t} | {r['if_accuracy']:.2f} | {r['if_seconds']:.3f} | {x} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--images", type=int, default=2048, help="test images (the first n of the test split)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=256, help="the longest IF run")
    ap.add_argument("--tolerance", type=float, default=0.5, help="IF matches the ANN within this many points")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the ANN and of sj-sfn (the fastest counts)")
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--out", default="runs/end_to_end")
    ap.add_argument("--quiet", action="store_true", help="only the table")
    args = ap.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.max_steps < 1 or args.threads < 1 or args.repeats < 1 or not args.tolerance >= 0:
        ap.error("--images, --batch, --max-steps, --threads and --repeats must be >= 1, --tolerance >= 0")
    torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows, failed = [], False
    for name in args.models:
        try:
            rows.append(measure(name, args, log))
        except (FileNotFoundError, RuntimeError, ValueError) as e:  # e.g. Fashion-MNIST not installed: keep the other rows
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            failed = True
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "end_to_end.json")
    with open(path, "w") as f:
        json.dump({"command": " ".join(sys.argv), "torch": torch.__version__, "rows": rows}, f, indent=1)
    log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
