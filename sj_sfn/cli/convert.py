"""``sj-sfn convert MODEL --checkpoint ANN --data DATA --out SNN``: calibrate, set or tune λ, save the T=1 SNN."""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

from ..calibration.budget import DEFAULT_LEVEL_SETS, LEVEL_SETS
from ..conversion import DEFAULT_ENERGY_BUDGET, convert
from ..data import BUNDLED_DATA, data_config, data_info, load_data
from ..distributed import init_from_env, is_main
from ..evaluation import evaluate
from ..io import save_converted
from ..report import report
from ..tune import current_lams
from ..version import __version__
from ..zoo import build_model
from . import common, text_models
from .common import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert a trained ANN (timm, torchvision:NAME, zoo:NAME, a Hugging Face directory) into a T=1 SNN",
                       description="Calibrate SFN thresholds on the training data (for the energy budget, or the paper's "
                                   "quantile with --lam), optionally tune λ on a validation split, and save the SNN. "
                                   "A local Hugging Face model directory takes a text file as --data (one text per line).")
    c.add_argument("model", metavar="MODEL", help="timm model name, torchvision:NAME, zoo:NAME, or a local Hugging Face "
                                                   "model directory (config.json, weights, tokenizer)")
    c.add_argument("--checkpoint", default=None, help="the ANN's weights (state_dict or a training checkpoint)")
    c.add_argument("--allow-random-weights", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--data", required=True, help="digits, fashion-mnist or an ImageFolder directory; for a Hugging Face "
                                                  "model a text file (one text per line) or a directory of .txt files")
    lam = c.add_mutually_exclusive_group()
    lam.add_argument("--lam", type=common.lam, default=None,
                     help="λ with the paper's quantile calibration (default: none, the energy-budget calibration)")
    lam.add_argument("--tune", action="store_true", help="tune λ with Ax on the validation split")
    c.add_argument("--out", required=True, help="converted model file (.pth)")
    c.add_argument("--max-spikes", "-N", type=common.positive_int, default=32, help="N, spikes per sign and step (default 32)")
    c.add_argument("--energy-budget", type=common.positive_float, default=DEFAULT_ENERGY_BUDGET,
                   help=f"target energy ratio E_SNN/E_ANN of the default calibration (default {DEFAULT_ENERGY_BUDGET})")
    c.add_argument("--level-sets", nargs="+", choices=LEVEL_SETS + ("all",), default=None,
                   help="level sets each site may take in the energy-budget calibration (default: "
                        f"{' '.join(DEFAULT_LEVEL_SETS)})")
    c.add_argument("--reconstruct", type=common.non_negative_int, default=None, metavar="STEPS",
                   help="steps of output reconstruction after the thresholds (default: 100 with the energy budget, "
                        "none with --lam; 0: none, the weights stay the ANN's)")
    c.add_argument("--max-length", type=common.positive_int, default=128, help="Hugging Face models: tokens per text (default 128)")
    c.add_argument("--p", type=common.quantile, default=0.99, help="calibration quantile in (0, 1] (default 0.99)")
    c.add_argument("--per-channel", action="store_true", help="per-channel thresholds")
    off = c.add_mutually_exclusive_group()
    off.add_argument("--offset", type=common.offset, default=None,
                     help="threshold offset in [0, 1) (default: the converter's, 0.5 = round, 0 = floor)")
    off.add_argument("--v-init", type=common.offset, default=None, dest="v_init", help="deprecated name of --offset")
    c.add_argument("--calib-samples", type=common.positive_int, default=None, help="calibration images (default: all, 1024 for folders)")
    c.add_argument("--test-samples", type=common.positive_int, default=None, help="cap the test split for --eval")
    c.add_argument("--num-classes", type=common.positive_int, default=None, help="override the number of classes")
    c.add_argument("--img-size", type=common.positive_int, default=None, help="input size for models that take one")
    c.add_argument("--eval", action="store_true", help="also report ANN/SNN test accuracy and energy")
    c.add_argument("--plot", default=None, help="with --tune: λ plot (PNG)")
    common.add_common(c)
    common.add_tune_options(c)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.check_outputs(args, "out", "json", "plot")  # before any work: a bad path must not cost a conversion
    if text_models.is_hf_directory(args.model):
        return text_models.run_convert(args, common)
    if args.v_init is not None:
        warnings.warn("--v-init is deprecated: use --offset (the same threshold offset)", DeprecationWarning, stacklevel=2)
        common.log(args, "note: --v-init is deprecated, use --offset")
        args.offset = args.v_init
    dist_on = init_from_env()
    num_classes, in_chans, img_size = data_info(args.data)
    num_classes = args.num_classes or num_classes
    img_size = args.img_size or img_size
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    ann = build_model(args.model, num_classes, in_chans, img_size)
    if args.checkpoint:
        common.load_ann(ann, args.checkpoint, args.model, args.trust_checkpoint)
    elif not args.allow_random_weights:
        raise UserError("--checkpoint is required (the ANN's trained weights); --allow-random-weights skips it for smoke tests")
    ann.eval()
    device = common.device_of(args, dist_on)
    if device:
        ann.to(device)
    config = data_config(ann, args.model) if args.data not in BUNDLED_DATA else None
    d = load_data(args.data, args.batch_size, args.calib_samples, args.val_samples, args.test_samples, ann, args.model,
                  args.img_size, args.workers, args.seed, distributed=dist_on, config=config)
    common.log(args, f"data: {d.note}")
    common.check_model_accepts(ann, d.calib, args, device)
    # λ and the offset left unset take the converter's per-family defaults (CNN / SFormer)
    ck = {"lam": args.lam, "max_spikes": args.max_spikes, "p": args.p, "per_channel": args.per_channel, "offset": args.offset}
    ck = {k: v for k, v in ck.items() if v is not None}
    budget = {} if args.lam is not None else {"energy_budget": args.energy_budget, "level_sets": common.level_sets(args)}
    t0 = time.perf_counter()
    try:
        snn = convert(ann, d.calib, device=device, progress=not args.quiet, **ck, **common.reconstruct_kwargs(args), **budget)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"cannot convert {args.model}: {str(e).splitlines()[0]}") from e
    t_conv = time.perf_counter() - t0
    lams = current_lams(snn)
    if "lam" not in ck and lams and len(set(lams.values())) == 1:
        ck["lam"] = next(iter(lams.values()))  # the converter's default
    tune_info = None
    if args.tune:
        res = common.tune(args, snn, d.val, ann if args.energy_vs_ann else None, device)
        res.apply(snn)
        tune_info = res.to_dict()
        ck["lam"] = res.best_lam
        if args.plot and is_main():
            res.plot(args.plot)
        common.log(args, res.table())
    meta = {
        "model": args.model, "model_kwargs": {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size},
        "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None, "data": args.data,
        "convert_kwargs": ck, "input_shape": list(common.sample_shape(d.calib)), "data_config": config,
        "lams": current_lams(snn), "tune": tune_info, "version": __version__,
    }
    summary = {"out": os.path.abspath(args.out), "model": args.model, "lam": ck.get("lam"), "max_spikes": args.max_spikes,
               "p": args.p, "convert_seconds": t_conv, "sites": len(meta["lams"]), "tuned": args.tune}
    # what was converted and what stays analog, measured on one calibration batch
    try:
        rep = report(snn, ann, d.calib, num_batches=1, device=device)
    except (ValueError, RuntimeError) as e:  # the report must not cost the conversion: without the measurement
        common.log(args, f"note: the conversion report could not measure energy ({str(e).splitlines()[0]})")
        rep = report(snn)
    common.log(args, str(rep))
    summary["conversion_path"] = rep.path
    summary["report"] = rep.to_dict()
    if is_main():
        save_converted(args.out, snn.cpu() if device else snn, meta)
    if args.eval:
        summary.update(evaluate(snn.to(device) if device else snn, d.test, ann, device))
    common.write_json_main(args.json, summary)
    if is_main():
        print(json.dumps({k: v for k, v in summary.items() if k not in ("firing_rates", "report")},
                         indent=None if args.quiet else 2))
    return 0
