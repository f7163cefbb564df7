"""``sj-sfn info``: versions, extras, CUDA and which neuron kernel runs on each device."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
from typing import Any

import torch

from ..data import FASHION_MNIST_ROOT
from ..ops import implementation
from ..version import __version__


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("info", help="versions, kernels (CuPy/CUDA) and extras installed")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"sj-sfn": __version__, "python": platform.python_version(), "platform": platform.platform()}
    pkgs = {}
    for p in ("torch", "torchvision", "spikingjelly", "timm", "ax-platform", "matplotlib", "scikit-learn", "scikit-image",
              "cupy-cuda13x", "cupy-cuda12x", "mmengine", "mmcv", "mmdet"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pkgs[p] = None
    info["packages"] = pkgs
    extras = {"timm": pkgs["timm"] is not None, "tune": pkgs["ax-platform"] is not None and pkgs["matplotlib"] is not None,
              "det": all(pkgs[p] for p in ("mmengine", "mmcv", "mmdet")),
              "cuda": bool(pkgs["cupy-cuda13x"] or pkgs["cupy-cuda12x"]), "data": pkgs["scikit-learn"] is not None}
    info["extras"] = extras
    info["cuda"] = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                    "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    kernels = {}
    try:
        devs = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not torch.cuda.is_available():
            devs.append("cuda")
        for dev in devs:
            impl = implementation(dev)
            kernels[dev] = {"name": impl.name, "reason": impl.reason, "unavailable": impl.unavailable, "error": impl.error,
                            "notes": list(impl.notes)}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - info must not fail
        kernels["error"] = str(e).splitlines()[0]
    info["kernels"] = kernels
    info["data"] = {"digits": extras["data"], "fashion-mnist": os.path.isdir(FASHION_MNIST_ROOT)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sj-sfn {info['sj-sfn']}  (Python {info['python']}, {info['platform']})")
    print("packages:")
    for k, v in pkgs.items():
        print(f"  {k:14s} {v or '-'}")
    print("extras: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in extras.items()))
    c = info["cuda"]
    print(f"CUDA: torch built with {c['torch_cuda']}, available={c['available']} {c['devices']}")
    print("kernels:")
    for dev, k in kernels.items():
        if dev == "error":
            print(f"  (could not query: {k})")
            continue
        why = "; ".join(f"{n}: {r}" for n, r in (k["unavailable"] or {}).items())
        print(f"  {dev:7s} -> {k['name']} ({k['reason']}){'  [' + why + ']' if why else ''}")
        if dev == "cpu":
            for note in k["notes"]:
                print(f"            {note}")
    print("data: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["data"].items())
          + ("" if info["data"]["fashion-mnist"] else "  (Fashion-MNIST: apt-get install dataset-fashion-mnist)"))
    return 0
