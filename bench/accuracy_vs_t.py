"""Accuracy vs time steps on Fashion-MNIST (the paper's Figure 4 on real data).

Trains (or loads from the cache) a small ResNet on a subset of Fashion-MNIST, then reports
test accuracy and energy ratio of:

* the ANN;
* SpikingJelly's ``RateCodingRecipe`` IF network run for T = 1, 2, 4, 8, 16, 32 steps;
* ``MTNRecipe`` at ONE step with N = T (Theorem 2: the same IF network, folded in time);
* SFN at one step, N = 32, over a λ grid, with floor (``v_init=0``) and rounding (``v_init=0.5``),
  and with ``sj_sfn.convert``'s default calibration (steps allocated for ``--budgets``);
  the λ picked on the validation split is marked.

Writes a table to stdout, ``results.json`` and ``accuracy_vs_t.png`` under ``--out``.

    apt-get update && apt-get install -y dataset-fashion-mnist      # once (root)
    python bench/accuracy_vs_t.py --out runs/accuracy_vs_t
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.ann2snn import Converter, RateCodingRecipe
from torch.utils.data import DataLoader, Subset

from sj_sfn import MTNRecipe, convert, set_lambda, zoo
from sj_sfn.conversion import DEFAULT_ENERGY_BUDGET
from sj_sfn.data import make_splits
from sj_sfn.energy import measure_energy

T_VALUES = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def accuracy_over_steps(snn: torch.nn.Module, loader: DataLoader, steps: tuple[int, ...]) -> dict[int, float]:
    """Top-1 accuracy (%) of the output averaged over the first T steps, for every T in ``steps``."""
    snn.eval()
    correct = {t: 0 for t in steps}
    total = 0
    for x, y in loader:
        functional.reset_net(snn)
        acc = None
        for t in range(1, max(steps) + 1):
            out = snn(x)
            acc = out if acc is None else acc + out
            if t in correct:
                correct[t] += (acc.argmax(-1) == y).sum().item()
        total += y.numel()
    functional.reset_net(snn)
    return {t: 100.0 * c / total for t, c in correct.items()}


def train_or_load(args, splits) -> torch.nn.Module:
    os.makedirs(args.cache, exist_ok=True)
    if args.dataset == "digits":
        path = os.path.join(args.cache, f"digits_cnn_e{args.epochs}_s{args.seed}.pt")
        model = zoo.digits_cnn()
    else:
        path = os.path.join(args.cache, f"small_resnet_fmnist_n{args.train_limit}_e{args.epochs}_s{args.seed}.pt")
        model = zoo.small_resnet()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"loaded checkpoint {path}")
        return model.eval()
    t0 = time.time()
    bs = 64 if args.dataset == "digits" else 128
    zoo.fit(model, splits.loader("train", bs, seed=args.seed), epochs=args.epochs, lr=3e-3, seed=args.seed)
    print(f"trained {type(model).__name__} on {len(splits.train)} images, {args.epochs} epochs, {time.time() - t0:.0f} s")
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist",
                    help="fashion-mnist: small ResNet; digits: the 3-conv digits CNN (epochs default 12)")
    ap.add_argument("--out", default="runs/accuracy_vs_t")
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--train-limit", type=int, default=12000, help="training images (a subset keeps CPU training short)")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (fashion-mnist) or 12 (digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 128 training images")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first n test images (default: all 10,000)")
    ap.add_argument("--energy-images", type=int, default=1000)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5])
    ap.add_argument("--max-spikes", type=int, default=32)
    ap.add_argument("--budgets", type=float, nargs="*", default=[DEFAULT_ENERGY_BUDGET],
                    help="energy budgets of sj_sfn.convert's default calibration (none: skip it)")
    ap.add_argument("--only-budget", action="store_true", help="run only the default calibration's rows (budget.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = ap.parse_args()
    if args.epochs is None:
        args.epochs = 12 if args.dataset == "digits" else 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    if args.dataset == "digits":
        splits = make_splits("digits", seed=args.seed)
    else:
        splits = make_splits("fashion-mnist", seed=args.seed, train_limit=args.train_limit)
    ann = train_or_load(args, splits)
    test_ds = splits.test if args.test_limit is None else Subset(splits.test, range(args.test_limit))
    test = DataLoader(test_ds, batch_size=500)
    val = splits.loader("val", 500)
    energy_loader = DataLoader(Subset(splits.test, range(min(args.energy_images, len(splits.test)))), batch_size=250)
    calib = [b for _, b in zip(range(args.calib_batches), splits.loader("train", 128, shuffle=True, seed=args.seed + 1))]
    res: dict = {"config": vars(args), "n_test": len(test_ds), "n_train": len(splits.train)}

    res["ann"] = zoo.accuracy(ann, test)
    print(f"ANN test accuracy {res['ann']:.2f}%")
    if args.only_budget:  # the default calibration's rows alone, in their own file
        res["budget"] = budget_rows(args, ann, calib, test, val, energy_loader)
        with open(os.path.join(args.out, "budget.json"), "w") as f:
            json.dump(json.loads(json.dumps(res, default=str)), f, indent=1)
        print(f"wrote {args.out}/budget.json")
        return

    # rate-coding IF (SpikingJelly), T steps
    t0 = time.time()
    if_net = Converter(RateCodingRecipe(calib)).convert(ann)
    if_acc = accuracy_over_steps(if_net, test, T_VALUES)
    res["if"] = {t: {"acc": if_acc[t], "energy": measure_energy(if_net, energy_loader, ann=ann, time_steps=t).ratio} for t in T_VALUES}
    print(f"IF done ({time.time() - t0:.0f} s)")

    # MTN at one step, N = T
    t0 = time.time()
    res["mtn"] = {}
    for t in T_VALUES:
        mtn = Converter(MTNRecipe(calib, time_steps=t)).convert(ann)
        res["mtn"][t] = {"acc": zoo.accuracy(mtn, test), "energy": measure_energy(mtn, energy_loader, ann=ann).ratio}
    print(f"MTN done ({time.time() - t0:.0f} s)")

    # SFN at one step, N = 32, λ grid, floor and rounding
    t0 = time.time()
    res["sfn"] = {}
    for v_init in (0.0, 0.5):
        snn = convert(ann, calib, lam=args.lams[0], max_spikes=args.max_spikes, offset=v_init, progress=False)
        rows = {}
        for lam in args.lams:
            set_lambda(snn, lam)
            rows[lam] = {
                "acc": zoo.accuracy(snn, test), "val_acc": zoo.accuracy(snn, val),
                "energy": measure_energy(snn, energy_loader, ann=ann).ratio,
            }
        best = max(args.lams, key=lambda lam: (rows[lam]["val_acc"], -lam))
        res["sfn"][v_init] = {"grid": rows, "best_val_lam": best}
    print(f"SFN done ({time.time() - t0:.0f} s)")

    res["budget"] = budget_rows(args, ann, calib, test, val, energy_loader)

    # table
    what = "digits, 3-conv CNN" if args.dataset == "digits" else "Fashion-MNIST, small ResNet"
    lines = [f"{what} ({res['n_train']} training images), test set {res['n_test']} images",
             f"ANN: {res['ann']:.2f}%", "",
             "| T | IF (RateCodingRecipe), T steps | energy | MTN (MTNRecipe), 1 step, N=T | energy |",
             "|---|---|---|---|---|"]
    for t in T_VALUES:
        i, m = res["if"][t], res["mtn"][t]
        lines.append(f"| {t} | {i['acc']:.2f} | {i['energy']:.3f} | {m['acc']:.2f} | {m['energy']:.3f} |")
    lines += ["", f"SFN, 1 step, N={args.max_spikes} (v_init=0: floor, 0.5: round; * = λ picked on the validation split)", "",
              "| λ | acc, floor | energy | acc, round | energy |", "|---|---|---|---|---|"]
    for lam in args.lams:
        a, b = res["sfn"][0.0], res["sfn"][0.5]
        sa = "*" if a["best_val_lam"] == lam else ""
        sb = "*" if b["best_val_lam"] == lam else ""
        lines.append(f"| {lam:g} | {a['grid'][lam]['acc']:.2f}{sa} | {a['grid'][lam]['energy']:.3f} | "
                     f"{b['grid'][lam]['acc']:.2f}{sb} | {b['grid'][lam]['energy']:.3f} |")
    lines += ["", f"SFN, 1 step, N={args.max_spikes}, sj_sfn.convert's default calibration (thresholds allocated for the energy "
              "budget, graded levels, output reconstruction)", "", "| energy budget | acc | energy |", "|---|---|---|"]
    for budget, r in res["budget"].items():
        lines.append(f"| {budget:g} | {r['acc']:.2f} | {r['energy']:.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(json.loads(json.dumps(res, default=str)), f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(res, args, os.path.join(args.out, "accuracy_vs_t.png"))
    print(f"wrote {args.out}/results.json, table.md, accuracy_vs_t.png")


def budget_rows(args, ann, calib, test, val, energy_loader) -> dict:
    """``sj_sfn.convert``'s defaults at each of ``--budgets``: thresholds allocated for the energy budget, graded
    levels, output reconstruction."""
    t0 = time.time()
    rows = {}
    for budget in args.budgets:
        snn = convert(ann, calib, energy_budget=budget, max_spikes=args.max_spikes, progress=False)
        rows[budget] = {"acc": zoo.accuracy(snn, test), "val_acc": zoo.accuracy(snn, val),
                        "energy": measure_energy(snn, energy_loader, ann=ann).ratio}
        print(f"default calibration, energy budget {budget:g}: {rows[budget]['acc']:.2f}%, energy {rows[budget]['energy']:.3f}")
    print(f"budget calibration done ({time.time() - t0:.0f} s)")
    return rows


def plot(res: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ts = list(T_VALUES)
    ax1.plot(ts, [res["if"][t]["acc"] for t in ts], "o-", label="IF (RateCodingRecipe), T steps")
    ax1.plot(ts, [res["mtn"][t]["acc"] for t in ts], "s-", label="MTN (MTNRecipe), 1 step, N=T")
    ax1.axhline(res["ann"], color="k", ls="--", label=f"ANN {res['ann']:.2f}%")
    for v_init, style in ((0.0, ":"), (0.5, "-.")):
        s = res["sfn"][v_init]
        lam = s["best_val_lam"]
        ax1.axhline(s["grid"][lam]["acc"], color="C2" if v_init else "C3", ls=style,
                    label=f"SFN 1 step N={args.max_spikes}, λ={lam:g}, v_init={v_init:g}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("T (time steps; N = T for MTN)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(max(0, min(res["if"][1]["acc"], res["mtn"][1]["acc"]) - 5), 100)
    ax1.legend(fontsize=7)
    lams = args.lams
    for v_init in (0.0, 0.5):
        g = res["sfn"][v_init]["grid"]
        ax2.plot([g[lam]["energy"] for lam in lams], [g[lam]["acc"] for lam in lams], "o-", label=f"SFN v_init={v_init:g} (λ grid)")
    ax2.plot([res["if"][t]["energy"] for t in ts], [res["if"][t]["acc"] for t in ts], "o--", label="IF, T steps")
    ax2.plot([res["mtn"][t]["energy"] for t in ts], [res["mtn"][t]["acc"] for t in ts], "s--", label="MTN, N=T")
    ax2.axhline(res["ann"], color="k", ls="--")
    ax2.set_xlabel("energy ratio E_SNN / E_ANN")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(max(0, res["ann"] - 15), 100)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
