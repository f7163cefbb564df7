"""``sj-sfn tune CONVERTED``: Bayesian optimisation of λ of a converted model on the validation split."""

from __future__ import annotations

import argparse
import json

from ..data import load_data
from ..distributed import init_from_env, is_main
from ..io import converted_data_config, load_converted, save_converted
from ..tune import current_lams
from . import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tune", help="tune λ of a converted model with Ax on the validation split",
                       description="Bayesian optimisation of λ (accuracy, accuracy − β·energy, or a Pareto front).")
    common.add_converted_input(t, "the ANN's weights (for --energy-vs-ann)")
    t.add_argument("--out", default=None, help="write the model with the chosen λ here")
    t.add_argument("--plot", default=None, help="λ plot (PNG)")
    common.add_common(t)
    common.add_tune_options(t)
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.check_outputs(args, "out", "json", "plot")  # before any work: a bad path must not cost the search
    dist_on = init_from_env()
    device = common.device_of(args, dist_on)
    snn, meta = load_converted(args.snn, device)
    data = args.data or meta.get("data")
    ann = common.ann_for(meta, args.checkpoint, device, args.trust_checkpoint) if args.energy_vs_ann else None
    mk = meta["model_kwargs"]
    d = load_data(data, args.batch_size, None, args.val_samples, None, ann, meta["model"], mk.get("img_size"), args.workers,
                  args.seed, distributed=dist_on, config=converted_data_config(meta, data, ann))
    common.check_input_shape(d.val, meta, data, args.snn)
    common.log(args, f"data: {d.note}")
    res = common.tune(args, snn, d.val, ann, device)
    common.log(args, res.table())
    if args.json and is_main():
        res.to_json(args.json)
    if args.plot and is_main():
        res.plot(args.plot)
    if args.out and is_main():
        res.apply(snn)
        meta = {k: v for k, v in meta.items() if k not in ("format", "state_dict")}
        meta["convert_kwargs"] = {**meta["convert_kwargs"], "lam": res.best_lam}
        meta.update(lams=current_lams(snn), tune=res.to_dict())
        save_converted(args.out, snn.cpu() if device else snn, meta)
    if not is_main():
        return 0
    b = res.best
    print(json.dumps({"best_lam": res.best_lam, "best_group_lams": res.best_group_lams, "val_accuracy": b.metric,
                      "energy_ratio": b.energy_ratio, "trials": len(res.trials), "failed": res.failed,
                      "seconds": res.seconds}))
    return 0
