"""Train a detector with an SFN-convertible backbone (the backbone trains as the ANN).

    python detection/train.py detection/configs/shapes/mask-rcnn_sformer-vit-tiny_shapes.py \\
        --data-root data/shapes --work-dir work/shapes-vit

mmengine validates after the last epoch with the backbone in eval mode, i.e. as the T=1 SNN
calibrated from ``backbone.snn.calib`` (``--no-validate`` skips that).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    from mmengine.config import DictAction

    from sj_sfn.io import check_output_dir
    from sj_sfn.mmdet import tools

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--data-root", help="COCO-format data root (replaces the config's)")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--epochs", type=int, help="train this many epochs (the LR schedule and checkpoint interval follow)")
    ap.add_argument("--no-validate", action="store_true", help="skip validation after training")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, help="key=value overrides of the config")
    args = ap.parse_args(argv)
    check_output_dir(args.work_dir, "--work-dir")  # before any work
    cfg = tools.load_config(args.config, data_root=args.data_root, cfg_options=args.cfg_options, work_dir=args.work_dir)
    if args.epochs is not None:
        tools.set_epochs(cfg, args.epochs)
    runner = tools.train(cfg, validate=not args.no_validate, quiet=False)
    print(f"checkpoints in {runner.work_dir}")


if __name__ == "__main__":
    from sj_sfn.cli import run_guarded

    sys.exit(run_guarded(f"detection/{os.path.basename(__file__)}", main))
