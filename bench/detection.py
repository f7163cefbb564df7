"""Detection benchmark: ANN vs T=1 SNN Mask R-CNN on the generated shapes data set.

For each backbone (tiny SFormerViT, tiny timm ResNet): generate the data set (train / val /
test splits), train the ANN detector with mmengine's Runner, convert the backbone trunk
(λ given, or tuned with ``sj_sfn.tune.tune_lambda`` on COCO bbox mAP of the val split), and
report on the test split: bbox/segm AP of the ANN and the SNN, the backbone energy ratio
E_SNN/E_ANN, and CPU inference time (whole detector and backbone trunk alone, SNN/ANN).

    python bench/detection.py --out runs/detection.json [--tune 8] [--epochs 16]

Prints a table and writes JSON. Timings are wall-clock on the CPU: noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "vit": os.path.join(HERE, "..", "detection", "configs", "shapes", "mask-rcnn_sformer-vit-tiny_shapes.py"),
    "cnn": os.path.join(HERE, "..", "detection", "configs", "shapes", "mask-rcnn_sfn-resnet-tiny_shapes.py"),
}


DEFAULT_LAM = {"vit": 0.1, "cnn": 0.05}
# the from-scratch tiny ViT needs more epochs than the ResNet (the shapes test fixtures use the same)
DEFAULT_EPOCHS = {"vit": 40, "cnn": 16}


def _use_test_split(cfg, root: str) -> None:
    cfg.test_dataloader = dict(cfg.val_dataloader)
    ds = dict(cfg.test_dataloader["dataset"])
    ds.update(ann_file="annotations/test.json", data_prefix=dict(img="test/"))
    cfg.test_dataloader["dataset"] = ds
    cfg.test_evaluator = dict(cfg.val_evaluator)
    cfg.test_evaluator["ann_file"] = os.path.join(root, "annotations", "test.json")


def _trunk_time(bb, x, mode: str, repeats: int) -> float:
    import torch

    bb.set_run_as(mode)
    bb.eval()
    times = []
    with torch.no_grad():
        bb(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            bb(x)
            times.append(time.perf_counter() - t0)
    bb.set_run_as("auto")
    return statistics.median(times)


def run_one(name: str, root: str, work: str, args) -> dict:
    import torch

    from sj_sfn.mmdet import tools

    torch.manual_seed(args.seed)
    cfg = tools.load_config(CONFIGS[name], data_root=root, work_dir=os.path.join(work, name))
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    tools.set_epochs(cfg, epochs)
    cfg.randomness = dict(seed=args.seed)
    _use_test_split(cfg, root)
    t0 = time.perf_counter()
    tools.train(cfg, validate=False)
    train_s = time.perf_counter() - t0
    model = tools.build_detector(cfg, os.path.join(work, name, f"epoch_{epochs}.pth"))
    calib = tools.calib_loader_from_cfg(cfg, "train", args.calib_images, 4, model=model)
    tools.convert_detector(model, calib, lam=args.lam if args.lam is not None else DEFAULT_LAM[name])
    tune = None
    if args.tune:
        val = tools.calib_loader_from_cfg(cfg, "val", 8, 4, model=model)
        res = tools.tune_detector_lambda(model, cfg, val, split="val", metric="bbox_mAP", trials=args.tune)
        tune = {"best_lam": float(res.best_lam), "trials": len(res.trials)}
    bb = tools.spiking_backbone(model)
    ann = tools.evaluate(model, cfg, "test", run_as_mode="ann")
    snn = tools.evaluate(model, cfg, "test", run_as_mode="snn")
    test_inputs = tools.calib_loader_from_cfg(cfg, "test", args.energy_images, 4, model=model)
    energy = tools.backbone_energy(model, test_inputs)
    x = next(iter(test_inputs))
    trunk_ann = _trunk_time(bb, x, "ann", args.repeats)
    trunk_snn = _trunk_time(bb, x, "snn", args.repeats)
    return {
        "backbone": name,
        "epochs": epochs,
        "lam": bb.snn_cfg["lam"],
        "max_spikes": bb.snn_cfg["max_spikes"],
        "tune": tune,
        "train_seconds": train_s,
        "ann": ann,
        "snn": snn,
        "delta_bbox_AP": 100 * (snn["bbox_mAP"] - ann["bbox_mAP"]),
        "delta_segm_AP": 100 * (snn["segm_mAP"] - ann["segm_mAP"]),
        "energy_ratio": energy.ratio,
        "event_ratio": energy.event_ratio,
        "energy": energy.to_dict(),
        "detector_time_ratio": snn["seconds_per_image"] / ann["seconds_per_image"],
        "trunk_seconds": {"ann": trunk_ann, "snn": trunk_snn},
        "trunk_time_ratio": trunk_snn / trunk_ann,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/detection.json")
    ap.add_argument("--backbones", default="vit,cnn")
    ap.add_argument("--epochs", type=int, help=f"training epochs (default per backbone: {DEFAULT_EPOCHS})")
    ap.add_argument("--train-images", type=int, default=64)
    ap.add_argument("--val-images", type=int, default=48, help="validation images (λ tuning); fewer make the tuned λ noisy")
    ap.add_argument("--test-images", type=int, default=48)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--lam", type=float, help=f"λ for conversion (default per backbone: {DEFAULT_LAM}); --tune then searches")
    ap.add_argument("--tune", type=int, default=0, help="tune λ with this many trials on the val split (0: no)")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--energy-images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir")
    args = ap.parse_args(argv)

    import torch

    from sj_sfn.mmdet.synthetic import make_shapes_dataset

    torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="sj-sfn-det-")
    root = os.path.join(work, "shapes")
    make_shapes_dataset(root, {"train": args.train_images, "val": args.val_images, "test": args.test_images},
                        image_size=args.image_size, seed=args.seed)
    results = [run_one(name, root, work, args) for name in args.backbones.split(",")]

    trained = ", ".join(f"{r['backbone']} {r['epochs']}" for r in results)
    print(f"\nMask R-CNN on the shapes data set ({args.test_images} test images, {args.image_size} px), T=1, "
          f"epochs {trained}; CPU, {args.threads} threads")
    head = f"{'backbone':<9}{'λ':>7}{'bbox AP ANN':>13}{'SNN':>7}{'Δ':>7}{'segm AP ANN':>13}{'SNN':>7}{'Δ':>7}" \
           f"{'E ratio':>9}{'t det':>8}{'t trunk':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['backbone']:<9}{r['lam']:>7.3g}{100 * r['ann']['bbox_mAP']:>13.1f}{100 * r['snn']['bbox_mAP']:>7.1f}"
              f"{r['delta_bbox_AP']:>+7.1f}{100 * r['ann']['segm_mAP']:>13.1f}{100 * r['snn']['segm_mAP']:>7.1f}"
              f"{r['delta_segm_AP']:>+7.1f}{r['energy_ratio']:>9.3f}{r['detector_time_ratio']:>7.2f}x{r['trunk_time_ratio']:>8.2f}x")
    print("AP in points (×100); Δ = SNN − ANN; E ratio = backbone E_SNN/E_ANN (0.9 pJ/AC, 4.6 pJ/MAC); "
          "t = CPU time SNN/ANN (whole detector per image, backbone trunk alone)")
    out = {"args": vars(args), "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
