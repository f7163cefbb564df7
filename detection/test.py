"""Evaluate the ANN and the T=1 SNN of a converted detector side by side (COCO bbox/segm AP, energy, time).

    python detection/test.py CONFIG SNN.pth --data-root data/coco [--split val] [--json out.json]

``SNN.pth`` is what ``detection/convert.py`` wrote: it holds both trunks, so one checkpoint
gives both columns. The energy ratio is the backbone trunk's (E_SNN / E_ANN, 0.9 pJ per AC,
4.6 pJ per MAC) on ``--energy-images`` images of the split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROWS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "seconds_per_image")


def _summary(values: list):
    """One value when every SFN site agrees, else ``[min, max]`` over the sites."""
    if not values:
        from sj_sfn.utils import UserError

        raise UserError("the SNN trunk has no SFN sites")
    lo, hi = min(values), max(values)
    return lo if lo == hi else [lo, hi]


def _fmt(v) -> str:
    return f"{v[0]:.4g}–{v[1]:.4g}" if isinstance(v, list) else f"{v:.4g}"


def main(argv: list[str] | None = None) -> dict:
    from mmengine.config import DictAction

    from sj_sfn.io import check_output_path
    from sj_sfn.mmdet import tools
    from sj_sfn.utils import UserError, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("checkpoint", help="converted checkpoint (detection/convert.py)")
    ap.add_argument("--data-root")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--energy-images", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = ap.parse_args(argv)

    if args.json:
        check_output_path(args.json, "--json")  # before the evaluation, not after it
    cfg = tools.load_config(args.config, data_root=args.data_root, cfg_options=args.cfg_options)
    model = tools.build_detector(cfg, args.checkpoint, device=args.device)
    bb = tools.spiking_backbone(model)
    if bb.snn_cfg is None or not bb.is_snn_ready:
        raise UserError(f"{args.checkpoint} holds no calibrated SNN trunk: convert it first with detection/convert.py")
    res = {"ann": tools.evaluate(model, cfg, args.split, run_as_mode="ann"),
           "snn": tools.evaluate(model, cfg, args.split, run_as_mode="snn")}
    energy = tools.backbone_energy(model, tools.calib_loader_from_cfg(cfg, args.split, args.energy_images, 1, model=model))
    res["energy"] = energy.to_dict()
    res["energy_ratio"] = energy.ratio
    # λ and N as the loaded SNN trunk runs them (convert.py --lam/--tune/--max-spikes may differ from the config)
    sites = bb.snn_site_settings()
    res["lam"], res["max_spikes"] = _summary(sites["lam"]), _summary(sites["max_spikes"])
    print(f"{'metric':<20}{'ANN':>10}{'SNN T=1':>10}")
    for k in ROWS:
        if k in res["ann"]:
            print(f"{k:<20}{res['ann'][k]:>10.3f}{res['snn'][k]:>10.3f}")
    print(f"backbone energy ratio E_SNN/E_ANN = {energy.ratio:.3f}  (λ={_fmt(res['lam'])}, N={_fmt(res['max_spikes'])})")
    if args.json:
        write_json(args.json, json.loads(json.dumps(res, default=float)))
    return res


if __name__ == "__main__":
    from sj_sfn.cli import run_guarded

    sys.exit(run_guarded(f"detection/{os.path.basename(__file__)}", main))
