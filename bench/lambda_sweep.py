#!/usr/bin/env python
"""λ sweep vs Bayesian optimisation on Fashion-MNIST (or digits): accuracy and energy ratio against λ.

For a small CNN and a small ViT: train (cached), convert at T=1 (N=32, p=0.99), evaluate a
log-spaced grid of λ on the validation split (accuracy and energy ratio in one pass per λ),
then run the Ax search over the same bounds and report where it landed, its wall time against
the grid's, and the Ax overhead per trial (time in Ax, evaluation excluded). Writes a table,
one PNG per model (the grid as lines, the BO trials as points, the chosen λ marked) and JSON.

    python bench/lambda_sweep.py                           # Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python bench/lambda_sweep.py --dataset digits --grid 20 --trials 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def _models(dataset: str):
    from sj_sfn import zoo

    if dataset == "digits":
        return {"cnn": (lambda: zoo.digits_cnn(), 15, 3e-3), "vit": (lambda: zoo.digits_vit(patch_size=4), 20, 4e-3)}
    return {"cnn": (lambda: zoo.small_resnet(), 3, 3e-3), "vit": (lambda: zoo.digits_vit(img_size=28, patch_size=4), 4, 2e-3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--models", default="cnn,vit")
    p.add_argument("--grid", type=int, default=30, help="grid points over the bounds (log-spaced)")
    p.add_argument("--trials", type=int, default=20, help="Ax trials")
    p.add_argument("--bounds", type=float, nargs=2, default=(0.05, 1.0))
    p.add_argument("--train-limit", type=int, default=10000, help="Fashion-MNIST training images (validation = limit/5)")
    p.add_argument("--epochs", type=float, default=1.0, help="scale the training epochs")
    p.add_argument("--cache", default=os.path.join("runs", "cache"))
    p.add_argument("--out", default=os.path.join("runs", "lambda_sweep"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    from sj_sfn import convert, set_lambda, sfn_nodes, zoo
    from sj_sfn.data import make_splits
    from sj_sfn.tune import evaluate_lambda, tune_lambda
    from sj_sfn.utils import json_safe

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sp = make_splits(args.dataset, seed=args.seed, train_limit=args.train_limit if args.dataset != "digits" else None)
    except FileNotFoundError as e:
        print(f"lambda_sweep: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.cache, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    val = sp.loader("val", 500)
    calib = sp.loader("train", 128, shuffle=False)
    results = {"dataset": args.dataset, "splits": {"train": len(sp.train), "val": len(sp.val), "test": len(sp.test)},
               "bounds": list(args.bounds), "grid_points": args.grid, "trials": args.trials, "threads": torch.get_num_threads(),
               "models": {}}
    lines = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        build, epochs, lr = _models(args.dataset)[name]
        epochs = max(1, round(epochs * args.epochs))
        ann = build()
        arch = f"{type(ann).__name__}{sum(p.numel() for p in ann.parameters())}"
        path = os.path.join(args.cache, f"lambda_sweep-{args.dataset}-{name}-{arch}-e{epochs}-s{args.seed}-n{len(sp.train)}.pth")
        if os.path.isfile(path):
            ann.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            zoo.fit(ann, sp.loader("train", 128, seed=args.seed), epochs=epochs, lr=lr, seed=args.seed)
            torch.save(ann.state_dict(), path)
        ann.eval()
        ann_val = zoo.accuracy(ann, val)
        snn = convert(ann, calib, lam=0.25, max_spikes=32, p=0.99, num_batches=8)
        # the grid
        t0 = time.perf_counter()
        grid = []
        for lam in np.geomspace(*args.bounds, args.grid):
            set_lambda(snn, float(lam))
            acc, ratio = evaluate_lambda(snn, val)
            grid.append({"lam": float(lam), "metric": acc, "energy_ratio": ratio})
        t_grid = time.perf_counter() - t0
        set_lambda(snn, 0.25)
        # Bayesian optimisation
        res = tune_lambda(snn, val, trials=args.trials, bounds=tuple(args.bounds), seed=args.seed)
        best_grid = max(grid, key=lambda r: (r["metric"], -r["energy_ratio"]))
        png = res.plot(os.path.join(args.out, f"{args.dataset}_{name}.png"), sweep=grid,
                       title=f"{args.dataset} {name}: grid ({args.grid}) vs Ax ({len(res.trials)} trials)")
        res.to_json(os.path.join(args.out, f"{args.dataset}_{name}_tune.json"))
        per_trial_ax = res.ax_seconds / max(1, len(res.trials))
        row = {
            "ann_val_accuracy": ann_val, "sites": len(sfn_nodes(snn)), "grid": grid, "grid_seconds": t_grid,
            "grid_best": best_grid, "bo_best": {"lam": res.best_lam, "metric": res.best.metric, "energy_ratio": res.best.energy_ratio},
            "bo_seconds": res.seconds, "bo_eval_seconds": res.eval_seconds, "bo_ax_seconds": res.ax_seconds,
            "bo_ax_seconds_per_trial": per_trial_ax, "bo_ax_seconds_max_trial": max(t.ax_seconds for t in res.trials),
            "bo_trials": len(res.trials), "bo_converged_early": res.extra.get("converged", False), "plot": png,
            "bo_gap_points": best_grid["metric"] - res.best.metric,
        }
        results["models"][name] = row
        lines.append((name, ann_val, best_grid, res, t_grid, per_trial_ax, row["bo_ax_seconds_max_trial"]))
        # accuracy / energy vs λ table for this model
        print(f"\n{args.dataset} {name}: validation accuracy and energy ratio vs λ (ANN {ann_val:.2f}%)")
        print(f"{'λ':>8} {'acc %':>7} {'energy':>7}")
        for r in grid:
            print(f"{r['lam']:8.4f} {r['metric']:7.2f} {r['energy_ratio']:7.3f}")
    print(f"\n{'model':5} {'ANN':>6} | {'grid λ':>7} {'acc':>6} {'energy':>6} {'grid s':>7} | {'BO λ':>7} {'acc':>6} {'energy':>6} "
          f"{'BO s':>6} {'trials':>6} {'Ax s/trial':>10} {'max':>5}")
    for name, ann_val, g, res, t_grid, ax_pt, ax_max in lines:
        print(f"{name:5} {ann_val:6.2f} | {g['lam']:7.4f} {g['metric']:6.2f} {g['energy_ratio']:6.3f} {t_grid:7.1f} | "
              f"{res.best_lam:7.4f} {res.best.metric:6.2f} {res.best.energy_ratio:6.3f} {res.seconds:6.1f} {len(res.trials):6d} "
              f"{ax_pt:10.2f} {ax_max:5.2f}")
    out = os.path.join(args.out, f"{args.dataset}.json")
    with open(out, "w") as f:
        json.dump(json_safe(results), f, indent=2, default=str)  # NaN/Inf -> null, as TuneResult.to_json
    print(f"\nwrote {out} and the plots in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
