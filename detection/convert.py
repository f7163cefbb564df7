"""Convert a trained detector's backbone to a T=1 SFN network and write the SNN checkpoint.

    python detection/convert.py CONFIG ANN.pth OUT.pth --data-root data/coco \\
        [--calib-split train | --calib-dir IMAGES] [--num-images 64] [--lam 0.25 | --tune --trials 12]

Calibration images go through the config's test pipeline and the detector's own
``data_preprocessor`` (images only). ``--tune`` searches λ with ``sj_sfn.tune.tune_lambda``
using COCO mAP on the validation split as the score. The checkpoint holds the ANN and the
SNN trunk; the same config loads it straight into the SNN form (``init_detector``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> dict:
    from mmengine.config import DictAction

    from sj_sfn.io import check_output_path
    from sj_sfn.mmdet import tools
    from sj_sfn.utils import UserError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("checkpoint", help="trained ANN checkpoint (from detection/train.py)")
    ap.add_argument("out", help="where to write the SNN checkpoint")
    ap.add_argument("--data-root")
    ap.add_argument("--calib-split", default="train", choices=["train", "val"], help="calibration images from this split")
    ap.add_argument("--calib-dir", help="calibration images from this folder instead")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lam", type=float, help="λ (default: the config's snn.lam)")
    ap.add_argument("--max-spikes", type=int, help="N (default: the config's snn.max_spikes)")
    ap.add_argument("--tune", action="store_true", help="tune λ by Bayesian optimisation on the val split")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--metric", default="bbox_mAP", help="COCO metric maximised by --tune (bbox_mAP, segm_mAP, ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = ap.parse_args(argv)

    check_output_path(args.out, "out")  # before any work: a bad path must not cost a conversion
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    cfg = tools.load_config(args.config, data_root=args.data_root, cfg_options=args.cfg_options)
    snn = cfg.model.backbone.get("snn")
    if snn is None:
        raise UserError("the config's backbone has snn=None: set model.backbone.snn=dict(lam=..., max_spikes=...) to convert")
    if args.max_spikes is not None:
        snn["max_spikes"] = args.max_spikes
    if args.tune:
        try:
            tools.check_metric(cfg, args.metric)  # before any work: tuning would fail on its first trial
        except ValueError as e:
            raise UserError(f"--metric: {e}") from None
    model = tools.build_detector(cfg, args.checkpoint, device=args.device)
    loader = tools.calib_loader_from_cfg(cfg, args.calib_split, args.num_images, args.batch_size, model=model, img_dir=args.calib_dir)
    tools.convert_detector(model, loader, lam=args.lam)
    bb_cfg = tools.spiking_backbone(model).snn_cfg
    info = {"lam": bb_cfg["lam"], "max_spikes": bb_cfg["max_spikes"]}
    if args.tune:
        val = tools.calib_loader_from_cfg(cfg, "val", args.num_images, args.batch_size, model=model)
        result = tools.tune_detector_lambda(model, cfg, val, metric=args.metric, trials=args.trials, progress=True)
        info.update(lam=float(result.best_lam), tuned=True, trials=len(result.trials))
    info["energy_ratio"] = tools.backbone_energy(model, loader).ratio
    tools.save_checkpoint(model, args.out, meta={"sj_sfn_convert": info})
    print(json.dumps(info, indent=1))
    print(f"SNN checkpoint: {args.out}")
    return info


if __name__ == "__main__":
    from sj_sfn.cli import run_guarded

    sys.exit(run_guarded(f"detection/{os.path.basename(__file__)}", main))
