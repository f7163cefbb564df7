"""Compile, cache and launch the fused MTN/SFN forward kernel (``fire.cu``) with CuPy.

CuPy is imported lazily (inside functions), never when this module is imported.

One templated kernel ``sj_sfn_fire<DT, SIGNED, PER_CHANNEL, LEVELS, ONE_STEP>`` serves every
layer: thresholds, ``λ``, ``N``, the offset and the ceiling are kernel arguments. Each variant
is compiled on first use with ``cupy.RawModule`` (NVRTC, disk-cached by CuPy) and kept in a
per-process cache. :func:`compile_ptx` compiles variants to PTX with the raw NVRTC API, which
needs no GPU, so a CPU-only CI can prove that every variant compiles.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "SOURCE_FILE",
    "NVRTC_OPTIONS",
    "KERNEL_DTYPES",
    "MAX_KERNEL_COUNT",
    "Variant",
    "CompileError",
    "all_variants",
    "source",
    "compile_ptx",
    "cupy_status",
    "kernel_unsupported",
    "fire",
    "plan",
    "LaunchPlan",
]

SOURCE_FILE = "fire.cu"
KERNEL_NAME = "sj_sfn_fire"
# IEEE division and no multiply-add contraction: floor(h/θ) and h - θ·k must equal torch's.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false", "--prec-div=true", "--ftz=false")
KERNEL_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_KERNEL_COUNT = 127  # counts are written as int8
THREADS = 256


@dataclass(frozen=True)
class Variant:
    """One compiled instance of the kernel."""

    dtype: torch.dtype
    signed: bool
    per_channel: bool
    levels: bool
    one_step: bool

    @property
    def name_expression(self) -> str:
        """C++ name of the template instance, e.g. ``sj_sfn_fire<0, true, false, false, true>``."""
        flags = ", ".join("true" if f else "false" for f in (self.signed, self.per_channel, self.levels, self.one_step))
        return f"{KERNEL_NAME}<{KERNEL_DTYPES[self.dtype]}, {flags}>"

    def __str__(self) -> str:
        parts = [
            str(self.dtype).removeprefix("torch."),
            "signed" if self.signed else "positive",
            "per-channel" if self.per_channel else "per-tensor",
            "custom-levels" if self.levels else "uniform",
            "T=1" if self.one_step else "T>1",
        ]
        return "/".join(parts)


def all_variants() -> list[Variant]:
    """Every kernel variant: 3 dtypes × signed × per-channel × levels × one-step (48)."""
    return [Variant(*combo) for combo in itertools.product(KERNEL_DTYPES, *([(False, True)] * 4))]


@functools.cache
def source() -> str:
    """The CUDA source of the kernel, read from the installed package."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


class CompileError(RuntimeError):
    """NVRTC rejected the source; ``log`` holds the compiler's messages."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n{log}")
        self.log = log


def compile_ptx(
    variants: list[Variant] | None = None,
    arch: str = "compute_90",
    code: str | None = None,
    options: tuple[str, ...] = NVRTC_OPTIONS,
) -> tuple[str, dict[Variant, str]]:
    """Compile ``variants`` (default: all) of ``code`` (default: :func:`source`) to PTX.

    Uses the raw NVRTC API through ``cupy.cuda.nvrtc``, which needs no GPU. Returns the PTX
    and the mangled entry name of each variant; raises :class:`CompileError` with the
    program log when compilation fails.
    """
    from cupy.cuda import nvrtc

    variants = all_variants() if variants is None else list(variants)
    code = source() if code is None else code
    prog = nvrtc.createProgram(code, SOURCE_FILE, [], [])
    try:
        for v in variants:
            nvrtc.addNameExpression(prog, v.name_expression)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed to compile {SOURCE_FILE} for {arch}: {e}", nvrtc.getProgramLog(prog)) from e
        ptx = nvrtc.getPTX(prog)
        if isinstance(ptx, bytes):
            ptx = ptx.decode()
        lowered = {v: nvrtc.getLoweredName(prog, v.name_expression) for v in variants}
    finally:
        nvrtc.destroyProgram(prog)
    return ptx, lowered


@functools.cache
def cupy_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether CuPy imports and sees a CUDA device (checked once)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA runtime
        return False, f"CuPy is not importable ({type(e).__name__}: {e}); install it with pip install 'sj-sfn[cuda]'"
    if not torch.cuda.is_available():
        return False, "no CUDA device: torch.cuda.is_available() is False"
    try:
        ok = cupy.is_available()
    except Exception as e:  # pragma: no cover - driver problems
        return False, f"CuPy cannot use the CUDA driver ({type(e).__name__}: {e})"
    if not ok:
        return False, "CuPy sees no CUDA device (cupy.is_available() is False)"
    return True, f"CuPy {cupy.__version__} with {torch.cuda.device_count()} CUDA device(s)"


def kernel_unsupported(dtype: torch.dtype, max_spikes: int, return_count: bool, levels: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot run this configuration (``None`` when it can)."""
    if dtype not in KERNEL_DTYPES:
        return f"the kernel takes float32/float16/bfloat16 inputs, not {dtype}"
    if return_count and max_spikes > MAX_KERNEL_COUNT:
        return f"the kernel writes int8 counts, so store_counts needs max_spikes <= {MAX_KERNEL_COUNT} (got {max_spikes})"
    if levels is not None and levels.numel() != max_spikes:
        return f"levels has {levels.numel()} entries but max_spikes={max_spikes}"
    return None


@functools.cache
def _module(variant: Variant):
    import cupy

    return cupy.RawModule(code=source(), options=NVRTC_OPTIONS, name_expressions=[variant.name_expression])


def kernel(variant: Variant):
    """The compiled ``cupy.RawKernel`` of ``variant`` (compiled once per process)."""
    return _module(variant).get_function(variant.name_expression)


@functools.cache
def _stream(ptr: int, device_index: int):
    import cupy

    return cupy.cuda.ExternalStream(ptr, device_index)


def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


@dataclass
class LaunchPlan:
    """Everything one launch needs: the variant, the kernel arguments and the output tensors."""

    variant: Variant
    args: tuple
    n: int
    spike_seq: torch.Tensor
    v: torch.Tensor
    count_seq: torch.Tensor | None
    v_seq: torch.Tensor | None
    keep: tuple = ()  # contiguous copies the arguments point into


def plan(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | None,
    max_spikes: int,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | None = None,
    channel_dim: int | None = None,
    return_count: bool = False,
    store_v_seq: bool = False,
) -> LaunchPlan:
    """Validate the inputs, allocate the outputs and build the kernel arguments (any device)."""
    import numpy as np

    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(f"x_seq must have shape [T, ...] with T >= 1, got {tuple(x_seq.shape)}")
    why = kernel_unsupported(x_seq.dtype, max_spikes, return_count, levels)
    if why is not None:
        raise ValueError(why)
    device = x_seq.device
    steps = x_seq.shape[0]
    step_shape = x_seq.shape[1:]
    n = math.prod(step_shape)
    x_seq = x_seq.contiguous()
    v = v.to(device=device, dtype=torch.float32).expand(step_shape).contiguous()

    per_channel = False
    inner, channels = 1, 1
    tp_ptr, tp_value = None, 0.0
    if isinstance(theta_pos, torch.Tensor):
        tp_ptr = theta_pos.to(device=device, dtype=torch.float32).contiguous().reshape(-1)
        per_channel = tp_ptr.numel() > 1
    else:
        tp_value = float(theta_pos)
    tn = None if theta_neg is None else theta_neg.to(device=device, dtype=torch.float32).contiguous().reshape(-1)
    if tn is not None and tn.numel() > 1 and (tp_ptr is None or tp_ptr.numel() == 1):
        # one θ+ with per-channel θ-: the kernel reads both per channel (as torch broadcasts them)
        tp_ptr = (tp_ptr if tp_ptr is not None else torch.tensor([tp_value], device=device)).expand(tn.numel()).contiguous()
        per_channel = True
    elif tn is not None and tn.numel() == 1 and tp_ptr is not None and tp_ptr.numel() > 1:
        tn = tn.expand(tp_ptr.numel()).contiguous()
    if tn is not None and tn.numel() != (1 if tp_ptr is None else tp_ptr.numel()):
        raise ValueError(f"theta_neg has {tn.numel()} channels but theta_pos has {1 if tp_ptr is None else tp_ptr.numel()}")
    if per_channel:
        if channel_dim is None:
            raise ValueError(f"per-channel thresholds ({tp_ptr.numel()} channels) need channel_dim")
        dim = channel_dim + len(step_shape) if channel_dim < 0 else channel_dim
        if not 0 <= dim < len(step_shape) or step_shape[dim] != tp_ptr.numel():
            raise ValueError(
                f"thresholds have {tp_ptr.numel()} channels but the input step of shape {tuple(step_shape)} "
                f"does not have that many at channel_dim={channel_dim}"
            )
        channels = step_shape[dim]
        inner = math.prod(step_shape[dim + 1 :])
    lv = None
    if levels is not None:  # the levels, then where each starts (the fire rule's edges)
        from ..functional import level_edges

        lv = torch.cat([levels.to(torch.float32), level_edges(levels, offset)]).to(device=device).contiguous()
    ceil = None if ceiling is None else torch.as_tensor(ceiling).to(device=device, dtype=torch.float32).reshape(1)

    spike_seq = torch.empty_like(x_seq)
    v_out = torch.empty(step_shape, dtype=torch.float32, device=device)
    count_seq = torch.empty(x_seq.shape, dtype=torch.int8, device=device) if return_count else None
    v_seq = torch.empty(x_seq.shape, dtype=torch.float32, device=device) if store_v_seq else None
    variant = Variant(x_seq.dtype, tn is not None, per_channel, lv is not None, steps == 1)
    args = (
        _ptr(x_seq), _ptr(v), _ptr(spike_seq), _ptr(v_out), _ptr(count_seq), _ptr(v_seq),
        _ptr(tp_ptr), np.float32(tp_value), _ptr(tn), _ptr(lv), _ptr(ceil),
        np.float32(offset), np.int32(max_spikes), np.int64(n), np.int32(steps), np.int64(inner), np.int32(channels),
    )  # fmt: skip
    keep = (x_seq, v, tp_ptr, tn, lv, ceil)
    return LaunchPlan(variant, args, n, spike_seq, v_out, count_seq, v_seq, keep)


def fire(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | None,
    max_spikes: int,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | None = None,
    channel_dim: int | None = None,
    return_count: bool = False,
    store_v_seq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the fused kernel on CUDA tensors; returns ``(spike_seq, v, count_seq, v_seq)``.

    ``x_seq`` is ``[T, *S]`` (float32/16/bf16), ``v`` float32 of shape ``S``; ``theta_pos`` /
    ``theta_neg`` are the *scaled* float32 thresholds, 0-d (or a Python float for
    ``theta_pos``) or 1-D per channel along ``channel_dim`` of ``S``. Launches on torch's
    current stream with the tensors' own memory (no copies beyond making inputs contiguous).
    """
    if not x_seq.is_cuda:
        raise ValueError(f"the CuPy kernel needs CUDA tensors, got input on {x_seq.device}")
    p = plan(x_seq, v, theta_pos, theta_neg, max_spikes, levels, offset, ceiling, channel_dim, return_count, store_v_seq)
    if p.n > 0:
        import cupy

        device = x_seq.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        blocks = min(-(-p.n // THREADS), 2**31 - 1)
        with cupy.cuda.Device(index), _stream(torch.cuda.current_stream(device).cuda_stream, index):
            kernel(p.variant)((blocks,), (THREADS,), p.args)
    return p.spike_seq, p.v, p.count_seq, p.v_seq
