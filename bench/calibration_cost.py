"""Calibration cost: SFN conversion of a ResNet-18 on N images at 224 px vs the plain ANN forward.

Each measurement runs in its own process so that the peak resident memory (``ru_maxrss``) belongs
to it alone. Inputs are generated batch by batch (seeded random images; the statistics' memory
does not depend on content), so the data never sits in memory as a whole.

    python bench/calibration_cost.py --images 2000 --batch 50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _loader(n: int, batch: int, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        yield torch.randn(b, 3, size, size, generator=g), torch.zeros(b, dtype=torch.long)


class _Loader:
    def __init__(self, n, batch, size):
        self.n, self.batch, self.size = n, batch, size

    def __iter__(self):
        return _loader(self.n, self.batch, self.size)

    def __len__(self):
        return (self.n + self.batch - 1) // self.batch


def _child(mode: str, n: int, batch: int, size: int, threads: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet18().eval()
    loader = _Loader(n, batch, size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "ann":
        with torch.no_grad():
            for x, _ in loader:
                model(x)
    else:
        from sj_sfn import convert

        convert(model, loader, max_spikes=32, progress=False)
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "seconds": dt, "peak_rss_mb": rss1 / 1024, "rss_before_mb": rss0 / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/calibration_cost.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.images, args.batch, args.size, args.threads)))
        return
    res = {"images": args.images, "batch": args.batch, "size": args.size, "threads": args.threads}
    for mode in ("ann", "calibrate"):
        cmd = [sys.executable, __file__, "--child", mode, "--images", str(args.images), "--batch", str(args.batch),
               "--size", str(args.size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(res[mode])
    res["time_overhead"] = res["calibrate"]["seconds"] / res["ann"]["seconds"] - 1
    res["peak_rss_extra_mb"] = res["calibrate"]["peak_rss_mb"] - res["ann"]["peak_rss_mb"]
    print(f"ResNet-18, {args.images} images at {args.size} px, batch {args.batch}, {args.threads} thread(s):")
    print(f"  ANN forward      {res['ann']['seconds']:.1f} s, peak RSS {res['ann']['peak_rss_mb']:.0f} MB")
    print(f"  SFN conversion   {res['calibrate']['seconds']:.1f} s (trace + fuse + calibrate + replace), "
          f"peak RSS {res['calibrate']['peak_rss_mb']:.0f} MB")
    print(f"  overhead: time {100 * res['time_overhead']:+.1f}%, peak memory {res['peak_rss_extra_mb']:+.0f} MB")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
