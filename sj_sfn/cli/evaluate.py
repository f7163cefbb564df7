"""``sj-sfn eval CONVERTED``: ANN vs SNN test accuracy and the energy ratio of a converted model."""

from __future__ import annotations

import argparse
import json
import os

from ..data import load_data
from ..distributed import init_from_env, is_main
from ..evaluation import evaluate
from ..io import converted_data_config, load_converted
from . import common, text_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="ANN vs SNN test accuracy and energy ratio of a converted model",
                       description="Evaluate a converted model (and its ANN) on the test split; JSON output.")
    common.add_converted_input(e, "the ANN's weights (default: the path recorded at conversion)")
    e.add_argument("--no-ann", action="store_true", help="evaluate the SNN only")
    e.add_argument("--test-samples", type=common.positive_int, default=None, help="cap the test split")
    common.add_common(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.check_outputs(args, "json")
    dist_on = init_from_env()
    device = common.device_of(args, dist_on)
    snn, meta = load_converted(args.snn, device)
    if meta.get("hf_task"):
        return text_models.run_eval(args, snn, meta, common)
    ann = None if args.no_ann else common.ann_for(meta, args.checkpoint, device, args.trust_checkpoint)
    data = args.data or meta.get("data")
    mk = meta["model_kwargs"]
    d = load_data(data, args.batch_size, None, None, args.test_samples, ann, meta["model"], mk.get("img_size"), args.workers,
                  args.seed, distributed=dist_on, config=converted_data_config(meta, data, ann))
    common.check_input_shape(d.test, meta, data, args.snn)
    common.log(args, f"data: {d.note}")
    out = {"snn": os.path.abspath(args.snn), "model": meta["model"], "data": data, "split": "test",
           "lam": meta["convert_kwargs"]["lam"], "max_spikes": meta["convert_kwargs"]["max_spikes"]}
    out.update(evaluate(snn, d.test, ann, device))
    common.write_json_main(args.json, out)
    if is_main():
        keys = ("ann_accuracy", "snn_accuracy", "energy_ratio", "event_ratio", "samples", "lam")
        if args.quiet:
            print(json.dumps({k: out[k] for k in keys if k in out}))
        else:
            print(json.dumps({k: v for k, v in out.items() if k != "firing_rates"}, indent=2))
    return 0
