"""``sj-sfn demo``: the front page's demo (:func:`sj_sfn.demo.run_demo`) from the command line."""

from __future__ import annotations

import argparse
import os

from ..demo import DEMO_CACHE, run_demo
from ..io import check_output_dir
from .common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train a small CNN and ViT on digits, convert at T=1, tune λ, print the table",
                       description="Train (or load from the cache) a small CNN and ViT, convert both to one-timestep SNNs, tune λ "
                                   "with a few Ax trials on the validation split and compare with SpikingJelly's IF rate coding.")
    d.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits", help="bundled data set (default digits)")
    d.add_argument("--models", default="cnn,vit", help="comma-separated subset of cnn,vit")
    d.add_argument("--trials", type=positive_int, default=8, help="Ax trials per model (default 8)")
    d.add_argument("--epochs", type=float, default=1.0, help="scale the training epochs (e.g. 0.2 for a smoke test)")
    d.add_argument("--cache", default=None, help=f"trained-model cache (default {DEMO_CACHE})")
    d.add_argument("--out", default=os.path.join("runs", "demo"), help="where the JSON and λ plots go (default runs/demo)")
    d.add_argument("--retrain", action="store_true", help="ignore the cache")
    d.add_argument("--max-if-steps", type=positive_int, default=256, help="largest T tried for IF rate coding")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", "-q", action="store_true", help="only the table")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    check_output_dir(args.cache or DEMO_CACHE, "--cache")
    return run_demo(args)
