"""SFormer on Fashion-MNIST and SFormer CPU latency.

1. Trains (or loads from the cache) a timm ``VisionTransformer`` on a subset of Fashion-MNIST
   (28×28, patch 7 → 16 tokens + class token; dim 64 and 4 blocks by default, heads = dim/16), converts it to a
   one-timestep SFormer and reports ANN vs SNN (T=1) accuracy on the validation and test
   splits and the energy ratio (``sj_sfn.energy.measure_energy``) over a λ grid, then the
   SoftMax-site options (cap, N_a, θ rule) and floor vs rounding at the λ picked on the
   validation split (the largest λ whose validation accuracy is within 1 point of the ANN's).
2. Optional (``--spikingjelly``): SpikingJelly 2.0's ``STATransformerRecipe`` on the same weights
   (rewritten with ``nn.LayerNorm`` / ``nn.MultiheadAttention`` and a plain ``forward(x)``, which
   it needs), accuracy after t = 1..T steps of the input ``[x, 0, 0, ...]``.
3. Latency: timm ``vit_tiny_patch16_224`` (random weights), batch 64 at 224 px on CPU, ANN
   (timm's fused attention) vs the converted model on the module path and on the compiled
   fire path (``sformer.set_fire_path('compiled')``, checked bit-identical), median of repeats.

Prints tables and writes ``results.json`` and ``figure6.png`` (the paper's Figure 6 for this model)
under ``--out``.

    apt-get update && apt-get install -y dataset-fashion-mnist      # once (root)
    python bench/sformer.py --out runs/sformer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

import sj_sfn
from sj_sfn import sformer, zoo
from sj_sfn.conversion import DEFAULT_ENERGY_BUDGET
from sj_sfn.data import make_splits
from sj_sfn.energy import measure_energy


def fmnist_vit(dim: int = 64, depth: int = 4) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=dim, depth=depth,
                             num_heads=dim // 16, mlp_ratio=2.0)


def train_or_load(args, splits) -> torch.nn.Module:
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"vit_fmnist_p7_d{args.dim}x{args.depth}_n{args.train_limit}_e{args.epochs}_s{args.seed}.pt")
    model = fmnist_vit(args.dim, args.depth)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"loaded {path}")
    else:
        t0 = time.time()
        torch.manual_seed(args.seed)
        zoo.fit(model, splits.loader("train", 128, seed=args.seed), epochs=args.epochs, lr=3e-3, progress=True, seed=args.seed)
        torch.save(model.state_dict(), path)
        print(f"trained in {time.time() - t0:.0f} s, cached at {path}")
    return model.eval()


def evaluate(snn, loaders, energy_loader, ann) -> dict:
    out = {split: zoo.accuracy(snn, ld) for split, ld in loaders.items()}
    rep = measure_energy(snn, energy_loader, ann=ann)
    out.update(ratio=rep.ratio, event_ratio=rep.event_ratio, sops=rep.sops, ann_macs=rep.ann_macs)
    attn = [r for r in rep.per_layer if r.kind == "matmul"]
    out["attn_products_acs_share"] = sum(r.snn_acs for r in attn) / max(rep.sops, 1e-9)
    return out


def fmnist_study(args) -> dict:
    splits = make_splits("fashion-mnist", seed=args.seed, train_limit=args.train_limit)
    ann = train_or_load(args, splits)
    test = splits.loader("test", 500)
    if args.test_limit:
        test = DataLoader(Subset(splits.test, range(args.test_limit)), batch_size=500)
    loaders = {"val": splits.loader("val", 500), "test": test}
    energy_loader = DataLoader(Subset(splits.test, range(args.energy_images)), batch_size=250)
    calib = splits.loader("train", 128, shuffle=False)
    res: dict = {"ann": {s: zoo.accuracy(ann, ld) for s, ld in loaders.items()}, "lam_grid": [], "variants": []}
    print(f"ANN: val {res['ann']['val']:.2f}%  test {res['ann']['test']:.2f}%")

    def conv(lam, **kw):
        return sformer.convert(ann, calib, lam=lam, max_spikes=args.max_spikes, num_batches=args.calib_batches, progress=False,
                               **kw).eval()

    for lam in args.lams:  # converted at each λ, so the SoftMax site's N_a levels span its cap at that λ
        r = evaluate(conv(lam), loaders, energy_loader, ann)
        r["lam"] = lam
        res["lam_grid"].append(r)
        print(f"λ={lam:<6g} val {r['val']:.2f}%  test {r['test']:.2f}%  energy ratio {r['ratio']:.3f} (events {r['event_ratio']:.3f})")
    ok = [r for r in res["lam_grid"] if r["val"] >= res["ann"]["val"] - 1.0]
    pick = max(ok, key=lambda r: r["lam"]) if ok else max(res["lam_grid"], key=lambda r: r["val"])
    res["picked_lam"] = pick["lam"]
    print(f"picked on val: λ={pick['lam']:g}")
    variants = [
        ("default (cap=max, N_a=N, θ_a=cap/(λN_a), round)", {}),
        ("floor (v_init=0)", dict(v_init=0.0)),
        ("softmax_cap='one'", dict(softmax_cap="one")),
        ("softmax_cap=0.999 quantile", dict(softmax_cap=0.999)),
        ("softmax_max_spikes=8", dict(softmax_max_spikes=8)),
        ("softmax_max_spikes=16", dict(softmax_max_spikes=16)),
        ("softmax_theta='quantile'", dict(softmax_theta="quantile")),
        ("per_channel thresholds", dict(per_channel=True)),
    ]
    for name, kw in variants:
        r = evaluate(conv(pick["lam"], **kw), loaders, energy_loader, ann)
        r.update(name=name, lam=pick["lam"], **{f"kw_{k}": v for k, v in kw.items()})
        res["variants"].append(r)
        print(f"  {name:<50} val {r['val']:.2f}%  test {r['test']:.2f}%  ratio {r['ratio']:.3f}")
    res["budget"] = []
    for budget in args.budgets:  # sj_sfn.convert's defaults: steps allocated for the budget, graded levels, reconstruction
        r = evaluate(sj_sfn.convert(ann, calib, energy_budget=budget, max_spikes=args.max_spikes, num_batches=args.calib_batches,
                                    progress=False).eval(), loaders, energy_loader, ann)  # fmt: skip
        r["energy_budget"] = budget
        res["budget"].append(r)
        print(f"  default calibration, energy budget {budget:<5g} val {r['val']:.2f}%  test {r['test']:.2f}%  ratio {r['ratio']:.3f}")
    from sj_sfn.sformer.plots import plot_site_histograms

    x = next(iter(DataLoader(splits.test, batch_size=64)))[0]
    fig_path = os.path.join(args.out, "figure6.png")
    plot_site_histograms(ann, conv(pick["lam"]), x, lams=(1.0, 0.5, pick["lam"]), block=len(ann.blocks) - 1, path=fig_path)
    res["figure6"] = fig_path
    print(f"wrote {fig_path}")
    return res


@torch.no_grad()
def latency(args) -> dict:
    import timm

    torch.manual_seed(0)
    ann = timm.create_model("vit_tiny_patch16_224").eval()
    x = torch.rand(args.latency_batch, 3, 224, 224)
    snn = sformer.convert(ann, [(x[:16],)], progress=False).eval()

    def median_time(f) -> float:
        f(x)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f(x)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    prev = sformer.set_fire_path("module")
    ref = snn(x)
    t_module = median_time(snn)
    sformer.set_fire_path("compiled")
    t0 = time.perf_counter()
    fast = snn(x)
    compile_s = time.perf_counter() - t0
    identical = torch.equal(fast, ref)
    t_ann, t_comp = [], []
    for _ in range(2):  # interleave: the machine's load drifts
        t_ann.append(median_time(ann))
        t_comp.append(median_time(snn))
    sformer.set_fire_path(prev)
    t_ann_m, t_comp_m = min(t_ann), min(t_comp)
    res = dict(model="vit_tiny_patch16_224", batch=args.latency_batch, img=224, threads=torch.get_num_threads(),
               ann_s=t_ann_m, snn_module_s=t_module, snn_compiled_s=t_comp_m, compile_s=compile_s,
               compiled_identical_to_module=identical, ratio_module=t_module / t_ann_m, ratio_compiled=t_comp_m / t_ann_m)
    print(f"latency (batch {args.latency_batch}, 224 px, {torch.get_num_threads()} threads): ANN {t_ann_m:.2f} s, "
          f"SNN module path {t_module:.2f} s ({res['ratio_module']:.2f}x), compiled fire {t_comp_m:.2f} s "
          f"({res['ratio_compiled']:.2f}x; first call {compile_s:.0f} s; identical: {identical})")
    return res


class _PlainBlock(torch.nn.Module):
    """A timm ViT block with ``nn.LayerNorm`` / ``nn.MultiheadAttention`` (what SpikingJelly's STA recipe accepts)."""

    def __init__(self, blk):
        super().__init__()
        nn = torch.nn
        d = blk.norm1.normalized_shape[0]
        self.norm1 = nn.LayerNorm(d, eps=blk.norm1.eps)
        self.norm1.load_state_dict(blk.norm1.state_dict())
        self.attn = nn.MultiheadAttention(d, blk.attn.num_heads, batch_first=True)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(blk.attn.qkv.weight)
            self.attn.in_proj_bias.copy_(blk.attn.qkv.bias)
            self.attn.out_proj.weight.copy_(blk.attn.proj.weight)
            self.attn.out_proj.bias.copy_(blk.attn.proj.bias)
        self.norm2 = nn.LayerNorm(d, eps=blk.norm2.eps)
        self.norm2.load_state_dict(blk.norm2.state_dict())
        self.fc1, self.act, self.fc2 = blk.mlp.fc1, nn.GELU(), blk.mlp.fc2

    def forward(self, x):
        h = self.norm1(x)
        a, _w = self.attn(h, h, h, need_weights=False)  # (out, weights) unpacked: STA's tracer needs this form
        x = x + a
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class _PlainViT(torch.nn.Module):
    """The same ViT as plain PyTorch modules, ``forward(x)`` only (the workarounds of shared ENV notes)."""

    def __init__(self, vit):
        super().__init__()
        self.patch = vit.patch_embed.proj
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.blocks = torch.nn.Sequential(*[_PlainBlock(b) for b in vit.blocks])
        self.norm = torch.nn.LayerNorm(vit.norm.normalized_shape[0], eps=vit.norm.eps)
        self.norm.load_state_dict(vit.norm.state_dict())
        self.head = vit.head

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, :1].flatten(1))  # a slice, not x[:, 0]: STA rejects integer getitem


@torch.no_grad()
def spikingjelly_sta(args, ann, splits) -> dict:
    """SpikingJelly's STA recipe on the same ViT: accuracy after t = 1..T steps of input [x, 0, 0, ...]."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.ann2snn import Converter
    from spikingjelly.activation_based.ann2snn.recipes.sta_transformer import STATransformerRecipe

    plain = _PlainViT(ann).eval()
    test = DataLoader(Subset(splits.test, range(args.test_limit or len(splits.test))), batch_size=500)
    x0 = next(iter(test))[0][:8]
    res = {"plain_vs_timm_max_abs": (plain(x0) - ann(x0)).abs().max().item(), "runs": []}
    calib = splits.loader("train", 128, shuffle=False)
    for mode, steps in (("spiking_encoder", 1), ("spiking_encoder", 4), ("equivalent", 1)):
        snn = Converter(STATransformerRecipe(calib, time_steps=steps, mode=mode, num_calibration_batches=args.calib_batches)).convert(plain)
        functional.set_step_mode(snn, "m")
        correct, total = [0] * steps, 0
        for xb, yb in test:
            functional.reset_net(snn)
            out = snn(torch.cat([xb[None], xb.new_zeros(steps - 1, *xb.shape)])).cumsum(0)
            for t in range(steps):
                correct[t] += (out[t].argmax(-1) == yb).sum().item()
            total += yb.numel()
        acc = {t + 1: 100.0 * c / total for t, c in enumerate(correct)}
        res["runs"].append({"mode": mode, "time_steps": steps, "accuracy_after_t": acc})
        print(f"SpikingJelly STA mode={mode} T={steps}: test accuracy after t steps {acc}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/sformer")
    ap.add_argument("--cache", default=".cache/bench")
    ap.add_argument("--train-limit", type=int, default=30000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--energy-images", type=int, default=1000)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    ap.add_argument("--max-spikes", type=int, default=32)
    ap.add_argument("--budgets", type=float, nargs="*", default=[DEFAULT_ENERGY_BUDGET],
                    help="energy budgets of sj_sfn.convert's default calibration (none: skip it)")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", choices=["fmnist", "latency"], nargs="*", default=[])
    ap.add_argument("--spikingjelly", action="store_true", help="also run SpikingJelly's STA Transformer recipe on the same ViT")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared CPU)")
    ap.add_argument("--latency-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"args": vars(args), "note": "CPU timings on a shared machine are noisy"}
    if "fmnist" not in args.skip:
        res["fmnist"] = fmnist_study(args)
    if args.spikingjelly:
        splits = make_splits("fashion-mnist", seed=args.seed, train_limit=args.train_limit)
        res["spikingjelly_sta"] = spikingjelly_sta(args, train_or_load(args, splits), splits)
    if "latency" not in args.skip:
        torch.set_num_threads(args.latency_threads)
        res["latency"] = latency(args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
