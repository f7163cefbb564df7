"""Which popular timm and torchvision models ``sj_sfn.convert`` converts, refuses, or fails on.

For the smallest variant of each family (random weights, no download), on CPU with one thread:

1. builds the model at its own input size and draws a batch of ``--batch`` random images (seeded);
2. ``sj_sfn.convert(model, [x], progress=False)`` with the defaults (energy budget 0.35), and
   classifies the outcome: ``converted``; ``refused`` — a ``TypeError``/``ValueError``/
   ``NotImplementedError`` raised by sj_sfn itself, with the error's first line; ``error`` —
   anything else (an exception from deep inside torch or timm: a bug to fix, or a refusal missing);
3. for a converted model: the relative L2 error of the SNN's output to the ANN's
   (``‖y_snn − y_ann‖/‖y_ann‖``, random weights: a check of the plumbing, not of accuracy), the
   number of SFN sites, the conversion path, the **spiking share of MACs** (the ANN's MACs — weight
   layers and attention products, as :func:`sj_sfn.energy.measure_energy` counts them — whose input
   is spiking), the **SNN/ANN CPU time** (one thread, the median over ``--time-repeats`` interleaved
   ANN/SNN pairs of the per-pair ratio, after one warm-up each), and — when the first conversion
   took less than ``--fine-max-s`` seconds — the error at fine resolution (:data:`FINE`), which
   must be small (< 0.02) when every site is placed correctly. The fine conversion is also tried
   after an ``error`` of the default one: a fine error there means the sites work and the failure
   is in the energy-budget allocation.

Fine resolution: ``calibration='quantile'``, ``p = 1`` (θ = the largest activation on the batch, which is
also the evaluated batch, so no site clips), ``λ = 1e-4``, ``N = 16384`` (full scale 1.64·θ, step
θ/10⁴). The 99% quantile clips heavy-tailed sites (StarReLU's squares in ConvFormer: 0.12 at
``p = 0.99, λ = 1e-3, N = 4096``, 0.004 at ``p = 1``), and a step of θ/10³ is too coarse for
networks that amplify errors (Visformer: 0.05).

Random weights: every model is built after ``torch.manual_seed(--seed)``; a Linear whose weight is all
zero (torchvision's ViT head) is drawn ``N(0, 1/fan_in)`` so that the output is not zero. A random
network can be **degenerate**: torchvision's EfficientNet-B0 init maps the N(0, 1) batch to outputs of
norm 5e-13 (MobileNetV3 3e-8, MnasNet 2e-6: each block shrinks the signal), where no relative error
means anything. The bench measures the output's scale, ``gain = rms(y)/rms(x)``, and its dependence on
the input, ``spread = ‖y₀ − y₁‖/‖y‖`` over the first two images; when ``gain < 1e-4`` or
``spread < 1e-4`` and the model has BatchNorm layers it re-estimates their running statistics on a
separate random batch (``momentum=None``: the exact batch mean and variance, a data-dependent
variance-preserving init) and says so in the ``init`` column (``bn-stats``); a model that stays
degenerate is marked ``degenerate`` and its errors are not evidence either way.

Prints a table and writes JSON (``--out``, default ``runs/coverage.json``) and, with ``--markdown PATH``,
a Markdown table (both rewritten after each model).

    python bench/coverage.py --out runs/coverage.json --markdown docs/coverage.md   # all families (~1 h on one core)
    python bench/coverage.py --models levit_128s tv:vit_b_16 --quiet
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import torch

import sj_sfn
from sj_sfn.neuron import SFNode
from sj_sfn.utils import write_json

#: (model, family); ``tv:`` = torchvision. The smallest registered variant of each family.
MODELS: list[tuple[str, str]] = [
    # convolutional networks
    ("resnet18", "ResNet"),
    ("tv:resnet18", "ResNet (torchvision)"),
    ("resnext26ts", "ResNeXt"),
    ("legacy_seresnet18", "SE-ResNet"),
    ("res2net50_14w_8s", "Res2Net"),
    ("mobilenetv2_050", "MobileNetV2"),
    ("mobilenetv3_small_050", "MobileNetV3"),
    ("tv:mobilenet_v3_small", "MobileNetV3 (torchvision)"),
    ("efficientnet_b0", "EfficientNet"),
    ("tv:efficientnet_b0", "EfficientNet (torchvision)"),
    ("tinynet_e", "TinyNet"),
    ("mixnet_s", "MixNet"),
    ("lcnet_050", "LCNet"),
    ("ghostnet_050", "GhostNet"),
    ("rexnet_100", "ReXNet"),
    ("regnetx_002", "RegNet"),
    ("tv:regnet_x_400mf", "RegNet (torchvision)"),
    ("densenet121", "DenseNet"),
    ("dla46_c", "DLA"),
    ("dpn48b", "DPN"),
    ("hrnet_w18_small", "HRNet"),
    ("repvgg_a0", "RepVGG"),
    ("mobileone_s0", "MobileOne"),
    ("ese_vovnet19b_slim_dw", "VoVNet"),
    ("cspresnet50", "CSPNet"),
    ("selecsls42b", "SelecSLS"),
    ("hgnetv2_b0", "HGNetV2"),
    ("convnext_atto", "ConvNeXt"),
    ("tv:convnext_tiny", "ConvNeXt (torchvision)"),
    ("inception_next_tiny", "InceptionNeXt"),
    ("tv:shufflenet_v2_x0_5", "ShuffleNetV2"),
    ("tv:squeezenet1_0", "SqueezeNet"),
    ("tv:mnasnet0_5", "MnasNet"),
    ("tv:googlenet", "GoogLeNet"),
    ("repvit_m0_9", "RepViT"),
    ("fasternet_t0", "FasterNet"),
    ("starnet_s1", "StarNet"),
    ("poolformer_s12", "PoolFormer"),
    ("convformer_s18", "ConvFormer"),
    # MLP models
    ("mixer_s16_224", "MLP-Mixer"),
    ("resmlp_12_224", "ResMLP"),
    ("gmlp_ti16_224", "gMLP"),
    ("sequencer2d_s", "Sequencer (LSTM)"),
    # Vision Transformers and attention hybrids
    ("vit_tiny_patch16_224", "ViT"),
    ("tv:vit_b_16", "ViT (torchvision)"),
    ("deit_tiny_patch16_224", "DeiT"),
    ("deit_tiny_distilled_patch16_224", "DeiT distilled"),
    ("eva02_tiny_patch14_224", "EVA-02"),
    ("swin_tiny_patch4_window7_224", "Swin"),
    ("tv:swin_t", "Swin (torchvision)"),
    ("swinv2_tiny_window8_256", "Swin V2"),
    ("beit_base_patch16_224", "BEiT"),
    ("levit_128s", "LeViT"),
    ("levit_conv_128s", "LeViT (conv)"),
    ("xcit_nano_12_p16_224", "XCiT"),
    ("cait_xxs24_224", "CaiT"),
    ("pit_ti_224", "PiT"),
    ("mobilevit_xxs", "MobileViT"),
    ("mobilevitv2_050", "MobileViTV2"),
    ("tiny_vit_5m_224", "TinyViT"),
    ("efficientformer_l1", "EfficientFormer"),
    ("efficientformerv2_s0", "EfficientFormerV2"),
    ("efficientvit_b0", "EfficientViT (MIT)"),
    ("fastvit_t8", "FastViT"),
    ("edgenext_xx_small", "EdgeNeXt"),
    ("caformer_s18", "CAFormer"),
    ("convit_tiny", "ConViT"),
    ("crossvit_tiny_240", "CrossViT"),
    ("tnt_s_patch16_224", "TNT"),
    ("coat_lite_tiny", "CoaT"),
    ("twins_pcpvt_small", "Twins"),
    ("pvt_v2_b0", "PVT-v2"),
    ("visformer_tiny", "Visformer"),
    ("nest_tiny", "NesT"),
    ("gcvit_xxtiny", "GCViT"),
    ("davit_tiny", "DaViT"),
    ("maxvit_nano_rw_256", "MaxViT"),
    ("tv:maxvit_t", "MaxViT (torchvision)"),
    ("coatnet_nano_rw_224", "CoAtNet"),
    ("mvitv2_tiny", "MViTv2"),
    ("hiera_tiny_224", "Hiera"),
    ("volo_d1_224", "VOLO"),
    ("focalnet_tiny_srf", "FocalNet"),
]

REFUSALS = (TypeError, ValueError, NotImplementedError)
#: fine resolution: no clipping on the evaluated batch (p = 1), step θ/10⁴ (see the module docstring)
FINE = {"lam": 1e-4, "max_spikes": 16384, "p": 1.0, "calibration": "quantile"}
#: below either, the random network is degenerate (its output does not carry the input)
MIN_GAIN, MIN_SPREAD = 1e-4, 1e-4


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """The model with random weights (seeded; no download; zero-initialised Linears redrawn) and its input size."""
    torch.manual_seed(seed)
    if name.startswith("tv:"):
        import torchvision

        model, size = getattr(torchvision.models, name[3:])(weights=None), 224
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        size = int(model.pretrained_cfg["input_size"][-1])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.in_features ** -0.5)
    return model.eval(), size


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _classify(e: BaseException) -> tuple[str, str]:
    """``('refused' | 'error', where)``: a refusal is one of :data:`REFUSALS` raised by sj_sfn code."""
    frames = traceback.extract_tb(e.__traceback__)
    last = frames[-1] if frames else None
    where = f"{os.path.relpath(last.filename)}:{last.lineno}" if last else ""
    inside = last is not None and os.sep + "sj_sfn" + os.sep in last.filename
    return ("refused" if isinstance(e, REFUSALS) and inside else "error"), where


def _rel(a: Any, b: torch.Tensor) -> float:
    a = a[0] if isinstance(a, tuple | list) else a
    b = b[0] if isinstance(b, tuple | list) else b
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _first(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple | list) else y


def health(x: torch.Tensor, y: Any) -> tuple[float, float]:
    """``(gain, spread)``: ``rms(y)/rms(x)`` and ``‖y₀ − y₁‖/‖y‖`` (how much the output depends on the image)."""
    y = _first(y).float()
    gain = float(y.pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    spread = float((y[0] - y[1]).norm() / y.norm().clamp_min(1e-30)) if len(y) > 1 else math.nan
    return gain, spread


def degenerate(gain: float, spread: float) -> bool:
    return gain < MIN_GAIN or spread < MIN_SPREAD


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Set every BatchNorm's running mean and variance to its input's exact statistics on ``x``; returns their number."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch = its exact statistics
        m.train()
    if bns:
        model(x)
    model.eval()
    return len(bns)


@torch.no_grad()
def spiking_share(snn: torch.nn.Module, ann: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of the ANN's MACs (weight layers and attention products) whose input is spiking.

    ``Σ ann_macs(rows with spiking input) / Σ ann_macs``; a product counted by a wrapper's ``energy_ops``
    (no ATen-level input check) counts as spiking when it has accumulates.
    """
    from sj_sfn.energy import measure_energy

    e = measure_energy(snn, [x], ann=ann, num_batches=1)
    spiking = sum(r.ann_macs for r in e.per_layer if r.spiking_input or (r.spiking_input is None and r.snn_acs > 0))
    total = sum(r.ann_macs for r in e.per_layer)
    return spiking / total if total > 0 else math.nan


@torch.no_grad()
def time_ratio(ann: torch.nn.Module, snn: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """``(median SNN/ANN ratio over interleaved pairs, median ANN seconds)``; one warm-up each, the order flips."""
    ann(x), snn(x)
    ratios, ann_s = [], []
    for i in range(repeats):
        t = {}
        for key, net in ((("ann", ann), ("snn", snn)) if i % 2 == 0 else (("snn", snn), ("ann", ann))):
            t0 = time.perf_counter()
            net(x)
            t[key] = time.perf_counter() - t0
        ratios.append(t["snn"] / t["ann"])
        ann_s.append(t["ann"])
    return statistics.median(ratios), statistics.median(ann_s)


@torch.no_grad()
def run_one(name: str, family: str, batch: int, max_params: float, fine_max_s: float, seed: int,
            time_repeats: int = 3) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "family": family, "status": None, "error": None, "where": None, "params_m": None,
                           "init": None, "gain": None, "spread": None, "degenerate": None, "path": None, "sites": None,
                           "rel_err": None, "fine_rel_err": None, "spiking_share": None, "time_ratio": None,
                           "ann_s": None, "seconds": None}
    t0 = time.perf_counter()
    try:
        model, size = build(name, seed)
    except Exception as e:  # not registered in this timm/torchvision
        row.update(status="unavailable", error=_first_line(e))
        return row
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if row["params_m"] > max_params:
        row.update(status="skipped", error=f"{row['params_m']} M parameters > --max-params {max_params}")
        return row
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    y = model(x)
    row["init"] = "random"
    gain, spread = health(x, y)
    if degenerate(gain, spread):
        stats_batch = torch.randn(max(batch, 4), 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
        if reestimate_bn(model, stats_batch):
            row["init"] = "bn-stats"
            y = model(x)
            gain, spread = health(x, y)
    row.update(gain=gain, spread=spread, degenerate=degenerate(gain, spread))
    try:
        snn = sj_sfn.convert(model, [x], progress=False)
        out = snn(x)
    except Exception as e:
        status, where = _classify(e)
        row.update(status=status, error=_first_line(e), where=where)
        if status == "error":  # do the sites work without the budget allocation?
            try:
                row["fine_rel_err"] = _rel(sj_sfn.convert(model, [x], progress=False, **FINE)(x), y)
            except Exception as e2:
                row["error"] += " | fine resolution: " + _first_line(e2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    took = time.perf_counter() - t0
    row.update(status="converted", path=getattr(snn, "sfn_conversion_path", None), rel_err=_rel(out, y),
               sites=sum(isinstance(m, SFNode) for m in snn.modules()))
    try:
        row["spiking_share"] = spiking_share(snn, model, x)
    except Exception as e:
        row["error"] = "spiking share: " + _first_line(e)
    if time_repeats > 0:
        row["time_ratio"], row["ann_s"] = time_ratio(model, snn, x, time_repeats)
    del snn
    if took < fine_max_s:
        try:
            fine = sj_sfn.convert(model, [x], progress=False, **FINE)
            row["fine_rel_err"] = _rel(fine(x), y)
        except Exception as e:
            row["error"] = (row["error"] + " | " if row["error"] else "") + "fine resolution: " + _first_line(e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _counts(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"  (of {len(rows)})"


def _note(r: dict[str, Any]) -> str:
    parts = [r["error"] or ""]
    if r.get("degenerate"):
        parts.insert(0, "degenerate random network (errors mean nothing)")
    return "; ".join(p for p in parts if p)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':34s} {'family':26s} {'M':>6s} {'status':10s} {'init':8s} {'path':14s} {'sites':>5s} {'rel err':>8s} "
            f"{'fine':>8s} {'spike':>6s} {'t×':>6s} {'s':>6s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:34s} {r['family'][:26]:26s} {_fmt(r['params_m'], '6.1f')} {r['status']:10s} {str(r.get('init') or '-'):8s} "
            f"{str(r['path'] or '-'):14s} {_fmt(r['sites'], '5d')} {_fmt(r['rel_err'], '8.3f')} {_fmt(r['fine_rel_err'], '8.1e')} "
            f"{_fmt(r.get('spiking_share'), '6.3f')} {_fmt(r.get('time_ratio'), '6.2f')} {_fmt(r['seconds'], '6.1f')}  {_note(r)[:110]}"
        )
    lines.append(_counts(rows))
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], command: str, total: int) -> str:
    """The results as a Markdown page: a summary and one table row per model."""
    converted = [r for r in rows if r["status"] == "converted"]
    fine = [r["fine_rel_err"] for r in converted if r["fine_rel_err"] is not None and not r.get("degenerate")]
    over = [r["model"] for r in converted if r["fine_rel_err"] is not None and r["fine_rel_err"] >= 0.02]
    shares = [r["spiking_share"] for r in converted if r.get("spiking_share") is not None]
    times = [r["time_ratio"] for r in converted if r.get("time_ratio") is not None]
    out = [
        "# Model coverage",
        "",
        "Which timm and torchvision model families `sj_sfn.convert` converts, at random weights, on CPU with one thread "
        "(`bench/coverage.py`; its docstring defines every column). Measured with",
        "",
        f"    {command}",
        "",
        f"- converted: **{len(converted)} of {len(rows)}**" + (f" (partial run: {len(rows)} of {total} models)" if len(rows) < total else ""),
        f"- fine-resolution relative error (`{', '.join(f'{k}={v}' for k, v in FINE.items())}`): "
        + (f"max {max(fine):.2g}, median {statistics.median(fine):.2g} over {len(fine)} models; "
           f"{'none' if not over else ', '.join(over)} at or above 0.02" if fine else "not measured"),
        f"- random networks whose output did not carry the input: {sum(r.get('init') == 'bn-stats' for r in rows)} "
        f"(BatchNorm statistics re-estimated: `bn-stats`), {sum(bool(r.get('degenerate')) for r in rows)} still degenerate",
        "- spiking share of the ANN's MACs: " + (f"median {statistics.median(shares):.3f}, min {min(shares):.3f}" if shares else "-"),
        "- SNN/ANN CPU time (one thread, batch of the bench): " + (f"median {statistics.median(times):.2f}×, "
                                                                   f"max {max(times):.2f}×" if times else "-"),
        "",
        "Columns: `rel err` = ‖y_snn − y_ann‖/‖y_ann‖ at the defaults (energy budget 0.35) on random weights and "
        "random images (a plumbing check, not accuracy); `fine` = the same at fine resolution, which must stay "
        "below 0.02 when every site is placed right; `spiking` = share of the ANN's MACs whose input is spiking; "
        "`SNN/ANN time` = median ratio of interleaved one-thread forwards; `init` = `random` (the library's own "
        "init, seeded) or `bn-stats` (the random network was degenerate, its BatchNorm statistics were re-estimated "
        "on a random batch).",
        "",
        "| model | family | params (M) | status | init | path | sites | rel err | fine | spiking | SNN/ANN time | note |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = _note(r).replace("|", "\\|")
        out.append(
            f"| `{r['model']}` | {r['family']} | {_fmt(r['params_m'], '.1f')} | {r['status']} | {r.get('init') or '-'} | "
            f"{r['path'] or '-'} | {_fmt(r['sites'], 'd')} | {_fmt(r['rel_err'], '.3f')} | {_fmt(r['fine_rel_err'], '.1e')} | "
            f"{_fmt(r.get('spiking_share'), '.3f')} | {_fmt(r.get('time_ratio'), '.2f')} | {note[:160]} |"
        )
    out += ["", _counts(rows), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="model names (timm, or tv:<torchvision name>); default: every family")
    ap.add_argument("--out", default="runs/coverage.json", help="JSON results (rewritten after each model)")
    ap.add_argument("--batch", type=int, default=2, help="random images per model")
    ap.add_argument("--max-params", type=float, default=100.0, help="skip models with more parameters (millions)")
    ap.add_argument("--fine-max-s", type=float, default=600.0,
                    help="measure the fine-resolution error only when the first conversion took less (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--time-repeats", type=int, default=3, help="interleaved ANN/SNN timing pairs (0: no timing)")
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown here")
    ap.add_argument("--quiet", action="store_true", help="no per-model lines, only the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    families = dict(MODELS)
    names = args.models or [n for n, _ in MODELS]
    rows = []
    for name in names:
        row = run_one(name, families.get(name, "-"), args.batch, args.max_params, args.fine_max_s, args.seed,
                      args.time_repeats)
        rows.append(row)
        gc.collect()
        if not args.quiet:
            print(f"{row['status']:10s} {name} {_fmt(row['seconds'], '.1f')}s {row['error'] or ''}"[:200], flush=True)
        write_json(args.out, {"torch": torch.__version__, "sj_sfn": getattr(sj_sfn, "__version__", None),
                              "settings": {k: v for k, v in vars(args).items() if k != "models"}, "fine": FINE,
                              "models": rows})
        if args.markdown:
            command = "python bench/coverage.py " + " ".join(sys.argv[1:] if argv is None else argv)
            with open(args.markdown, "w") as f:
                f.write(markdown(rows, command.strip(), len(names)))
    print(table(rows))
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
