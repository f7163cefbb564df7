"""``sj-sfn demo``: real data that ships with the install, two small models, one table.

For each model (a CNN and a ViT) on scikit-learn's handwritten digits (or Fashion-MNIST):
train it (or load it from the cache), convert it to a one-timestep SNN with SFNs, tune λ with a
few Ax trials on the validation split, then report on the test split: ANN accuracy, SNN (T=1)
accuracy, SpikingJelly's IF rate-coding conversion at T=1 and the T it needs to reach the
SNN's T=1 accuracy, λ, energy ratio and wall time.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DEMO_CACHE", "run_demo", "if_rate_coding_sweep", "format_table"]

DEMO_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sj-sfn", "demo")  # trained models, reused across runs
IF_MAX_IMAGES = 2048  # test images the IF rate-coding sweep runs on (one batch)


@torch.no_grad()
def if_rate_coding_sweep(ann: nn.Module, calib_loader, test_loader, max_steps: int = 256, quiet: bool = False,
                         target: float | None = None, max_images: int = IF_MAX_IMAGES) -> dict[int, float]:
    """Test accuracy of SpikingJelly's IF rate-coding conversion at ``T = 1, 2, 4, ..., max_steps``.

    ``ann2snn.Converter(RateCodingRecipe(loader, mode='99.9%'))``; the input is presented at every
    step and the prediction is the arg-max of the outputs summed over the ``T`` steps. The first
    ``max_images`` test images run as one batch; with ``target`` the sweep stops at the first
    power of two whose accuracy reaches it.
    """
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import Converter
    from spikingjelly.activation_based.ann2snn.recipes.rate_coding import RateCodingRecipe

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        snn = Converter(RateCodingRecipe(calib_loader, mode="99.9%")).convert(ann).eval()
    xs, ys, n = [], [], 0
    for x, y in test_loader:
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= max_images:
            break
    x, y = torch.cat(xs)[:max_images], torch.cat(ys)[:max_images]
    functional.reset_net(snn)
    out: dict[int, float] = {}
    acc = None
    for t in range(1, max_steps + 1):
        o = snn(x)
        acc = o if acc is None else acc + o
        if t & (t - 1) == 0:  # a power of two
            out[t] = 100.0 * (acc.argmax(-1) == y).double().mean().item()
            if target is not None and out[t] >= target:
                break
    functional.reset_net(snn)
    return out


def _models(dataset: str) -> dict[str, dict[str, Any]]:
    from . import zoo

    if dataset == "digits":
        return {
            "cnn": {"build": zoo.digits_cnn, "epochs": 15, "lr": 3e-3, "bs": 64},
            "vit": {"build": lambda: zoo.digits_vit(patch_size=4), "epochs": 20, "lr": 4e-3, "bs": 128},
        }
    return {
        "cnn": {"build": zoo.small_resnet, "epochs": 2, "lr": 3e-3, "bs": 128},
        "vit": {"build": lambda: zoo.digits_vit(img_size=28, patch_size=4), "epochs": 4, "lr": 2e-3, "bs": 128},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per model: ANN, SNN T=1, IF T=1, IF T needed, λ, energy ratio, wall time."""
    head = ["model", "ANN acc", "SNN T=1 acc", "IF T=1 acc", "IF needs T", "λ", "energy ratio", "wall s"]
    lines = [head]
    for r in rows:
        if r.get("if_accuracy"):
            if_t1 = f"{r['if_accuracy']['1']:.2f}"
            need = r.get("if_steps_to_match")
            need = f"{need} ({r['if_accuracy'][str(need)]:.2f})" if need else f">{max(int(k) for k in r['if_accuracy'])}"
        else:
            if_t1, need = "n/a", "n/a"
        lines.append([r["model"], f"{r['ann_accuracy']:.2f}", f"{r['snn_accuracy']:.2f}", if_t1, need,
                      f"{r['lam']:.3f}", f"{r['energy_ratio']:.3f}", f"{r['wall_seconds']:.1f}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def run_demo(args) -> int:
    from . import zoo
    from .conversion import convert
    from .data import make_splits
    from .energy import measure_energy
    from .tune import tune_lambda
    from .utils import UserError, write_json

    def _log(args, *msg: Any) -> None:
        if not args.quiet:
            print(*msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    specs = _models(args.dataset)
    bad = [m for m in wanted if m not in specs]
    if bad or not wanted:
        raise UserError(f"--models takes a comma-separated subset of {','.join(specs)}, got {args.models!r}")
    if not args.epochs > 0:
        raise UserError(f"--epochs must be > 0, got {args.epochs}")
    try:
        splits = make_splits(args.dataset, seed=args.seed, train_limit=10000 if args.dataset != "digits" else None)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    cache = args.cache or DEMO_CACHE
    os.makedirs(cache, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    calib = splits.loader("train", 128, shuffle=False)
    val = splits.loader("val", 256)
    test = splits.loader("test", 256)
    _log(args, f"{args.dataset}: {len(splits.train)} train / {len(splits.val)} validation (λ) / {len(splits.test)} test images")
    rows = []
    for name in wanted:
        spec = specs[name]
        t0 = time.perf_counter()
        epochs = max(1, round(spec["epochs"] * args.epochs))
        path = os.path.join(cache, f"{args.dataset}-{name}-e{epochs}-s{args.seed}.pth")
        ann = spec["build"]()
        cached = os.path.isfile(path) and not args.retrain
        if cached:
            try:
                ann.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError):
                cached = False
                ann = spec["build"]()
        if not cached:
            _log(args, f"[{name}] training {epochs} epochs (cached at {path} afterwards)")
            torch.manual_seed(args.seed)
            zoo.fit(ann, splits.loader("train", spec["bs"], seed=args.seed), epochs=epochs, lr=spec["lr"],
                    progress=not args.quiet, seed=args.seed)
            torch.save(ann.state_dict(), path)
        else:
            _log(args, f"[{name}] loaded from {path}")
        ann.eval()
        t_train = time.perf_counter() - t0
        ann_acc = zoo.accuracy(ann, test)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            snn = convert(ann, calib, max_spikes=32, p=0.99, progress=not args.quiet)
        t_conv = time.perf_counter() - t1
        _log(args, f"[{name}] converted in {t_conv:.1f} s; tuning λ with {args.trials} Ax trials on the validation split")
        # accuracy minus 3 points per unit of energy ratio: on 180 validation images, accuracy alone picks noise
        res = tune_lambda(snn, val, objective="tradeoff", beta=3.0, ann=ann, trials=args.trials, seed=args.seed,
                          progress=not args.quiet)
        res.apply(snn)
        plot = res.plot(os.path.join(args.out, f"lambda_{name}.png"), title=f"{args.dataset} {name}: λ search")
        snn_acc = zoo.accuracy(snn, test)
        energy = measure_energy(snn, test, ann=ann)
        row: dict[str, Any] = {
            "model": name, "ann_accuracy": ann_acc, "snn_accuracy": snn_acc, "lam": res.best_lam,
            "val_accuracy_at_lam": res.best.metric, "energy_ratio": energy.ratio, "event_ratio": energy.event_ratio,
            "trials": len(res.trials), "tune_seconds": res.seconds, "convert_seconds": t_conv, "train_seconds": t_train,
            "cached": cached, "lambda_plot": plot, "tune": res.to_dict(),
        }
        if name == "cnn":
            t2 = time.perf_counter()
            sweep = if_rate_coding_sweep(ann, calib, test, args.max_if_steps, quiet=args.quiet, target=snn_acc)
            row["if_accuracy"] = {str(k): v for k, v in sweep.items()}
            row["if_steps_to_match"] = next((t for t, a in sweep.items() if a >= snn_acc), None)
            row["if_images"] = min(len(splits.test), IF_MAX_IMAGES)
            row["if_seconds"] = time.perf_counter() - t2
        else:
            row["if_accuracy"] = None
            row["if_note"] = "SpikingJelly's rate-coding recipe converts ReLU networks only"
        row["wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
        _log(args, f"[{name}] ANN {ann_acc:.2f}%  SNN(T=1) {snn_acc:.2f}%  λ={res.best_lam:.3f}  energy ratio {energy.ratio:.3f}")
    table = format_table(rows)
    total = time.perf_counter() - t_all
    result = {"dataset": args.dataset, "seed": args.seed, "trials": args.trials, "max_spikes": 32, "p": 0.99,
              "splits": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
              "rows": rows, "table": table, "total_seconds": total, "cache": cache}
    path = os.path.join(args.out, "demo.json")
    write_json(path, result)
    print(table)
    if not args.quiet:
        print(f"\nT=1 SNN: one forward pass, SFN neurons with N=32 levels; λ tuned on the validation split, "
              f"accuracies on the test split ({len(splits.test)} images).")
        print(f"wrote {path} and the λ plots in {args.out}/  (total {total:.0f} s)")
    return 0
