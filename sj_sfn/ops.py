"""Dispatch of the neuron forward to an implementation: torch or the CuPy kernel.

Two ``torch.library`` custom ops, ``sj_sfn::mtn_forward`` and ``sj_sfn::sfn_forward``, run a
whole ``[T, ...]`` sequence (charge → fire → soft reset at every step). Their CPU
implementation is torch; their CUDA implementation is the fused CuPy kernel of
:mod:`sj_sfn.cuda` when CuPy and a device are usable and the configuration is supported
(float32/16/bf16 input; counts need ``N <= 127``), else torch. Both have a fake
implementation (``torch.compile`` traces each forward as one node) and a straight-through
backward that replays the reference under autograd, so gradients equal the reference's (to
``x`` and ``v``; a call whose thresholds, ``λ`` or ceiling need a gradient runs the reference itself).

"torch" means the reference's own operations in the same order (on the CPU, a stateless float32
inference step of an SFN fires in one pass through the C kernel of :mod:`sj_sfn.cpu` when it could be
built, else through torch ops; bit for bit the same result either way): with autograd it is
:mod:`sj_sfn.functional` itself; without autograd (inference) the same operations run in
place on preallocated buffers (identical results, fewer passes over memory); custom levels
always use :mod:`sj_sfn.functional`.

Which implementation runs on a CUDA tensor:

================================  =================  =================  =================
``SJ_SFN_CUDA_IMPLEMENTATION``    ``backend='torch'``  ``backend='cupy'``  ``backend='auto'``
================================  =================  =================  =================
``auto`` (default, unset)         torch              kernel (or error)  kernel if usable
``cupy``                          kernel (or error)  kernel (or error)  kernel (or error)
``torch``                         torch              torch              torch
================================  =================  =================  =================

``backend`` is the neuron's (``MTNode``/``SFNode``; ``'auto'`` by default) or the argument of
:func:`mtn` / :func:`sfn` (``'auto'`` by default). CPU tensors always get torch, except that
``backend='cupy'`` on a CPU tensor is an error. In eager mode torch is called directly (no op
dispatch); under ``torch.compile`` every forward goes through the custom op.
:func:`implementation` reports the choice and why the others are not taken. CuPy is imported
lazily: ``import sj_sfn`` never imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import checks, cpu, cuda
from . import functional as F

__all__ = [
    "ENV_VAR",
    "CHOICES",
    "Implementation",
    "require_cupy",
    "implementation",
    "mtn",
    "sfn",
    "mtn_forward",
    "sfn_forward",
]

ENV_VAR = "SJ_SFN_CUDA_IMPLEMENTATION"
CHOICES = ("auto", "cupy", "torch")
_BACKENDS = ("auto", "cupy", "torch")


def _env_choice() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {os.environ.get(ENV_VAR)!r}")
    return value


def require_cupy() -> None:
    """Raise a clear error unless CuPy and a CUDA device are usable."""
    ok, why = cuda.cupy_status()
    if not ok:
        raise RuntimeError(f"the CuPy kernels are unavailable: {why}")


@dataclass(frozen=True)
class Implementation:
    """Which implementation a device or neuron gets: ``name`` is ``'cupy'`` or ``'torch'``.

    ``reason`` says why; ``unavailable`` maps each implementation not taken to why;
    ``error`` is set when a forward would raise instead (e.g. ``backend='cupy'`` without CuPy);
    ``notes`` lists configurations that fall back to the reference.
    """

    name: str
    device: str
    reason: str
    unavailable: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.name} on {self.device}: {self.reason}"
        if self.error:
            s += f" [forward raises: {self.error}]"
        for k, v in self.unavailable.items():
            s += f"; not {k}: {v}"
        for n in self.notes:
            s += f"; {n}"
        return s


_KERNEL_NOTES = (
    "float64 inputs run on torch",
    f"store_counts with max_spikes > {cuda.kernels.MAX_KERNEL_COUNT} runs on torch (the kernel writes int8 counts)",
)


def _resolve(device: torch.device, backend: str) -> Implementation:
    """Decide the implementation for a forward on ``device`` with the caller's ``backend``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    env = _env_choice()
    dev = str(device)
    if device.type != "cuda":
        if backend == "cupy" and env != "torch":
            why = f"backend='cupy' needs CUDA tensors, got input on {dev}; move the model to a CUDA device or use backend='torch'"
            return Implementation("cupy", dev, "backend='cupy'", {"torch": "backend='cupy' was requested"}, error=why)
        notes = ()
        if device.type == "cpu":
            ok, why = cpu.status()
            notes = (f"stateless float32 inference steps fire in one pass through the C kernel of sj_sfn.cpu ({why})" if ok
                     else f"stateless float32 inference steps fire through torch ops (the C kernel of sj_sfn.cpu is unusable: {why})",)  # fmt: skip
        return Implementation("torch", dev, f"torch runs on {device.type}", {"cupy": f"the CuPy kernels run on CUDA devices only, not {device.type}"}, notes=notes)
    if env == "torch":
        return Implementation("torch", dev, f"{ENV_VAR}=torch", {"cupy": f"disabled by {ENV_VAR}=torch"})
    ok, status = cuda.cupy_status()
    if env == "cupy" or backend == "cupy":
        by = f"{ENV_VAR}=cupy" if env == "cupy" else "backend='cupy'"
        taken = {"torch": f"{by} selects the kernel"}
        if not ok:
            return Implementation("cupy", dev, by, taken, error=f"the CuPy kernels are unavailable: {status}")
        return Implementation("cupy", dev, f"{by}; {status}", taken, notes=_KERNEL_NOTES)
    if backend == "torch":
        why_not = f"backend='torch' (set backend='cupy' or {ENV_VAR}=cupy to use it)" if ok else status
        return Implementation("torch", dev, "backend='torch'", {"cupy": why_not})
    if ok:
        return Implementation("cupy", dev, f"auto: {status}", {"torch": "the kernel is usable"}, notes=_KERNEL_NOTES)
    return Implementation("torch", dev, "auto: the kernel is unusable", {"cupy": status})


def _is_neuron(m: torch.nn.Module) -> bool:
    return hasattr(m, "backend") and hasattr(m, "max_spikes") and callable(getattr(m, "_dispatch_seq", None))


def _module_device(m: torch.nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    v = getattr(m, "v", None)
    return v.device if isinstance(v, torch.Tensor) else torch.device("cpu")


def implementation(
    module_or_device: torch.nn.Module | torch.device | str | int, device: torch.device | str | None = None
) -> Implementation | dict[str, Implementation]:
    """Which implementation runs the neuron forward, and why the others do not.

    For a device (``'cuda:0'``, ``torch.device``, an index) the answer for ``backend='auto'``;
    for a neuron (``MTNode``/``SFNode``) the answer for its ``backend`` on its device (or
    ``device``); for any other module a dict ``{qualified name: Implementation}`` over its
    neurons. Honors the ``SJ_SFN_CUDA_IMPLEMENTATION`` environment variable.
    """
    if isinstance(module_or_device, torch.nn.Module):
        model = module_or_device
        where = None if device is None else torch.device(device)
        if _is_neuron(model):
            return _resolve(where or _module_device(model), model.backend)
        fallback = where or _module_device(model)
        out = {}
        for name, m in model.named_modules():
            if _is_neuron(m):
                out[name] = _resolve(where or (_module_device(m) if any(True for _ in m.buffers()) else fallback), m.backend)
        return out
    if isinstance(module_or_device, int):
        module_or_device = torch.device("cuda", module_or_device)
    try:
        dev = torch.device(module_or_device)
    except (RuntimeError, TypeError) as e:
        raise TypeError(f"implementation() takes a module or a device, got {module_or_device!r}") from e
    return _resolve(dev, "auto")


@torch.compiler.assume_constant_result
def _choose_on(device: torch.device, backend: str) -> str:
    """Name of the implementation for ``device`` (a constant for torch.compile), or raise."""
    impl = _resolve(device, backend)
    if impl.error:
        raise RuntimeError(impl.error)
    return impl.name


def _choose(x: torch.Tensor, backend: str) -> str:
    if x.device.type == "cpu" and backend != "cupy" and backend in _BACKENDS:
        _env_choice()  # a bad value is reported on every device
        return "torch"
    return _choose_on(x.device, backend)


# ---------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------
def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def _pack(out: F.SeqOutput, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    count = _empty(x_seq).to(torch.int8) if out.count_seq is None else out.count_seq
    v_seq = _empty(out.v) if out.v_seq is None else out.v_seq
    return out.spike_seq, out.v, count, v_seq


def _torch_fused(
    x_seq: torch.Tensor,
    v: torch.Tensor | float,
    tp: torch.Tensor,
    tn: torch.Tensor | None,
    max_spikes: int,
    offset: float,
    ceiling: torch.Tensor | None,
    return_count: bool,
    store_v_seq: bool,
) -> F.SeqOutput:
    """The reference's forward (uniform levels, no autograd) with in-place torch ops.

    Same operations in the same order as :func:`sj_sfn.functional.multi_threshold_fire`, so the
    result is identical: ``k+ = clip(floor(h/θ+ + r), 0, N)`` (``min(k+, max(1, floor(c/θ+)))``
    with a ceiling), ``k- = clip(floor(-h/θ- + r), 0, N)``, ``o = θ+·k+ - θ-·k-``, ``v = h - o``.
    ``tp``/``tn`` are the scaled thresholds in the compute dtype, shaped to broadcast.
    """
    dtype = F.compute_dtype(x_seq.dtype)
    if isinstance(v, torch.Tensor):
        v = v.to(device=x_seq.device, dtype=dtype)
    else:
        v = torch.full(x_seq.shape[1:], float(v), dtype=dtype, device=x_seq.device)
    shape = x_seq.shape[1:]
    if v.shape != shape:
        shape = torch.broadcast_shapes(v.shape, shape)
        v = v.expand(shape)  # a 0-d v would not promote a 16-bit x to float32
    spike_seq = torch.empty((x_seq.shape[0], *shape), dtype=x_seq.dtype, device=x_seq.device)
    count_seq = torch.empty(spike_seq.shape, dtype=F.count_dtype(max_spikes), device=x_seq.device) if return_count else None
    v_seq = torch.empty(spike_seq.shape, dtype=dtype, device=x_seq.device) if store_v_seq else None
    cap = None
    if ceiling is not None:
        cap = torch.clamp(torch.floor(torch.as_tensor(ceiling, dtype=dtype, device=x_seq.device) / tp), min=1)
    u = torch.empty(shape, dtype=dtype, device=x_seq.device)
    w = None if tn is None else torch.empty_like(u)
    c = None if count_seq is None else torch.empty_like(u)  # the count before its integer cast (NaN -> 0)
    for t in range(x_seq.shape[0]):
        h = v + x_seq[t]  # promotes a 16-bit x to float32 exactly as x.to(float32)
        torch.div(h, tp, out=u)
        u.add_(offset).floor_().clamp_(0, max_spikes)
        if cap is not None:
            torch.minimum(u, cap, out=u)
        if w is not None:
            torch.div(h, tn, out=w)  # (-h)/θ- == -(h/θ-) in round-to-nearest
            w.neg_().add_(offset).floor_().clamp_(0, max_spikes)
            if c is not None:
                count_seq[t].copy_(torch.sub(u, w, out=c).nan_to_num_(0.0))  # NaN count -> 0, as the reference
            u.mul_(tp)
            u.sub_(w.mul_(tn))
        else:
            if c is not None:
                count_seq[t].copy_(torch.nan_to_num(u, 0.0, out=c))
            u.mul_(tp)
        spike_seq[t].copy_(u)
        v = h.sub_(u)
        if v_seq is not None:
            v_seq[t].copy_(v)
    return F.SeqOutput(spike_seq, v, count_seq, v_seq)


def _mtn_torch(x_seq, v, v_threshold, max_spikes, return_count, store_v_seq) -> F.SeqOutput:
    dtype = F.compute_dtype(x_seq.dtype)
    theta = torch.tensor(float(v_threshold), dtype=dtype, device=x_seq.device)
    return _torch_fused(x_seq, v, theta, None, max_spikes, 0.0, None, return_count, store_v_seq)


def _sfn_torch(x_seq, v, tp, tn, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq):
    """No-autograd SFN forward with scaled 0-d/1-D thresholds: fused ops, or the reference for custom levels."""
    if levels is not None:
        return _sfn_reference(
            x_seq, v, tp, tn, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq
        )
    dtype = F.compute_dtype(x_seq.dtype)
    x0 = x_seq[0]
    tp = F.broadcast_threshold(tp.to(dtype), x0, channel_dim, "theta_pos")
    tn = None if tn is None else F.broadcast_threshold(tn.to(dtype), x0, channel_dim, "theta_neg")
    return _torch_fused(x_seq, v, tp, tn, max_spikes, offset, ceiling, return_count, store_v_seq)


def _mtn_reference(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq) -> F.SeqOutput:
    return F.mtn_multi_step_unchecked(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq)


def _sfn_reference(
    x_seq, v, theta_pos, theta_neg, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq
) -> F.SeqOutput:
    """The reference with already scaled thresholds (``λ = 1``: ``θ·1`` is exact)."""
    x0 = x_seq[0]
    tp = F.broadcast_threshold(theta_pos, x0, channel_dim, "theta_pos")
    tn = None if theta_neg is None else F.broadcast_threshold(theta_neg, x0, channel_dim, "theta_neg")
    return F.sfn_multi_step_unchecked(
        x_seq, v, tp, tn, 1.0, max_spikes, levels, offset, ceiling, detach_reset, return_count, store_v_seq
    )


def _kernel_ok(x_seq: torch.Tensor, implementation: str, max_spikes: int, return_count: bool, levels=None) -> bool:
    if implementation != "cupy":
        return False
    if cuda.kernel_unsupported(x_seq.dtype, max_spikes, return_count, levels) is not None:
        return False
    require_cupy()
    return True


@torch.library.custom_op("sj_sfn::mtn_forward", mutates_args=())
def _mtn_op(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    v_threshold: float,
    max_spikes: int,
    detach_reset: bool,
    return_count: bool,
    store_v_seq: bool,
    implementation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MTN over ``[T, ...]``: returns ``(spike_seq, v, count_seq or [], v_seq or [])`` (torch)."""
    return _pack(_mtn_torch(x_seq, v, v_threshold, max_spikes, return_count, store_v_seq), x_seq)


@_mtn_op.register_kernel("cuda")
def _mtn_cuda(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq, implementation):
    if not _kernel_ok(x_seq, implementation, max_spikes, return_count):
        return _pack(_mtn_torch(x_seq, v, v_threshold, max_spikes, return_count, store_v_seq), x_seq)
    # float32(θ) as the reference's torch.tensor(float(θ), dtype=float32)
    theta = torch.tensor(float(v_threshold), dtype=torch.float32).item()
    s, vo, c, vs = cuda.fire(x_seq, v, theta, None, max_spikes, return_count=return_count, store_v_seq=store_v_seq)
    return s, vo, _empty(x_seq).to(torch.int8) if c is None else c, _empty(vo) if vs is None else vs


@torch.library.custom_op("sj_sfn::sfn_forward", mutates_args=())
def _sfn_op(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    levels: torch.Tensor | None,
    ceiling: torch.Tensor | None,
    max_spikes: int,
    offset: float,
    channel_dim: int | None,
    detach_reset: bool,
    return_count: bool,
    store_v_seq: bool,
    implementation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFN over ``[T, ...]`` with scaled thresholds ``λθ±``: ``(spike_seq, v, count_seq or [], v_seq or [])``."""
    out = _sfn_torch(
        x_seq, v, theta_pos, theta_neg, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq
    )
    return _pack(out, x_seq)


@_sfn_op.register_kernel("cuda")
def _sfn_cuda(
    x_seq, v, theta_pos, theta_neg, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq, implementation
):
    if not _kernel_ok(x_seq, implementation, max_spikes, return_count, levels):
        out = _sfn_torch(
            x_seq, v, theta_pos, theta_neg, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq
        )
        return _pack(out, x_seq)
    s, vo, c, vs = cuda.fire(
        x_seq, v, theta_pos, theta_neg, max_spikes, levels, offset, ceiling, channel_dim, return_count, store_v_seq
    )
    return s, vo, _empty(x_seq).to(torch.int8) if c is None else c, _empty(vo) if vs is None else vs


def _fake_outputs(x_seq: torch.Tensor, return_count: bool, store_v_seq: bool):
    cdtype = F.compute_dtype(x_seq.dtype)
    spike = torch.empty_like(x_seq)
    v = x_seq.new_empty(x_seq.shape[1:], dtype=cdtype)
    count = x_seq.new_empty(x_seq.shape if return_count else (0,), dtype=torch.int8)
    v_seq = x_seq.new_empty(x_seq.shape if store_v_seq else (0,), dtype=cdtype)
    return spike, v, count, v_seq


@_mtn_op.register_fake
def _mtn_fake(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq, implementation):
    spike, v_out, count, v_seq = _fake_outputs(x_seq, return_count, store_v_seq)
    if return_count:
        count = count.to(F.count_dtype(max_spikes))
    return spike, v_out, count, v_seq


@_sfn_op.register_fake
def _sfn_fake(
    x_seq, v, theta_pos, theta_neg, levels, ceiling, max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq, implementation
):
    spike, v_out, count, v_seq = _fake_outputs(x_seq, return_count, store_v_seq)
    if return_count:
        count = count.to(F.count_dtype(max_spikes))
    return spike, v_out, count, v_seq


# -- autograd: straight-through, by replaying the reference ---------------------------------
def _replay_grad(ctx, reference, grad_spike, grad_v, grad_v_seq, extra):
    x_seq, v = ctx.saved_tensors[:2]
    with torch.enable_grad():
        xs = x_seq.detach().requires_grad_(True)
        v0 = v.detach().requires_grad_(True)
        out = reference(xs, v0, *extra)
        outs, grads = [], []
        for o, g in ((out.spike_seq, grad_spike), (out.v, grad_v), (out.v_seq, grad_v_seq)):
            if o is not None and g is not None and o.requires_grad and g.numel() == o.numel():
                outs.append(o)
                grads.append(g)
        if not outs:
            return torch.zeros_like(x_seq), torch.zeros_like(v)
        gx, gv = torch.autograd.grad(outs, (xs, v0), grads, allow_unused=True)
    return (torch.zeros_like(x_seq) if gx is None else gx), (torch.zeros_like(v) if gv is None else gv)


def _mtn_setup(ctx, inputs, output):
    x_seq, v, *rest = inputs
    ctx.save_for_backward(x_seq, v)
    ctx.extra = tuple(rest[:5])  # v_threshold, max_spikes, detach_reset, return_count, store_v_seq


def _mtn_backward(ctx, grad_spike, grad_v, grad_count, grad_v_seq):
    gx, gv = _replay_grad(ctx, _mtn_reference, grad_spike, grad_v, grad_v_seq, ctx.extra)
    return gx, gv, None, None, None, None, None, None


def _sfn_setup(ctx, inputs, output):
    x_seq, v, theta_pos, theta_neg, levels, ceiling, *rest = inputs
    ctx.save_for_backward(x_seq, v, theta_pos, *(t for t in (theta_neg, levels, ceiling) if t is not None))
    ctx.has = (theta_neg is not None, levels is not None, ceiling is not None)
    ctx.scalars = tuple(rest[:6])  # max_spikes, offset, channel_dim, detach_reset, return_count, store_v_seq


def _sfn_backward(ctx, grad_spike, grad_v, grad_count, grad_v_seq):
    saved = list(ctx.saved_tensors[3:])
    theta_neg, levels, ceiling = (saved.pop(0) if h else None for h in ctx.has)
    extra = (ctx.saved_tensors[2], theta_neg, levels, ceiling, *ctx.scalars)
    gx, gv = _replay_grad(ctx, _sfn_reference, grad_spike, grad_v, grad_v_seq, extra)
    return (gx, gv) + (None,) * 11


_mtn_op.register_autograd(_mtn_backward, setup_context=_mtn_setup)
_sfn_op.register_autograd(_sfn_backward, setup_context=_sfn_setup)


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------
def _state(v: torch.Tensor | float, x_seq: torch.Tensor) -> torch.Tensor:
    dtype = F.compute_dtype(x_seq.dtype)
    if isinstance(v, torch.Tensor):
        v = v.to(device=x_seq.device, dtype=dtype)
        return v if v.shape == x_seq.shape[1:] else v.expand(x_seq.shape[1:]).contiguous()
    return torch.full(x_seq.shape[1:], float(v), dtype=dtype, device=x_seq.device)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_seq(x_seq: torch.Tensor) -> None:
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(f"multi-step input must have shape [T, ...] with T >= 1, got {tuple(x_seq.shape)}")
    F.compute_dtype(x_seq.dtype)


def _unpack(out, return_count: bool, store_v_seq: bool) -> F.SeqOutput:
    spike, v, count, v_seq = out
    return F.SeqOutput(spike, v, count if return_count else None, v_seq if store_v_seq else None)


def mtn(
    x_seq: torch.Tensor,
    v: torch.Tensor | float,
    v_threshold: float,
    max_spikes: int,
    detach_reset: bool = False,
    return_count: bool = False,
    store_v_seq: bool = False,
    backend: str = "auto",
) -> F.SeqOutput:
    """MTN over ``[T, ...]`` (as :func:`sj_sfn.functional.mtn_multi_step`) on the chosen implementation.

    ``h = v + x``, ``k = clip(floor(h/θ), 0, N)``, ``o = θ·k``, ``v ← h - o`` at every step.
    ``max_spikes`` must be an int >= 1 and ``v_threshold`` finite and > 0 (a tensor is checked
    only on the CPU; nothing under ``torch.compile``; see :mod:`sj_sfn.functional`).
    """
    checks.check_fire_params(max_spikes, v_threshold=v_threshold)
    return _mtn(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq, backend)


def _mtn(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq, backend) -> F.SeqOutput:
    """:func:`mtn` without the parameter checks (the nodes validated theirs at construction)."""
    _check_seq(x_seq)
    impl = _choose(x_seq, backend)
    if impl == "torch" and not torch.compiler.is_compiling():
        if _needs_autograd(x_seq, v):
            return F.mtn_multi_step_unchecked(x_seq, v, v_threshold, max_spikes, detach_reset, return_count, store_v_seq)
        return _mtn_torch(x_seq, v, v_threshold, max_spikes, return_count, store_v_seq)
    out = _mtn_op(x_seq, _state(v, x_seq), float(v_threshold), int(max_spikes), detach_reset, return_count, store_v_seq, impl)
    return _unpack(out, return_count, store_v_seq)


def sfn(
    x_seq: torch.Tensor,
    v: torch.Tensor | float,
    theta_pos: torch.Tensor | float,
    theta_neg: torch.Tensor | float | None = None,
    lam: torch.Tensor | float = 1.0,
    max_spikes: int = 32,
    levels: torch.Tensor | None = None,
    offset: float = 0.0,
    ceiling: torch.Tensor | float | None = None,
    channel_dim: int | None = None,
    detach_reset: bool = False,
    return_count: bool = False,
    store_v_seq: bool = False,
    backend: str = "auto",
) -> F.SeqOutput:
    """SFN over ``[T, ...]`` with thresholds ``λ·θ±`` on the chosen implementation.

    ``θ±`` are scalars or 1-D per-channel tensors along ``channel_dim`` of one step's input;
    the result equals :func:`sj_sfn.functional.sfn_multi_step` on the broadcast thresholds.
    ``max_spikes`` must be an int >= 1 (``len(levels)`` with custom levels), ``θ±``, ``λ`` and the
    ceiling finite and > 0, ``0 <= offset < 1``, checked in eager mode (not while ``torch.compile``
    traces): Python numbers always, tensors only on the CPU, so a GPU forward never synchronises.
    """
    checks.check_fire_params(max_spikes, offset, levels, theta_pos=theta_pos, theta_neg=theta_neg, lam=lam, ceiling=ceiling)
    return _sfn(
        x_seq, v, theta_pos, theta_neg, lam, max_spikes, levels, offset, ceiling, channel_dim, detach_reset,
        return_count, store_v_seq, backend,
    )  # fmt: skip


def _sfn(
    x_seq, v, theta_pos, theta_neg, lam, max_spikes, levels, offset, ceiling, channel_dim, detach_reset,
    return_count, store_v_seq, backend,
) -> F.SeqOutput:  # fmt: skip
    """:func:`sfn` without the parameter checks (the nodes validated theirs at construction)."""
    _check_seq(x_seq)
    impl = _choose(x_seq, backend)
    x0 = x_seq[0]
    eager_torch = impl == "torch" and not torch.compiler.is_compiling()
    # The op's backward carries gradients to x and v only: a call that needs them for θ±, λ or the
    # ceiling runs the reference (eagerly, or traced by torch.compile) on any device instead.
    param_grad = _needs_autograd(theta_pos, theta_neg, lam, ceiling)
    if param_grad or (eager_torch and (levels is not None or _needs_autograd(x_seq, v))):
        tp_b = F.broadcast_threshold(torch.as_tensor(theta_pos), x0, channel_dim, "theta_pos")
        tn_b = None if theta_neg is None else F.broadcast_threshold(torch.as_tensor(theta_neg), x0, channel_dim, "theta_neg")
        return F.sfn_multi_step_unchecked(
            x_seq, v, tp_b, tn_b, lam, max_spikes, levels, offset, ceiling, detach_reset, return_count, store_v_seq
        )
    dtype = F.compute_dtype(x_seq.dtype)

    def as_t(t):
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return t.to(device=x_seq.device, dtype=dtype)
        return torch.tensor(float(t), device=x_seq.device, dtype=dtype)

    tp, tn, lam_t = as_t(theta_pos), as_t(theta_neg), as_t(lam)
    # Scale exactly as the reference does (θ in the compute dtype times λ), then validate the shapes.
    tp = tp * lam_t
    tn = None if tn is None else tn * lam_t
    tp_b = F.broadcast_threshold(tp, x0, channel_dim, "theta_pos")
    tn_b = None if tn is None else F.broadcast_threshold(tn, x0, channel_dim, "theta_neg")
    ceil = None if ceiling is None else as_t(ceiling).reshape(())
    if eager_torch:  # uniform levels, no autograd: the fused torch ops, without the op dispatch
        return _torch_fused(x_seq, v, tp_b, tn_b, max_spikes, offset, ceil, return_count, store_v_seq)
    lv = None if levels is None else levels.to(device=x_seq.device)
    out = _sfn_op(
        x_seq, _state(v, x_seq), tp, tn, lv, ceil, int(max_spikes), float(offset), channel_dim,
        detach_reset, return_count, store_v_seq, impl,
    )  # fmt: skip
    return _unpack(out, return_count, store_v_seq)


def mtn_forward(node, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
    """Multi-step MTN forward for ``node`` (an :class:`~sj_sfn.MTNode`)."""
    return _mtn(
        x_seq, v, node.v_threshold, node.max_spikes, node.detach_reset, node.store_counts, store_v_seq, node.backend
    )


def sfn_forward(node, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
    """Multi-step SFN forward for ``node`` (an :class:`~sj_sfn.SFNode`)."""
    return _sfn(
        x_seq, v, node.theta_pos, node.theta_neg, node.lam, node.max_spikes, node.levels, node.v_init, node.ceiling,
        node.channel_dim, node.detach_reset, node.store_counts, store_v_seq, node.backend,
    )  # fmt: skip
