"""Multi-Threshold (MTN) and Scale-and-Fire (SFN) neurons as SpikingJelly nodes.

Both follow SpikingJelly 2.0's stateful-module contract: ``step_mode`` ``'s'`` (input
``[N, *]``) or ``'m'`` (input ``[T, N, *]``), the membrane ``v`` registered as memory so that
``functional.reset_net``, ``set_step_mode``, ``detach_net`` and ``base.to_functional_forward``
work, and an explicit-state ``single_step_functional_forward``. The spike *value* is
returned (count × threshold), so a converted network needs no weight rescaling.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from spikingjelly.activation_based import base
from spikingjelly.activation_based.neuron import BaseNode

from . import functional as F
from . import ops
from .checks import check_finite_positive, check_max_spikes, check_offset, check_positive_float

__all__ = ["MTNode", "SFNode", "BACKENDS", "sfn_nodes", "set_lambda"]

BACKENDS = ("torch", "cupy")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        ops.require_cupy()
    return backend


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


class _FusedForward:
    """Step forwards shared by MTNode and SFNode: every step mode runs ``_dispatch_seq`` over ``[T, ...]``.

    The state is the membrane ``v`` (float32 for 16-bit inputs), starting at ``_initial_v()``.
    """

    def materialize_states(self, inputs, states, step_mode):
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        dtype = F.compute_dtype(x.dtype)
        v = states[0]
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            v = torch.full(x.shape, self._initial_v(), dtype=dtype, device=x.device)
        elif v.dtype != dtype or v.device != x.device:
            v = v.to(dtype=dtype, device=x.device)
        return (v, *states[1:])

    def single_step_functional_forward(self, inputs, states, **kwargs):
        out = self._dispatch_seq(inputs[0].unsqueeze(0), states[0], False)
        self.last_counts = None if out.count_seq is None else out.count_seq[0]
        return (out.spike_seq[0],), (out.v, *states[1:])

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        _check_seq_input(inputs[0], type(self).__name__)
        out = self._dispatch_seq(inputs[0], states[0], False)
        self.last_counts = out.count_seq
        return (out.spike_seq,), (out.v, *states[1:])

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        _check_seq_input(x_seq, type(self).__name__)
        states = self.materialize_states((x_seq,), tuple(self._memories.values()), "m")
        out = self._dispatch_seq(x_seq, states[0], self.store_v_seq)
        self._memories["v"] = out.v
        self.last_counts = out.count_seq
        if self.store_v_seq:
            self.v_seq = out.v_seq
        return out.spike_seq


class MTNode(_FusedForward, BaseNode):
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
    :param detach_reset: detach the reset from the autograd graph
    :param step_mode: ``'s'`` or ``'m'``
    :param backend: ``'torch'`` (reference) or ``'cupy'`` (fused CUDA kernel)
    :param store_v_seq: keep the membrane of every step in ``v_seq`` (step mode ``'m'``)
    :param store_counts: keep the integer spike counts of the last forward in ``last_counts``
    :param surrogate_function: accepted for SpikingJelly config compatibility and ignored

    The gradient is straight-through: ``∂o/∂x = 1`` where ``0 <= h <= N·θ``, else 0.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        max_spikes: int = 32,
        v_init: float = 0.0,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
        store_counts: bool = False,
        surrogate_function: Any = None,
    ):
        v_threshold = check_positive_float(v_threshold, "v_threshold")
        max_spikes = check_max_spikes(max_spikes)
        if isinstance(v_init, bool) or not isinstance(v_init, numbers.Real) or not math.isfinite(v_init):
            raise ValueError(f"v_init must be a finite real number, got {v_init!r}")
        super().__init__(
            v_threshold=v_threshold,
            v_reset=None,
            surrogate_function=None,
            detach_reset=detach_reset,
            step_mode=step_mode,
            store_v_seq=store_v_seq,
        )
        self.max_spikes = max_spikes
        self.v_init = float(v_init)
        self.set_reset_value("v", self.v_init)
        self.v = self.v_init
        self.backend = _check_backend(backend)
        self.store_counts = store_counts
        self.last_counts: torch.Tensor | None = None

    # -- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"v_threshold": self.v_threshold, "max_spikes": self.max_spikes, "v_init": self.v_init}

    def set_extra_state(self, state: dict) -> None:
        self.v_threshold = check_positive_float(state["v_threshold"], "v_threshold")
        self.max_spikes = check_max_spikes(state["max_spikes"])
        self.v_init = float(state.get("v_init", 0.0))
        self.set_reset_value("v", self.v_init)
        self.reset()

    def reset(self):
        super().reset()
        self.last_counts = None

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, max_spikes={self.max_spikes}, v_init={self.v_init}, "
            f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, backend={self.backend}"
        )

    def _initial_v(self) -> float:
        return self.v_init

    def _dispatch_seq(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        return ops.mtn_forward(self, x_seq, v, store_v_seq)


class SFNode(_FusedForward, base.MemoryModule):
    r"""Scale-and-Fire neuron: a (signed) multi-threshold neuron with thresholds ``λ·θ·y_i``.

    .. math::

        h = v + x,\quad
        o = \begin{cases} \lambda\theta^+ \, y_{k},\ k = \#\{i: \lambda\theta^+ y_i \le h + r\lambda\theta^+\} & h \ge 0\\
        -\lambda\theta^- \, y_{k},\ k = \#\{i: \lambda\theta^- y_i \le -h + r\lambda\theta^-\} & h < 0\end{cases},
        \quad v \leftarrow h - o

    With evenly spaced levels (``y_i = i``, the default) this is
    ``o = λθ+·clip(floor(h/(λθ+)), 0, N)`` for ``h >= 0`` and
    ``o = -λθ-·clip(floor(-h/(λθ-)), 0, N)`` for ``h < 0``.

    :param theta_pos: base positive threshold ``θ+`` (scalar or 1-D per-channel)
    :param theta_neg: base negative threshold magnitude ``θ-``; ``None`` = positive-only site
    :param lam: scaling factor ``λ`` (> 0)
    :param max_spikes: ``N``, the most spikes per sign and step (default 32, or ``len(levels)``)
    :param levels: optional strictly increasing level multipliers ``y_1..y_N`` (defaults to ``1..N``)
    :param channel_dim: dimension of the single-step input that per-channel thresholds index
    :param v_init: threshold offset ``r ∈ [0, 1)``; ``0.5`` = start half a threshold up (rounding)
    :param ceiling: optional cap on the positive output (a ReLU6 / ``clamp(max=c)`` site)
    :param detach_reset: detach the reset from the autograd graph
    :param step_mode: ``'s'`` or ``'m'``
    :param backend: ``'torch'`` or ``'cupy'``
    :param store_v_seq: keep the membrane of every step in ``v_seq`` (step mode ``'m'``)
    :param store_counts: keep the signed integer counts of the last forward in ``last_counts``

    Thresholds, ``λ``, levels and ceiling are buffers; ``N``, ``channel_dim`` and ``v_init``
    travel as the module's extra state, so a default-constructed ``SFNode`` loads any saved one.
    The gradient is straight-through on ``[-N·λθ-, N·λθ+]``.
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
        v_init: float = 0.0,
        ceiling: float | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
        store_counts: bool = False,
    ):
        super().__init__()
        self.register_buffer("theta_pos", _check_threshold_tensor(theta_pos, "theta_pos"))
        self.register_buffer("theta_neg", None if theta_neg is None else _check_threshold_tensor(theta_neg, "theta_neg"))
        self.register_buffer("lam", torch.tensor(check_positive_float(lam, "lam (λ)"), dtype=torch.float32))
        if levels is not None:
            levels = F.check_levels(levels).clone()
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
        self.v_init = check_offset(v_init, "v_init")
        if not isinstance(detach_reset, bool):
            raise TypeError("detach_reset must be a bool")
        self.detach_reset = detach_reset
        self.register_memory("v", 0.0)
        self.step_mode = step_mode
        self.backend = _check_backend(backend)
        self.store_v_seq = store_v_seq
        self.store_counts = store_counts
        self.last_counts: torch.Tensor | None = None

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
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError("store_v_seq must be a bool")
        self._store_v_seq = value
        self.v_seq = None

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
        return {"max_spikes": self.max_spikes, "channel_dim": self.channel_dim, "v_init": self.v_init}

    def set_extra_state(self, state: dict) -> None:
        self.max_spikes = check_max_spikes(state["max_spikes"])
        self.channel_dim = state.get("channel_dim")
        self.v_init = check_offset(state.get("v_init", 0.0), "v_init")

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

    def reset(self):
        super().reset()
        self.v_seq = None
        self.last_counts = None

    def detach(self):
        """Detach the membrane and the recorded ``v_seq`` from the graph (``functional.detach_net``, TBPTT)."""
        super().detach()
        if isinstance(self.v_seq, torch.Tensor):
            self.v_seq = self.v_seq.detach()

    def extra_repr(self) -> str:
        def fmt(t):
            if t is None:
                return "None"
            return f"{t.item():.4g}" if t.numel() == 1 else f"[{t.numel()} channels]"

        s = f"theta_pos={fmt(self.theta_pos)}, theta_neg={fmt(self.theta_neg)}, lam={self.lam.item():.4g}, max_spikes={self.max_spikes}"
        if self.levels is not None:
            s += ", levels=custom"
        if self.channel_dim is not None:
            s += f", channel_dim={self.channel_dim}"
        if self.v_init:
            s += f", v_init={self.v_init}"
        if self.ceiling is not None:
            s += f", ceiling={self.ceiling.item():.4g}"
        return s + f", step_mode={self.step_mode}, backend={self.backend}"

    def _initial_v(self) -> float:
        return 0.0  # the threshold offset v_init acts in the fire rule (functional.multi_threshold_fire)

    # -- forward ---------------------------------------------------------------------
    def broadcast_thresholds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Base thresholds ``(θ+, θ-)`` shaped to broadcast against a single-step input ``x``."""
        tp = F.broadcast_threshold(self.theta_pos, x, self.channel_dim, "theta_pos")
        tn = None if self.theta_neg is None else F.broadcast_threshold(self.theta_neg, x, self.channel_dim, "theta_neg")
        return tp, tn

    def _dispatch_seq(self, x_seq: torch.Tensor, v: torch.Tensor, store_v_seq: bool) -> F.SeqOutput:
        return ops.sfn_forward(self, x_seq, v, store_v_seq)

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs):
        out = super().single_step_forward(x, *args, **kwargs)
        if self.store_v_seq:
            v = self.v.unsqueeze(0)
            self.v_seq = v.clone() if self.v_seq is None or self.v_seq.shape[1:] != v.shape[1:] else torch.cat((self.v_seq, v))
        return out


def register_with_spikingjelly() -> None:
    """Make MTNode resolvable in SpikingJelly's serialized vision configs."""
    try:
        from spikingjelly.activation_based.distributed.vision.config import register_neuron_class
    except Exception:  # pragma: no cover - optional SpikingJelly component
        return
    register_neuron_class(MTNode)


def sfn_nodes(model: torch.nn.Module) -> list[tuple[str, SFNode]]:
    """All :class:`SFNode` sites of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SFNode)]


def set_lambda(model: torch.nn.Module, lam: float, names: list[str] | None = None) -> int:
    """Set ``λ`` of every SFN site (or only those in ``names``); returns how many were set.

    Thresholds are rescaled in place, ``λθ·y_i``: no recalibration is needed.
    """
    lam = check_positive_float(lam, "lam (λ)")
    nodes = sfn_nodes(model)
    if not nodes:
        raise ValueError("the model has no SFNode sites: convert it first (sj_sfn.convert)")
    chosen = nodes if names is None else [(n, m) for n, m in nodes if n in set(names)]
    if names is not None and len(chosen) != len(set(names)):
        missing = set(names) - {n for n, _ in chosen}
        raise KeyError(f"no SFNode sites named {sorted(missing)}")
    for _, m in chosen:
        m.set_lambda(lam)
    return len(chosen)
