"""Throughput of the neuron forward: CuPy kernel vs torch reference vs SpikingJelly's IFNode.

For each size ``n`` (elements per step, 2^16 .. 2^28) and each ``T``, times one multi-step
forward ``[T, n] -> [T, n]`` of

* ``cupy``   the fused SFN kernel (CUDA only; needs CuPy),
* ``torch``  the torch implementation the dispatcher uses without CuPy (the reference's
             operations, in place, without autograd) on the same device,
* ``reference``  ``sj_sfn.functional.sfn_multi_step`` itself (the truth, autograd-ready),
* ``sj_if``  SpikingJelly's ``IFNode`` in step mode ``'m'`` at the same ``T``,

and reports elements/s (``T·n / time``) and effective bandwidth: the bytes a fused forward
must move, ``T·n·(read x + write spike) + n·(read v + write v)``, over the time (the same
byte count for all three, so the numbers compare). On CUDA the device's copy bandwidth
(``dst.copy_(src)``) is measured too and every result is shown as a fraction of it.

    python bench/neuron_kernels.py                       # CUDA if present, else CPU (up to 2^24)
    python bench/neuron_kernels.py --device cpu --max-log2 20 --steps 1 4 --out cpu.json
    python bench/neuron_kernels.py --dtype float16 --quiet --out gpu.json

Sizes that do not fit in (a fraction of) the device's free memory are skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sj_sfn  # noqa: E402
from sj_sfn import functional as F  # noqa: E402
from sj_sfn import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, min_time: float, max_reps: int) -> float:
    """Median seconds per call after two warm-up calls (compilation, allocator)."""
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, min_time: float) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, min_time, 50)
    return 2 * nbytes / t


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def _runners(neuron: str, device: torch.device, dtype: torch.dtype, steps: int, n: int, cupy_ok: bool):
    """``{name: (callable, peak bytes estimate)}`` for one configuration."""
    from spikingjelly.activation_based import functional as sjf
    from spikingjelly.activation_based import neuron as sjn

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(steps, n, generator=g, device=device).to(dtype)
    v = torch.zeros(n, device=device)
    tp, tn, lam = torch.tensor(1.0, device=device), torch.tensor(0.8, device=device), torch.tensor(0.1, device=device)
    size = x.element_size()
    # reference: per step ~8 float32 temporaries of n plus the stacked outputs
    ref_bytes = steps * n * 2 * size + n * 4 * 10 + steps * n * 4
    fused_bytes = steps * n * 2 * size + n * 8

    def run(backend):
        if neuron == "mtn":
            return lambda: ops.mtn(x, v, 0.1, 32, backend=backend)
        return lambda: ops.sfn(x, v, tp, tn, lam, 32, backend=backend)

    def reference():
        if neuron == "mtn":
            return F.mtn_multi_step(x, v, 0.1, 32)
        return F.sfn_multi_step(x, v, tp, tn, lam, 32)

    out = {}
    if cupy_ok and device.type == "cuda" and dtype in sj_sfn.cuda.KERNEL_DTYPES:
        out["cupy"] = (run("cupy"), fused_bytes)
    out["torch"] = (run("torch"), ref_bytes)
    out["reference"] = (reference, ref_bytes)
    if_node = sjn.IFNode(v_threshold=0.1, v_reset=None, step_mode="m")

    def sj_if():
        sjf.reset_net(if_node)
        return if_node(x)

    out["sj_if"] = (sj_if, ref_bytes)
    return out, x, v, (tp, tn, lam)


def _parity(neuron: str, x: torch.Tensor, v: torch.Tensor, th) -> bool:
    """The kernel's output equals the reference's on this input (float32: bit for bit)."""
    tp, tn, lam = th
    if neuron == "mtn":
        a, b = ops.mtn(x, v, 0.1, 32, backend="cupy"), F.mtn_multi_step(x, v, 0.1, 32)
    else:
        a, b = ops.sfn(x, v, tp, tn, lam, 32, backend="cupy"), ops.sfn(x, v, tp, tn, lam, 32, backend="torch")
    return bool(torch.equal(a.spike_seq, b.spike_seq) and torch.equal(a.v, b.v))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--neuron", choices=("sfn", "mtn"), default="sfn", help="signed per-tensor SFN (default) or MTN")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="time steps T (default: 1 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["float32"])
    p.add_argument("--min-log2", type=int, default=16)
    p.add_argument("--max-log2", type=int, default=None, help="largest size 2^k per step (default: 28 on CUDA, 24 on CPU)")
    p.add_argument("--step-log2", type=int, default=2, help="size increment in powers of two (default 2)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per point (at least 3 calls)")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--memory-fraction", type=float, default=0.6, help="skip sizes needing more than this of free memory")
    p.add_argument("--impl", nargs="+", choices=("cupy", "torch", "reference", "sj_if"), default=None, help="only these implementations")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU: stable timings on a shared machine)")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new points after this many seconds")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    max_log2 = args.max_log2 if args.max_log2 is not None else (28 if device.type == "cuda" else 24)
    if not 1 <= args.min_log2 <= max_log2 <= 34:
        p.error(f"need 1 <= --min-log2 <= --max-log2 <= 34, got {args.min_log2}, {max_log2}")
    torch.set_grad_enabled(False)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    cupy_ok, cupy_why = sj_sfn.cuda.cupy_status() if device.type == "cuda" else (False, "CPU run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"device {device} ({name}); implementation: {sj_sfn.implementation(device)}")

    bw = None
    if device.type == "cuda":
        bw = copy_bandwidth(device, min(1 << 30, _free_bytes(device) // 8), args.min_time)
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s")

    results, parity = [], {}
    sizes = list(range(args.min_log2, max_log2 + 1, args.step_log2))
    t_start, stopped = time.perf_counter(), False
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for steps in args.steps:
            for k in sizes:
                if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                    if not stopped:
                        log(f"time budget of {args.time_budget:.0f} s used up: skipping the remaining points")
                    stopped = True
                    continue
                n = 1 << k
                runners, x, v, th = _runners(args.neuron, device, dtype, steps, n, cupy_ok)
                if "cupy" in runners and (dtype_name, steps) not in parity:
                    parity[(dtype_name, steps)] = _parity(args.neuron, x, v, th)
                    log(f"parity {dtype_name} T={steps}: {'ok' if parity[(dtype_name, steps)] else 'MISMATCH'}")
                moved = steps * n * 2 * x.element_size() + n * 8
                for impl, (fn, need) in runners.items():
                    if args.impl and impl not in args.impl:
                        continue
                    if need > args.memory_fraction * _free_bytes(device):
                        log(f"skip {impl} 2^{k} T={steps}: needs ~{need / 2**30:.1f} GiB")
                        continue
                    t = _time(fn, device, args.min_time, args.max_reps)
                    row = {
                        "impl": impl, "neuron": args.neuron, "dtype": dtype_name, "steps": steps, "log2_n": k, "n": n,
                        "seconds": t, "elements_per_s": steps * n / t, "gbytes_per_s": moved / t / 1e9,
                        "fraction_of_copy": None if bw is None else moved / t / bw,
                    }  # fmt: skip
                    results.append(row)
                    log(f"{impl:9s} {dtype_name} T={steps} 2^{k}: {t * 1e3:.3f} ms, {row['gbytes_per_s']:.1f} GB/s")
                del runners, x, v
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    by_key = {(r["dtype"], r["steps"], r["log2_n"], r["impl"]): r for r in results}
    for r in results:
        base = by_key.get((r["dtype"], r["steps"], r["log2_n"], "reference"))
        r["speedup_vs_reference"] = None if base is None else base["seconds"] / r["seconds"]

    header = f"{'impl':9s} {'dtype':8s} {'T':>3s} {'n':>6s} {'ms':>10s} {'Gelem/s':>9s} {'GB/s':>8s} {'copy%':>6s} {'vs ref':>7s}"
    print(f"# {args.neuron.upper()} forward on {device} ({name})" + (f", copy bandwidth {bw / 1e9:.0f} GB/s" if bw else ""))
    print(header)
    for r in sorted(results, key=lambda r: (r["dtype"], r["steps"], r["log2_n"], r["impl"])):
        frac = "" if r["fraction_of_copy"] is None else f"{100 * r['fraction_of_copy']:.0f}"
        speed = "" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}"
        print(
            f"{r['impl']:9s} {r['dtype']:8s} {r['steps']:3d} {'2^' + str(r['log2_n']):>6s} {r['seconds'] * 1e3:10.3f} "
            f"{r['elements_per_s'] / 1e9:9.3f} {r['gbytes_per_s']:8.1f} {frac:>6s} {speed:>7s}"
        )
    report = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "cupy": cupy_why, "copy_bandwidth_bytes_per_s": bw, "neuron": args.neuron, "threads": torch.get_num_threads(),
        "parity": {f"{d} T={t}": ok for (d, t), ok in parity.items()},
        "bytes_model": "T*n*(x read + spike write) + n*(v read + v write)",
        "complete": not stopped,
        "results": results,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.out}")
    if parity and not all(parity.values()):
        print("ERROR: the kernel's output differs from the reference", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
