"""Which popular timm and torchvision models ``sj_sfn.convert`` converts, refuses, or fails on.

For the smallest variant of each family (random weights, no download), on CPU with one thread:

1. builds the model at its own input size and draws a batch of ``--batch`` random images (seeded);
2. ``sj_sfn.convert(model, [x], progress=False)`` with the defaults (energy budget 0.35), and
   classifies the outcome: ``converted``; ``refused`` — a ``TypeError``/``ValueError``/
   ``NotImplementedError`` raised by sj_sfn itself, with the error's first line; ``error`` —
   anything else (an exception from deep inside torch or timm: a bug to fix, or a refusal missing);
3. for a converted model: the relative L2 error of the SNN's output to the ANN's
   (``‖y_snn − y_ann‖/‖y_ann‖``, random weights: a check of the plumbing, not of accuracy), the
   number of SFN sites, the conversion path, and — when the first conversion took less than
   ``--fine-max-s`` seconds — the same error at fine resolution (``calibration='quantile'``,
   ``λ = 1e-3``, ``N = 4096``), which must be small when every site is placed correctly. The fine
   conversion is also tried after an ``error`` of the default one: a fine error there means the
   sites work and the failure is in the energy-budget allocation.

Random weights: a Linear whose weight is all zero (torchvision's ViT head) is drawn ``N(0, 1/fan_in)``
so that the output, and the error measured on it, is not zero.

Prints a table and writes JSON (``--out``, default ``runs/coverage.json``; rewritten after each model).

    python bench/coverage.py                       # all families (tens of minutes on one core)
    python bench/coverage.py --models levit_128s tv:vit_b_16 --quiet
"""

from __future__ import annotations

import argparse
import gc
import os
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
FINE = {"lam": 1e-3, "max_spikes": 4096, "calibration": "quantile"}


def build(name: str) -> tuple[torch.nn.Module, int]:
    """The model with random weights (no download; zero-initialised Linears redrawn) and its input size."""
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


@torch.no_grad()
def run_one(name: str, family: str, batch: int, max_params: float, fine_max_s: float, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "family": family, "status": None, "error": None, "where": None, "params_m": None,
                           "path": None, "sites": None, "rel_err": None, "fine_rel_err": None, "seconds": None}
    t0 = time.perf_counter()
    try:
        model, size = build(name)
    except Exception as e:  # not registered in this timm/torchvision
        row.update(status="unavailable", error=_first_line(e))
        return row
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if row["params_m"] > max_params:
        row.update(status="skipped", error=f"{row['params_m']} M parameters > --max-params {max_params}")
        return row
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    y = model(x)
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
    del snn
    if took < fine_max_s:
        try:
            fine = sj_sfn.convert(model, [x], progress=False, **FINE)
            row["fine_rel_err"] = _rel(fine(x), y)
        except Exception as e:
            row["error"] = "fine resolution: " + _first_line(e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':34s} {'family':26s} {'M':>6s} {'status':10s} {'path':14s} {'sites':>5s} {'rel err':>8s} {'fine':>8s} {'s':>6s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:34s} {r['family'][:26]:26s} {_fmt(r['params_m'], '6.1f')} {r['status']:10s} {str(r['path'] or '-'):14s} "
            f"{_fmt(r['sites'], '5d')} {_fmt(r['rel_err'], '8.3f')} {_fmt(r['fine_rel_err'], '8.1e')} {_fmt(r['seconds'], '6.1f')}  "
            f"{(r['error'] or '')[:110]}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"  (of {len(rows)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="model names (timm, or tv:<torchvision name>); default: every family")
    ap.add_argument("--out", default="runs/coverage.json", help="JSON results (rewritten after each model)")
    ap.add_argument("--batch", type=int, default=2, help="random images per model")
    ap.add_argument("--max-params", type=float, default=100.0, help="skip models with more parameters (millions)")
    ap.add_argument("--fine-max-s", type=float, default=60.0,
                    help="measure the fine-resolution error only when the first conversion took less (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quiet", action="store_true", help="no per-model lines, only the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    families = dict(MODELS)
    names = args.models or [n for n, _ in MODELS]
    rows = []
    for name in names:
        row = run_one(name, families.get(name, "-"), args.batch, args.max_params, args.fine_max_s, args.seed)
        rows.append(row)
        gc.collect()
        if not args.quiet:
            print(f"{row['status']:10s} {name} {_fmt(row['seconds'], '.1f')}s {row['error'] or ''}"[:200], flush=True)
        write_json(args.out, {"torch": torch.__version__, "sj_sfn": getattr(sj_sfn, "__version__", None),
                              "settings": {k: v for k, v in vars(args).items() if k != "models"}, "fine": FINE,
                              "models": rows})
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
