"""Multi-Threshold (MTN) and Scale-and-Fire (SFN) neurons as SpikingJelly nodes.

Both derive from :class:`MultiLevelNode`, a ``spikingjelly.activation_based.neuron.BaseNode``,
so every SpikingJelly tool that looks for ``BaseNode`` finds them (``monitor.OutputMonitor``,
the ``op_counter`` package, ``ann2snn.delay``, the vision-config registry). They follow
SpikingJelly 2.0's stateful-module contract: ``step_mode`` ``'s'`` (input ``[N, *]``) or
``'m'`` (input ``[T, N, *]``), the membrane ``v`` registered as memory so that
``functional.reset_net``, ``set_step_mode``, ``detach_net`` and ``base.to_functional_forward``
work, and an explicit-state ``single_step_functional_forward``. The spike *value* is returned
(count × threshold), so a converted network needs no weight rescaling.

State between calls (``stateful``): ``True`` (SpikingJelly's contract, the default of the
nodes) keeps the membrane until ``functional.reset_net``; ``False`` (what ``sj_sfn.convert``
makes) starts every step from the initial membrane and keeps nothing between calls, so the
same input gives the same output on every call. See docs/spikingjelly.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from spikingjelly.activation_based.neuron import BaseNode
from torch.autograd.graph import increment_version

from . import cpu, ops
from . import functional as F
from .checks import check_finite_positive, check_levels, check_max_spikes, check_offset, check_positive_float

__all__ = [
    "MultiLevelNode",
    "MTNode",
    "SFNode",
    "BACKENDS",
    "sfn_nodes",
    "spiking_nodes",
    "set_lambda",
    "set_stateful",
    "register_with_spikingjelly",
    "reference_fire",
]

BACKENDS = ("auto", "torch", "cupy")

_UNSET: Any = object()
_reference_only = False
_version = operator.attrgetter("_version")


@contextlib.contextmanager
def reference_fire() -> Iterator[None]:
    """Inside this block every node fires through the reference path (no fast path): for checks and benchmarks."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        ops.require_cupy()
    return backend


def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_threshold_tensor(value: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D per-channel tensor, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    check_finite_positive(t, name)
    return t


def _check_seq_input(x_seq: torch.Tensor, name: str) -> None:
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dim() < 2:
        raise ValueError(f"{name} in step_mode='m' expects input of shape [T, N, *], got {tuple(x_seq.shape)}")


class MultiLevelNode(BaseNode):
    r"""Common base of :class:`MTNode` and :class:`SFNode`: a SpikingJelly ``BaseNode`` whose spike is ``count × threshold``.

    SpikingJelly's contract, honoured: ``v_threshold`` (the value of one spike), ``v_reset``
    (``None`` = soft reset ``v ← h − o``, the method's; a float = hard reset: ``v ← v_reset``
    after a step in which the neuron fired), ``detach_reset``, ``step_mode``, ``store_v_seq``
    (the membrane after every step in ``v_seq``), ``surrogate_function``: ``None`` (default) gives
    the straight-through gradient ``∂o/∂x = 1`` inside the output range; a SpikingJelly surrogate
    ``sg`` gives the gradient of ``o = Σ_i Δ_i·sg(h − c_i)`` over the site's thresholds ``c_i``
    (``Δ_i`` the value a crossing adds), the forward value staying the fire rule's exactly (run
    step by step, ``N`` times the activation memory).

    :param stateful: ``True``: the membrane carries over between forwards until
        ``functional.reset_net`` (SpikingJelly's contract). ``False``: every step starts from the
        initial membrane and no membrane is kept between calls; a multi-step forward then equals
        a loop of single steps, each from rest.
    :param backend: ``'auto'`` (default: the fused CUDA kernel on CUDA inputs when CuPy is usable, torch
        otherwise), ``'torch'`` (the reference on every device) or ``'cupy'`` (the kernel; an error without it)
    :param store_counts: keep the integer spike counts of the last forward in ``last_counts``
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = None,
        surrogate_function: Any = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        backend: str = "auto",
        store_counts: bool = False,
        stateful: bool = True,
    ):
        v_reset = None if v_reset is None else _check_real(v_reset, "v_reset")
        super().__init__(
            v_threshold=float(v_threshold),
            v_reset=v_reset,
            surrogate_function=surrogate_function,
            detach_reset=_check_bool(detach_reset, "detach_reset"),
            step_mode=step_mode,
            store_v_seq=store_v_seq,
        )
        self.backend = _check_backend(backend)
        self.store_counts = _check_bool(store_counts, "store_counts")
        self.stateful = _check_bool(stateful, "stateful")
        self.last_counts: torch.Tensor | None = None

    # -- state -----------------------------------------------------------------------
    def _initial_v(self) -> float:
        """The membrane every forward starts from after ``reset`` (and always, when not ``stateful``)."""
        return 0.0

    def _set_initial_v(self) -> None:
        self.set_reset_value("v", self._initial_v())
        self._memories["v"] = self._initial_v()

    def set_stateful(self, stateful: bool) -> None:
        """Keep the membrane between calls (``True``) or start every step from rest (``False``, drops the membrane)."""
        self.stateful = _check_bool(stateful, "stateful")
        if not stateful:
            self.reset()

    def level_costs(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What one output element with signed count ``k`` costs per fan-out of the layer it feeds: ``(ACs, MACs)``.

        Evenly spaced levels: ``(|k|, None)`` (a count of ``k`` is ``|k|`` additions of the spike value).
        """
        return counts.abs(), None

    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        self._store_v_seq = _check_bool(value, "store_v_seq")
        self.v_seq = None

    def reset(self):
        super().reset()
        self.last_counts = None

    def _state_extra(self) -> dict:
        return {"stateful": self.stateful, "v_reset": self.v_reset}

    def _load_state_extra(self, state: Mapping) -> None:
        self.stateful = _check_bool(state.get("stateful", True), "stateful")
        v_reset = state.get("v_reset")
        self.v_reset = None if v_reset is None else _check_real(v_reset, "v_reset")

    def __setstate__(self, state: dict) -> None:
        # whole-module pickles of nodes saved before the common base lack its attributes
        super().__setstate__(state)
        d = self.__dict__
        for name, value in (("v_reset", None), ("surrogate_function", None), ("stateful", True), ("_neuron_precision", None),
                            ("lava_s_cale", 1 << 6), ("v_seq", None), ("last_counts", None)):  # fmt: skip
            if name not in d and name not in self._modules:
                d[name] = value
        if "_store_v_seq" not in d:
            d["_store_v_seq"] = False

    # -- forward ---------------------------------------------------------------------
    def materialize_states(self, inputs, states, step_mode):
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        dtype = F.compute_dtype(x.dtype)
        v = states[0]
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            v = torch.full(x.shape, self._initial_v(), dtype=dtype, device=x.device)
        elif v.dtype != dtype or v.device != x.device:
            v = v.to(dtype=dtype, device=x.device)
        return (v, *states[1:])

    def _dispatch_seq(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        raise NotImplementedError

    def _run(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool, carry: bool = True) -> F.SeqOutput:
        """``[T, ...]`` steps from ``v``; ``carry=False`` starts every step from ``v`` (stateless).

        Soft reset with the membrane carried runs as one fused call; a hard reset, a stateless
        sequence or a surrogate gradient runs step by step.
        """
        surrogate = (
            self.surrogate_function is not None and torch.is_grad_enabled()
            and (x_seq.requires_grad or (isinstance(v, torch.Tensor) and v.requires_grad))
        )  # fmt: skip
        if self.v_reset is None and not surrogate and (carry or x_seq.shape[0] == 1):
            return self._dispatch_seq(x_seq, v, store_v_seq)
        spikes, counts, vs = [], [], []
        v_t = v
        for t in range(x_seq.shape[0]):
            v_in = v_t if carry else v
            if surrogate:
                out = self._surrogate_step(x_seq[t : t + 1], v_in)
            else:
                out = self._dispatch_seq(x_seq[t : t + 1], v_in, False)
            v_next = out.v
            if self.v_reset is not None:
                v_next = torch.where(out.spike_seq[0] != 0, torch.full_like(v_next, self.v_reset), v_next)
            spikes.append(out.spike_seq)
            counts.append(out.count_seq)
            vs.append(v_next)
            v_t = v_next
        count_seq = None if counts[0] is None else torch.cat(counts)
        return F.SeqOutput(torch.cat(spikes), v_t, count_seq, torch.stack(vs) if store_v_seq else None)

    def _surrogate_step(self, x_seq: torch.Tensor, v: torch.Tensor) -> F.SeqOutput:
        r"""One step whose value is the fire rule's and whose gradient is the surrogate's.

        ``o = Σ_i Δ_i · sg(h − c_i)`` over the thresholds ``c_i`` of the site (:meth:`_crossings`;
        ``Δ_i`` the value one crossing adds), ``sg`` = ``surrogate_function`` (a Heaviside step
        forward, its surrogate derivative backward); the forward value is the exact output.
        """
        exact = self._dispatch_seq(x_seq, v.detach(), False)
        h = v + x_seq[0]
        o_sg = torch.zeros_like(h)
        for sign, (c, d) in ((1.0, self._crossings(h, 1)), (-1.0, self._crossings(h, -1))):
            if c is not None:
                o_sg = o_sg + sign * (d * self.surrogate_function(sign * h.unsqueeze(0) - c)).sum(0)
        spike = exact.spike_seq[0].detach() + (o_sg - o_sg.detach()).to(exact.spike_seq.dtype)
        v_next = h - (spike.detach() if self.detach_reset else spike)
        return F.SeqOutput(spike.unsqueeze(0), v_next, exact.count_seq, None)

    def _crossings(self, h: torch.Tensor, sign: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(c, Δ)`` stacked over the levels: the branch of ``sign`` fires level ``i`` when ``sign·h ≥ c_i``."""
        raise NotImplementedError

    def _forward_seq(self, x_seq: torch.Tensor, x0: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        v0 = self._memories["v"] if self.stateful else self._initial_v()
        (v,) = self.materialize_states((x0,), (v0,), "s")
        out = self._run(x_seq, v, store_v_seq, carry=self.stateful)
        self._memories["v"] = out.v if self.stateful else self._initial_v()
        self.last_counts = out.count_seq
        return out

    def single_step_functional_forward(self, inputs, states, **kwargs):
        out = self._run(inputs[0].unsqueeze(0), states[0], False)
        self.last_counts = None if out.count_seq is None else out.count_seq[0]
        return (out.spike_seq[0],), (out.v, *states[1:])

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        _check_seq_input(inputs[0], type(self).__name__)
        out = self._run(inputs[0], states[0], False)
        self.last_counts = out.count_seq
        return (out.spike_seq,), (out.v, *states[1:])

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs):
        out = self._forward_seq(x.unsqueeze(0), x, self.store_v_seq)
        self.last_counts = None if out.count_seq is None else out.count_seq[0]
        if self.store_v_seq:
            if self.stateful:
                self._append_v_seq(out.v_seq[0])
            else:  # each call is its own sequence
                self.v_seq = out.v_seq
        return out.spike_seq[0]

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        _check_seq_input(x_seq, type(self).__name__)
        out = self._forward_seq(x_seq, x_seq[0], self.store_v_seq)
        if self.store_v_seq:
            self.v_seq = out.v_seq
        return out.spike_seq


class MTNode(MultiLevelNode):
    r"""Multi-threshold neuron: at most ``N`` spikes of value ``θ`` per step, soft reset.

    .. math::

        h_t = v_{t-1} + x_t,\quad k_t = \mathrm{clip}(\lfloor h_t / \theta \rfloor, 0, N),
        \quad o_t = \theta k_t,\quad v_t = h_t - o_t

    With ``θ = θ_IF / T``, ``N = T`` and ``v_init = v_IF(0) / T``, one step on the
    time-averaged input equals an IF neuron's output averaged over ``T`` steps (Theorem 1),
    for inputs in ``[0, θ_IF]`` and ``0 <= v_IF(0) < θ_IF``.

    :param v_threshold: base threshold ``θ`` (a spike carries this value)
    :param max_spikes: ``N``, the most spikes one step can emit
    :param v_init: initial (and reset) membrane potential, absolute
    :param v_reset: ``None`` = soft reset (the method's); a float = hard reset to it after firing
    :param surrogate_function: ``None``: straight-through gradient; a SpikingJelly surrogate (see :class:`MultiLevelNode`)
    :param stateful: keep the membrane between calls (see :class:`MultiLevelNode`)

    Other parameters as :class:`MultiLevelNode`. Without a surrogate the gradient is
    straight-through: ``∂o/∂x = 1`` where ``0 <= h <= N·θ``, else 0.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        max_spikes: int = 32,
        v_init: float = 0.0,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "auto",
        store_v_seq: bool = False,
        store_counts: bool = False,
        surrogate_function: Any = None,
        v_reset: float | None = None,
        stateful: bool = True,
    ):
        v_threshold = check_positive_float(v_threshold, "v_threshold")
        max_spikes = check_max_spikes(max_spikes)
        v_init = _check_real(v_init, "v_init")
        super().__init__(
            v_threshold=v_threshold, v_reset=v_reset, surrogate_function=surrogate_function, detach_reset=detach_reset,
            step_mode=step_mode, store_v_seq=store_v_seq, backend=backend, store_counts=store_counts, stateful=stateful,
        )  # fmt: skip
        self.max_spikes = max_spikes
        self.v_init = v_init
        self._set_initial_v()

    def get_extra_state(self) -> dict:
        return {"v_threshold": self.v_threshold, "max_spikes": self.max_spikes, "v_init": self.v_init, **self._state_extra()}

    def set_extra_state(self, state: dict) -> None:
        self.v_threshold = check_positive_float(state["v_threshold"], "v_threshold")
        self.max_spikes = check_max_spikes(state["max_spikes"])
        self.v_init = _check_real(state.get("v_init", 0.0), "v_init")
        self._load_state_extra(state)
        self.set_reset_value("v", self.v_init)
        self.reset()

    def extra_repr(self) -> str:
        s = f"v_threshold={self.v_threshold}, max_spikes={self.max_spikes}, v_init={self.v_init}, "
        if self.v_reset is not None:
            s += f"v_reset={self.v_reset}, "
        if not self.stateful:
            s += "stateful=False, "
        return s + f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, backend={self.backend}"

    def _initial_v(self) -> float:
        return self.v_init

    def _crossings(self, h: torch.Tensor, sign: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if sign < 0:
            return None, None
        i = torch.arange(1, self.max_spikes + 1, dtype=h.dtype, device=h.device).view(-1, *([1] * h.dim()))
        return i * self.v_threshold, torch.full_like(i, self.v_threshold)

    def _dispatch_seq(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        return ops.mtn_forward(self, x_seq, v, store_v_seq)


class SFNode(MultiLevelNode):
    r"""Scale-and-Fire neuron: a (signed) multi-threshold neuron with thresholds ``λ·θ·y_i``.

    .. math::

        h = v + x,\quad
        o = \begin{cases} \lambda\theta^+ \, y_{k},\ k = \#\{i: \lambda\theta^+ y_i \le h + r\lambda\theta^+\} & h \ge 0\\
        -\lambda\theta^- \, y_{k},\ k = \#\{i: \lambda\theta^- y_i \le -h + r\lambda\theta^-\} & h < 0\end{cases},
        \quad v \leftarrow h - o

    With evenly spaced levels (``y_i = i``, the default) this is
    ``o = λθ+·clip(floor(h/(λθ+) + r), 0, N)`` for ``h >= 0`` and
    ``o = -λθ-·clip(floor(-h/(λθ-) + r), 0, N)`` for ``h < 0``.

    :param theta_pos: base positive threshold ``θ+`` (scalar or 1-D per-channel)
    :param theta_neg: base negative threshold magnitude ``θ-``; ``None`` = positive-only site
    :param lam: scaling factor ``λ`` (> 0)
    :param max_spikes: ``N``, the most spikes per sign and step (default 32, or ``len(levels)``)
    :param levels: optional strictly increasing level multipliers ``y_1..y_N`` (defaults to ``1..N``)
    :param channel_dim: dimension of the single-step input that per-channel thresholds index
    :param offset: threshold offset ``r ∈ [0, 1)``: ``0.5`` rounds (a half-threshold start), ``0`` floors
    :param ceiling: optional cap on the positive output (a ReLU6 / ``clamp(max=c)`` site)
    :param kind: what the site is (``"relu"``, ``"qkv_in"``, ``"attn"``, ...), set by the converters;
        :func:`set_lambda` filters on it
    :param v_init: deprecated name of ``offset`` (a DeprecationWarning; removed in the next release)

    ``v_threshold`` is the positive spike value ``λθ+`` (a float for a per-tensor threshold, a
    tensor per channel); assigning it sets ``θ+ ← v_threshold/λ``. Thresholds, ``λ``, levels
    and ceiling are buffers; ``N``, ``channel_dim``, ``offset``, ``kind``, ``stateful`` and
    ``v_reset`` travel as the module's extra state, so a default-constructed ``SFNode`` loads any
    saved one (also those saved before ``offset``/``kind``/``stateful`` existed). Other
    parameters as :class:`MultiLevelNode`. Without a surrogate the gradient is straight-through on
    ``[-N·λθ-, N·λθ+]``.
    """

    _TENSOR_STATE = ("theta_pos", "theta_neg", "lam", "levels", "ceiling")

    def __init__(
        self,
        theta_pos: float | torch.Tensor = 1.0,
        theta_neg: float | torch.Tensor | None = None,
        lam: float = 1.0,
        max_spikes: int | None = None,
        levels: torch.Tensor | None = None,
        channel_dim: int | None = None,
        offset: float = _UNSET,
        ceiling: float | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "auto",
        store_v_seq: bool = False,
        store_counts: bool = False,
        kind: str = "",
        v_reset: float | None = None,
        surrogate_function: Any = None,
        stateful: bool = True,
        v_init: float = _UNSET,
    ):
        if v_init is not _UNSET:
            if offset is not _UNSET:
                raise TypeError("SFNode: give offset only (v_init is its deprecated name)")
            warnings.warn("SFNode(v_init=...) is deprecated: the threshold offset is called offset", DeprecationWarning, stacklevel=2)
            offset = check_offset(v_init, "v_init")
        offset = 0.0 if offset is _UNSET else check_offset(offset, "offset")
        super().__init__(
            v_threshold=1.0, v_reset=v_reset, surrogate_function=surrogate_function, detach_reset=detach_reset,
            step_mode=step_mode, store_v_seq=store_v_seq, backend=backend, store_counts=store_counts, stateful=stateful,
        )  # fmt: skip
        self.register_buffer("theta_pos", _check_threshold_tensor(theta_pos, "theta_pos"))
        self.register_buffer("theta_neg", None if theta_neg is None else _check_threshold_tensor(theta_neg, "theta_neg"))
        self.register_buffer("lam", torch.tensor(check_positive_float(lam, "lam (λ)"), dtype=torch.float32))
        if levels is not None:
            levels = check_levels(levels).clone()
            if max_spikes is None:
                max_spikes = levels.numel()
            elif check_max_spikes(max_spikes) != levels.numel():
                raise ValueError(f"levels has {levels.numel()} entries but max_spikes={max_spikes}")
        elif max_spikes is None:
            max_spikes = 32
        self.register_buffer("levels", levels)
        self.register_buffer(
            "ceiling", None if ceiling is None else torch.tensor(check_positive_float(ceiling, "ceiling"), dtype=torch.float32)
        )
        self.max_spikes = check_max_spikes(max_spikes)
        if channel_dim is not None and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
            raise TypeError(f"channel_dim must be an int or None, got {channel_dim!r}")
        self.channel_dim = channel_dim
        if self.theta_pos.dim() == 1 and self.theta_pos.numel() > 1 and channel_dim is None:
            raise ValueError("per-channel theta_pos needs channel_dim")
        if self.theta_neg is not None and self.theta_neg.shape != self.theta_pos.shape:
            raise ValueError(
                f"theta_neg shape {tuple(self.theta_neg.shape)} differs from theta_pos shape {tuple(self.theta_pos.shape)}"
            )
        self.offset = offset
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str, got {kind!r}")
        self.kind = kind
        self._set_initial_v()

    @classmethod
    def from_statistics(
        cls,
        stats: Mapping[str, Any],
        lam: float = 1.0,
        max_spikes: int = 32,
        signed: bool | None = None,
        **kwargs: Any,
    ) -> SFNode:
        """Build an SFN from calibration statistics.

        ``stats["pos"]`` is ``θ+`` (e.g. the 0.99-quantile of the activations) and
        ``stats["neg"]`` the magnitude ``θ-`` of the 0.01-quantile; either may be per-channel.
        ``signed=None`` makes the site signed when ``stats`` has a ``"neg"`` entry.
        """
        if "pos" not in stats:
            raise KeyError("stats must contain 'pos' (the positive base threshold θ+)")
        neg = stats.get("neg")
        if signed is None:
            signed = neg is not None
        if signed and neg is None:
            raise ValueError("signed=True needs stats['neg'] (the negative base threshold θ-)")
        return cls(theta_pos=stats["pos"], theta_neg=neg if signed else None, lam=lam, max_spikes=max_spikes, **kwargs)

    # -- properties ------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        """Whether the site has a negative branch."""
        return self.theta_neg is not None

    @property
    def v_threshold(self) -> float | torch.Tensor:
        """``λθ+``, the value of one positive spike (a float per tensor, a tensor per channel)."""
        tp = self._buffers.get("theta_pos")
        if tp is None:
            return 1.0
        t = tp * self._buffers["lam"]
        return float(t) if t.numel() == 1 else t

    @v_threshold.setter
    def v_threshold(self, value: float | torch.Tensor) -> None:
        if "theta_pos" not in self._buffers:  # BaseNode.__init__ assigns it before the buffers exist
            return
        new = _check_threshold_tensor(value, "v_threshold").to(self.theta_pos) / self.lam
        if new.numel() == 1:
            self.theta_pos.copy_(new.expand_as(self.theta_pos))
        else:
            self.theta_pos = new

    @property
    def v_init(self) -> float:
        """Deprecated name of :attr:`offset` (read by the fire dispatch; kept for one release)."""
        return self.offset

    def level_costs(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What one output element with signed count ``k`` costs per fan-out: ``(ACs, MACs)`` (the paper's Sec. 3).

        Evenly spaced levels: ``(|k|, None)``. Custom levels ``y``: a level that is a sum of ``t`` powers
        of two is ``t`` graded spikes, ``(t, 0)`` (a shift and an add each; ``t = 1`` for ``2^e``); any
        other level is one graded spike that costs a multiply, ``(0, 1)`` (:func:`functional.level_terms`).
        """
        if self.levels is None:
            return counts.abs(), None
        terms = F.level_terms(self.levels).to(device=counts.device)
        terms = torch.cat([terms.new_zeros(1), terms])
        idx = counts.abs().long().clamp(max=self.levels.numel())
        t = terms[idx]
        mac = (idx != 0) & (t == 0)
        return t.to(torch.int8), mac.to(torch.int8)

    def set_lambda(self, lam: float) -> None:
        """Rescale every threshold of this site: ``λ ← lam`` (no recalibration)."""
        self.lam.fill_(check_positive_float(lam, "lam (λ)"))

    def scaled_thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(λ·θ+, λ·θ-)``: the first threshold of each branch."""
        tn = None if self.theta_neg is None else self.theta_neg * self.lam
        return self.theta_pos * self.lam, tn

    def full_scale(self) -> torch.Tensor:
        """Largest positive output ``λ·θ+·y_N`` (``N·λθ+`` for evenly spaced levels)."""
        top = self.max_spikes if self.levels is None else self.levels[-1]
        return self.theta_pos * self.lam * top

    # -- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"max_spikes": self.max_spikes, "channel_dim": self.channel_dim, "offset": self.offset, "kind": self.kind,
                **self._state_extra()}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:
        self.max_spikes = check_max_spikes(state["max_spikes"])
        self.channel_dim = state.get("channel_dim")
        if "offset" in state:
            self.offset = check_offset(state["offset"], "offset")
        else:  # saved before the rename
            self.offset = check_offset(state.get("v_init", 0.0), "v_init")
        kind = state.get("kind", self.kind)
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str, got {kind!r}")
        self.kind = kind
        self._load_state_extra(state)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_fast_cache", None)  # derived from the buffers (and holds the CPU kernel's ctypes handles): rebuilt
        state.pop("_hot", None)
        return state

    def __setstate__(self, state: dict) -> None:
        if "offset" not in state and "v_init" in state:  # a whole-module pickle from before the rename
            state = dict(state)
            state["offset"] = state.pop("v_init")
        super().__setstate__(state)
        self.__dict__.setdefault("kind", "")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Thresholds may be per-tensor or per-channel, and theta_neg/levels/ceiling may be
        # present or absent: adopt the saved layout before the default copy.
        if prefix + "_extra_state" in state_dict:
            for name in self._TENSOR_STATE:
                key = prefix + name
                current = self._buffers.get(name)
                if key in state_dict:
                    saved = state_dict[key]
                    if current is None or current.shape != saved.shape:
                        device = self.lam.device
                        self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=device)
                elif name in ("theta_neg", "levels", "ceiling"):
                    self._buffers[name] = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name in ("theta_pos", "theta_neg"):
            t = self._buffers.get(name)
            if t is not None and (not torch.isfinite(t).all() or not (t > 0).all()):
                error_msgs.append(f"{prefix}{name}: thresholds must be finite and > 0")

    def extra_repr(self) -> str:
        def fmt(t):
            if t is None:
                return "None"
            return f"{t.item():.4g}" if t.numel() == 1 else f"[{t.numel()} channels]"

        s = f"theta_pos={fmt(self.theta_pos)}, theta_neg={fmt(self.theta_neg)}, lam={self.lam.item():.4g}, max_spikes={self.max_spikes}"
        if self.kind:
            s = f"kind={self.kind!r}, " + s
        if self.levels is not None:
            s += ", levels=custom"
        if self.channel_dim is not None:
            s += f", channel_dim={self.channel_dim}"
        if self.offset:
            s += f", offset={self.offset}"
        if self.ceiling is not None:
            s += f", ceiling={self.ceiling.item():.4g}"
        if self.v_reset is not None:
            s += f", v_reset={self.v_reset}"
        if not self.stateful:
            s += ", stateful=False"
        return s + f", step_mode={self.step_mode}, backend={self.backend}"

    def _initial_v(self) -> float:
        return 0.0  # the threshold offset acts in the fire rule (functional.multi_threshold_fire)

    def _crossings(self, h: torch.Tensor, sign: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tp, tn = self.broadcast_thresholds(h)
        step = tp if sign > 0 else tn
        if step is None:
            return None, None
        step = (step * self.lam).to(h.dtype).unsqueeze(0)
        shape = (-1, *([1] * h.dim()))
        if self.levels is None:
            y = torch.arange(1, self.max_spikes + 1, dtype=h.dtype, device=h.device).view(shape)
        else:
            y = self.levels.to(device=h.device, dtype=h.dtype).view(shape)
        inc = torch.diff(y, dim=0, prepend=torch.zeros_like(y[:1]))
        d = inc * step
        if sign > 0 and self.ceiling is not None:  # no level above the cap: k+ <= max(1, #{i: y_i <= c/λθ+})
            u = self.ceiling.to(h.dtype) / step
            cap = torch.clamp(torch.floor(u) if self.levels is None else (y <= u).sum(0, keepdim=True), min=1)
            d = torch.where(torch.arange(1, y.shape[0] + 1, device=h.device).view(shape) <= cap, d, torch.zeros_like(d))
        edges = y - self.offset if self.levels is None else F.level_edges(self.levels, self.offset).to(h).view(shape)
        return edges * step, d

    # -- forward ---------------------------------------------------------------------
    def broadcast_thresholds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Base thresholds ``(θ+, θ-)`` shaped to broadcast against a single-step input ``x``."""
        tp = F.broadcast_threshold(self.theta_pos, x, self.channel_dim, "theta_pos")
        tn = None if self.theta_neg is None else F.broadcast_threshold(self.theta_neg, x, self.channel_dim, "theta_neg")
        return tp, tn

    def _dispatch_seq(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        return ops.sfn_forward(self, x_seq, v, store_v_seq)

    # -- fast inference path -----------------------------------------------------------
    def _fast_ok(self, x: torch.Tensor) -> bool:
        """Whether this call may take :meth:`_fast_fire`: a stateless CPU float32 step that needs only the spike."""
        return (
            not _reference_only
            and not self.stateful
            and not self.store_counts
            and not self._store_v_seq
            and self.backend != "cupy"
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or any(b is not None and b.requires_grad for b in self._buffers.values())))
            and not torch.compiler.is_compiling()
        )

    def _fast_plan(self) -> dict | None:
        """Scaled thresholds, cap and level tables for :func:`functional.fast_fire`, rebuilt when a buffer changes.

        The same operations as the reference in the same dtype: ``θ± = θ±·λ`` (float32), the count cap
        ``max(1, floor(c/θ+))`` (evenly spaced) or the level cap ``y_cap``, ``cap = max(1, #{i : y_i <= c/θ+})``.
        ``None`` when the levels have no exact lookup table (the reference then fires).
        """
        buffers = self._buffers  # direct: MemoryModule.__getattr__ is slow
        bufs = (buffers["theta_pos"], buffers["theta_neg"], buffers["lam"], buffers["levels"], buffers["ceiling"])
        # the key holds the buffers themselves (compared by identity and in-place version): a cached buffer
        # stays alive, so no new buffer can reuse its id
        key = (bufs, tuple(None if b is None else b._version for b in bufs), self.offset, self.max_spikes)
        cached = self.__dict__.get("_fast_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0][0], bufs)) and cached[0][1:] == key[1:]:
            return cached[1]
        with torch.no_grad():
            f32 = torch.float32
            lam = self.lam.to(f32)
            tp = self.theta_pos.to(f32) * lam
            tn = None if self.theta_neg is None else self.theta_neg.to(f32) * lam
            plan: dict | None = {"tp": tp, "tn": tn, "cap": None, "table": None, "table_neg": None}
            ceiling = None if self.ceiling is None else self.ceiling.to(f32)
            if self.levels is None:
                if ceiling is not None:
                    plan["cap"] = torch.clamp(torch.floor(ceiling / tp), min=1)
            else:
                levels = self.levels.to(f32)
                same = tn is None or torch.equal(tp, tn)
                # one signed table for θ- = θ+; else the unsigned table with one branch per element, or two
                # half tables when the positive branch has a cap (see functional.fast_fire)
                two = not same and ceiling is not None
                table = F.level_table(levels, self.offset, signed=same and tn is not None, part="pos" if two else "both")
                table_neg = F.level_table(levels, self.offset, signed=True, part="neg") if two else None
                if table is None or (two and table_neg is None):
                    plan = None
                else:
                    plan.update(table=table, table_neg=table_neg)
                    if same:
                        plan["tn"] = None  # one lookup covers both signs
                    if ceiling is not None:
                        cap = torch.clamp(torch.searchsorted(levels, (ceiling / tp).contiguous(), right=True), min=1)
                        plan["cap"] = torch.cat([levels.new_zeros(1), levels])[cap]
        self.__dict__["_fast_cache"] = (key, plan)
        return plan

    def _fast_fire(self, x: torch.Tensor) -> torch.Tensor | None:
        """The spike of one step from rest through :func:`functional.fast_fire`, or ``None`` (take the reference).

        Per-tensor thresholds fire the input flat (contiguous) or as it lies (a permuted view such as
        attention's q, k, v: no copy); per-channel ones view it as ``[A, C]`` (channel last, or innermost in
        memory as in channels-last: no copy; thresholds ``[1, C]``) or ``[A·C, B]`` (thresholds repeated to ``[A·C, 1]``).
        """
        plan = self._fast_plan()
        if plan is None:
            return None
        tp, tn, cap = plan["tp"], plan["tn"], plan["cap"]
        if cpu.available():  # one pass over memory (sj_sfn.cpu); else the torch ops below
            kernel = plan.get("cpu")
            if kernel is None:
                levels = None if self.levels is None else self.levels.to(torch.float32)
                kernel = plan["cpu"] = cpu.FirePlan(tn is not None, cap is not None, self.max_spikes, self.offset,
                                                    plan["table"], plan["table_neg"], levels)  # fmt: skip
            try:
                return kernel(x, *_shaped_thresholds(plan, x, self.channel_dim))
            except ValueError:  # thresholds that do not fit this input, or a layout the kernel does not take (more than
                pass  # 4 non-mergeable dimensions): the torch path below checks and fires it
        if F.broadcast_threshold(tp, x, self.channel_dim, "theta_pos").dim() == 0:  # with the reference's shape checks
            h, back = x.view(-1) if x.is_contiguous() or x.dim() < 2 else x, None

            def view(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(())
        else:
            d = self.channel_dim + x.dim() if self.channel_dim < 0 else self.channel_dim
            a, c, b = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
            last = x.movedim(d, -1)
            if b > 1 and last.is_contiguous():  # channels innermost in memory (channels-last): fired as [A·B, C] where
                # they lie, the spike given back in x's layout (no copy in, none in spike_layout)
                h, b, back = last.view(a * b, c), 1, last.shape
            else:
                h, back = x.contiguous().view((a, c) if b == 1 else (a * c, b)), None

            if b == 1:
                def view(t: torch.Tensor) -> torch.Tensor:
                    return t.reshape(1, c)
            else:  # thresholds repeated per row, kept in the plan for this batch size (no copy per call)
                repeated = plan.setdefault("repeated", {})
                if a not in repeated:
                    repeated.clear()
                    repeated[a] = {id(t): t.repeat(a).reshape(a * c, 1) for t in (tp, tn, cap) if t is not None}
                rows = repeated[a]

                def view(t: torch.Tensor) -> torch.Tensor:
                    return rows[id(t)]
        out = F.fast_fire(
            h, view(tp), None if tn is None else view(tn), self.max_spikes, self.offset,
            None if cap is None else view(cap), plan["table"], plan["table_neg"],
        )  # fmt: skip
        return out.view(x.shape) if back is None else out.view(back).movedim(-1, d)

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs):
        if isinstance(x, torch.Tensor) and self._fast_ok(x):
            out = self._fast_fire(x)
            if out is not None:
                d = self.__dict__  # a plain attribute: skip MemoryModule.__setattr__ (slow) when nothing changes
                if d.get("last_counts") is not None:
                    self.last_counts = None
                if "_hot" not in d and self.step_mode == "s" and not torch.is_grad_enabled():
                    hot = _hot_fire(self, d["_fast_cache"][1])
                    if hot is not None:
                        d["_hot"] = hot
                return spike_layout(out, x)
        return spike_layout(super().single_step_forward(x, *args, **kwargs), x)

    # -- the inference hot path --------------------------------------------------------
    def forward(self, *args, **kwargs):
        """SpikingJelly's dispatch on ``step_mode``, after the hot path of a stateless CPU site in inference.

        After one call has taken the fast fire (:meth:`_fast_fire`) through the CPU kernel without
        autograd, the node keeps a bound call (:func:`_hot_fire`) that later single-step calls take
        directly: the same kernel with the same arguments, so the same spike bit for bit. Assigning
        any attribute of the node, moving it (``.to``) or changing a buffer (its in-place version)
        drops it or makes it step aside.
        """
        d = self.__dict__
        hot = d.get("_hot")
        if hot is not None and len(args) == 1 and not kwargs and not _reference_only and not torch.is_grad_enabled():
            out = hot(args[0])
            if out is not None:
                return out
            del d["_hot"]  # stale (a buffer changed) or not for this input: the full path binds anew when it can
        return super().forward(*args, **kwargs)

    def fire_inplace(self, x: torch.Tensor) -> torch.Tensor | None:
        """The spike of ``x`` written over ``x`` (returned) on the hot path, else ``None`` (call the node instead).

        For a caller whose ``x`` is a temporary nothing else reads (as ``nn.ReLU(inplace=True)``):
        it runs no hooks, so callers take it only when the node has none
        (:func:`sj_sfn.sformer.modules.fire` checks). Only a call that :meth:`forward` would send to its
        bound kernel call takes it; every other call (the first, autograd, a reference fire, a
        changed buffer) returns ``None``, and the node's own call then fires (out of place).
        """
        return self.fire_fast(x, True)

    def fire_fast(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor | None:
        """The spike of ``x`` from the node's bound kernel call, without the module call, else ``None``.

        What :meth:`forward` returns on its hot path (stateless CPU inference: the same kernel, the same bits),
        skipping ``nn.Module.__call__``. It runs no hooks: callers take it only when the node has none
        (:func:`sj_sfn.sformer.modules.fire` checks), and call the node when it returns ``None``, as they do for
        a subclass with its own ``forward`` (calling the node runs it). ``inplace``: as :meth:`fire_inplace`.
        """
        hot = self.__dict__.get("_hot")
        if hot is None or _reference_only or torch.is_grad_enabled() or type(self).forward is not SFNode.forward:
            return None
        return hot(x, inplace)

    def __setattr__(self, name: str, value: Any) -> None:
        if not (value is None and name in ("last_counts", "v_seq")):  # reset() clears these; the fire reads neither
            self.__dict__.pop("_hot", None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop("_hot", None)
        super().__delattr__(name)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_hot", None)
        return super()._apply(fn, *args, **kwargs)


def spike_layout(spike: Any, x: torch.Tensor) -> Any:
    """``spike`` in the layout every fire path of an :class:`SFNode` returns for input ``x``: ``x``'s strides where the
    CPU kernel keeps them (:func:`sj_sfn.cpu.kernels.kept_layout`: channels-last and the like), else contiguous.

    The same values in the same layout whichever path fired (the kernel, the torch fast path or the reference),
    so that the layer after a site computes the same bits either way: a convolution may round differently on
    a channels-last input than on a contiguous one. A copy only where a path returned another layout.
    """
    if not isinstance(spike, torch.Tensor) or spike.shape != x.shape:
        return spike
    shape, strides = tuple(x.shape), x.stride()
    if x.is_contiguous() or cpu.kernels.kept_layout(shape, strides) is None:  # a contiguous x: a contiguous spike
        return spike if spike.is_contiguous() else spike.contiguous()
    if spike.stride() == strides:
        return spike
    return spike.new_empty_strided(shape, strides).copy_(spike)


def _shaped_thresholds(plan: dict, x: torch.Tensor, channel_dim: int | None) -> tuple:
    """The plan's scaled ``θ+``, ``θ-`` and cap shaped for an input of ``x``'s rank, cached in the plan per rank (the
    kernel checks them against the input's sizes); ``ValueError`` when they do not broadcast against ``x``."""
    shaped = plan.setdefault("shaped", {})
    ranked = shaped.get(x.dim())
    if ranked is None:
        ranked = shaped[x.dim()] = tuple(
            None if t is None else F.broadcast_threshold(t, x, channel_dim, name)
            for t, name in ((plan["tp"], "theta_pos"), (plan["tn"], "theta_neg"), (plan["cap"], "ceiling"))
        )  # fmt: skip
    return ranked


def _env_reader(name: str) -> Callable[[], Any]:
    """A cheap reader of one environment variable as ``os.environ`` holds it (its raw value, ``None`` when unset).

    ``os.environ.get`` encodes the key and decodes the value on every call (about 1 µs, 2-3 µs inside a
    forward); the mapping's own dictionary gives the same answer from one lookup, and sees every change made
    through ``os.environ`` (``monkeypatch.setenv``, ``os.environ[...] = ...``) as ``get`` does.
    """
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and encode is not None:
        return functools.partial(data.get, encode(name))
    return functools.partial(os.environ.get, name)


def _hot_fire(node: SFNode, plan: dict | None) -> Callable[[Any], torch.Tensor | None] | None:
    """A bound call of ``node``'s CPU kernel for stateless float32 inference, or ``None`` (no kernel in ``plan``, or
    the kernel is turned off).

    The call returns the spike, or ``None`` when it does not apply (the caller then takes the full
    path): an input that is not a float32 CPU tensor, under ``torch.compile``, a buffer of the node
    replaced or changed in place since, ``SJ_SFN_CPU_KERNEL`` changed, or thresholds that do not fit the input.
    The kernel's arguments are bound once per input layout (sizes and strides). ``inplace=True`` writes the
    spike over ``x`` and returns ``x`` (when ``x`` has one memory element per index; else a new tensor).

    Inside a forward every object a call touches is cold in the cache (the layers between two sites stream
    their weights through it), so the call touches few: the checks, one dictionary lookup for the layout, the
    kernel's C entry point (:meth:`cpu.FirePlan.fire_bound` without the method call).
    """
    kernel = None if plan is None else plan.get("cpu")
    if kernel is None or not cpu.available():  # a plan keeps its kernel after SJ_SFN_CPU_KERNEL turned it off
        return None
    buffers = node._buffers
    tensors = tuple(buffers.values())
    n_buffers = len(tensors)
    held = [t for t in tensors if t is not None]
    versions = list(map(_version, held))
    env = _env_reader(cpu.kernels.ENV_VAR)
    env_value = env()
    channel_dim = node.channel_dim
    layouts: dict = {}
    call, rejected = kernel._bound, f"the CPU fire kernel rejected mode {kernel.flags}"
    tensor, f32, empty_like, contiguous, threads, compiling, same = torch.Tensor, torch.float32, torch.empty_like, torch.contiguous_format, torch.get_num_threads, torch.compiler.is_compiling, operator.is_

    def hot(x: Any, inplace: bool = False) -> torch.Tensor | None:
        if (
            type(x) is not tensor
            or x.dtype is not f32
            or not x.is_cpu
            or env() != env_value
            or compiling()
            or len(buffers) != n_buffers
            or not all(map(same, buffers.values(), tensors))
            or list(map(_version, held)) != versions
        ):
            return None
        shape = x.shape
        key = (shape, x.stride())
        bound = layouts.get(key)
        if bound is None:
            if len(layouts) >= 64:  # a site sees a handful of layouts; bound the cache anyway
                layouts.clear()
            try:
                ranked = _shaped_thresholds(plan, x, channel_dim)
                # the thresholds' views stay alive with the structure
                structure, address = kernel.bind(x, *ranked)
                bound = layouts[key] = (address, cpu.kernels.writable_in_place(*key), cpu.kernels.kept_layout(*key) is not None,
                                        structure, ranked)
            except ValueError:
                return None
        if inplace and bound[1]:
            ptr = x.data_ptr()
            if call(ptr, ptr, bound[0], threads()):
                raise RuntimeError(rejected)
            increment_version(x)
            return x
        # as cpu.kernels.spike_like: x's strides (a kept layout is dense) or contiguous; empty_like takes ~1 µs less than
        # empty(shape) (no size parsing)
        out = empty_like(x) if bound[2] else empty_like(x, memory_format=contiguous)
        if call(x.data_ptr(), out.data_ptr(), bound[0], threads()):
            raise RuntimeError(rejected)
        return out

    return hot


def register_with_spikingjelly() -> None:
    """Register MTNode and SFNode with SpikingJelly's neuron registry (serialized vision configs name them)."""
    try:
        from spikingjelly.activation_based.distributed.vision.config import register_neuron_class
    except Exception:  # pragma: no cover - optional SpikingJelly component
        return
    register_neuron_class(MTNode)
    register_neuron_class(SFNode)


def spiking_nodes(model: torch.nn.Module) -> list[tuple[str, MultiLevelNode]]:
    """All :class:`MTNode` / :class:`SFNode` of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLevelNode)]


def sfn_nodes(model: torch.nn.Module) -> list[tuple[str, SFNode]]:
    """All :class:`SFNode` sites of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SFNode)]


def set_stateful(model: torch.nn.Module, stateful: bool) -> int:
    """Make every MTN/SFN node of ``model`` keep its membrane between calls (``True``) or not; returns how many.

    ``False`` (what :func:`sj_sfn.convert` makes): every step starts from the initial membrane,
    so the same input gives the same output on every call and no membrane stays allocated.
    ``True``: SpikingJelly's contract; call ``functional.reset_net`` between sequences.
    """
    stateful = _check_bool(stateful, "stateful")
    nodes = spiking_nodes(model)
    if not nodes:
        raise ValueError(f"{type(model).__name__} has no MTNode/SFNode: convert it first (sj_sfn.convert)")
    for _, m in nodes:
        m.set_stateful(stateful)
    return len(nodes)


def set_lambda(
    model: torch.nn.Module,
    lam: float,
    *,
    kinds: Iterable[str] | str | None = None,
    names: Iterable[str] | None = None,
) -> int:
    """Set ``λ`` of the SFN sites of ``model`` (all, or those of the given ``kinds`` and/or ``names``); returns how many.

    Thresholds are rescaled in place, ``λθ·y_i``: no recalibration is needed. ``kinds`` filter
    on :attr:`SFNode.kind` (``"relu"``, ``"attn"``, ``"qkv_in"``, ...), ``names`` on the qualified
    module names; both given = sites matching both. A requested name or kind with no site is an error.
    """
    lam = check_positive_float(lam, "lam (λ)")
    nodes = sfn_nodes(model)
    if not nodes:
        raise ValueError("the model has no SFNode sites: convert it first (sj_sfn.convert)")
    chosen = nodes
    if names is not None:
        if isinstance(names, str):
            names = [names]
        wanted = set(names)
        missing = wanted - {n for n, _ in nodes}
        if missing:
            raise KeyError(f"no SFNode sites named {sorted(missing)}")
        chosen = [(n, m) for n, m in chosen if n in wanted]
    if kinds is not None:
        if isinstance(kinds, str):
            kinds = [kinds]
        wanted_kinds = set(kinds)
        present = {m.kind for _, m in nodes}
        missing = wanted_kinds - present
        if missing:
            raise ValueError(f"no SFN site of kind(s) {sorted(missing)}; the model's kinds are {sorted(present)}")
        chosen = [(n, m) for n, m in chosen if m.kind in wanted_kinds]
    for _, m in chosen:
        m.set_lambda(lam)
    return len(chosen)
