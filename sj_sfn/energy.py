"""Energy accounting: ANN multiply-accumulates vs SNN synaptic operations.

The model (the paper's Sec. 3 and docs/spikingjelly.md; 45 nm figures, Horowitz ISSCC 2014)::

    E_ANN = 4.6 pJ · MACs_ANN
    E_SNN = 0.9 pJ · ACs + 4.6 pJ · MACs_SNN          ratio = E_SNN / E_ANN

For a weight operation whose input is *spiking*, every input element with signed spike count
``k`` costs ``|k|·F`` accumulates (``F`` = its fan-out: how many weights it meets), so
``ACs = Σ |k|·F`` (count-weighted synaptic operations, "SOPs") and ``events = Σ 1[k≠0]·F``
(what it costs if a multi-level spike is one event). A site with custom levels ``y`` sends one
graded spike per non-zero output: ``F`` ACs when ``y_|k|`` is a power of two, ``F`` MACs
otherwise. A product of two spike tensors (attention) costs ``|k_a|·|k_b|`` ACs per pair of
spikes that meet (a power-of-two graded operand counts 1; a pair with another graded level is
one MAC). A weight operation whose input is not spiking (the image into the first convolution,
an average-pooled spike map, a LayerNorm output) costs its dense MACs. Run for ``T`` steps on a
constant input, the operation that reads the input itself is charged once.

Fan-out is exact: a convolution input element meets ``C_out/groups`` times the kernel taps
that cover it (fewer at the borders, none in the gaps of a strided convolution).

How operations are found: at ATen level, through SpikingJelly's ``DispatchCounterMode`` and
the spike registry of :mod:`sj_sfn.op_counter` (the same rules as the SpikingJelly counters
there, so both count every operation alike). Every ``convolution``/``mm``/``addmm``/``bmm``
is seen, whether a module or a functional call in an FX graph issued it, and a padding done
inside a module's forward (timm's ``Conv2dSame``) is part of the input the fan-out follows.
Neuron outputs (:class:`~sj_sfn.MultiLevelNode`, SpikingJelly ``BaseNode``) are spikes, and
stay spikes through operations that only move, copy, pad, max-pool or rescale them; anything
else (``AvgPool``, additions, ...) is not spiking. A row is named after the module that owns
the weight (``"0"``, ``"blocks.3.mlp.fc1"``), or the innermost module for a computed weight.

Modules may describe extra operations (attention matrix products, ...) by defining
``energy_ops(self) -> list[dict]``, called after each forward of the module; each dict has
``name``, ``kind``, ``macs``, ``acs``, ``events`` and ``ann_macs`` (summed over the batch). A
product of two activations inside such a module is left to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as TF

from .utils import batch_inputs

__all__ = ["E_AC_PJ", "E_MAC_PJ", "LayerEnergy", "EnergyReport", "measure_energy", "conv_fanout_acs", "linear_fanout_acs"]

E_AC_PJ = 0.9
E_MAC_PJ = 4.6

_CONV_FN = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}


@dataclass
class LayerEnergy:
    """Operation counts of one layer or operation, per sample (averaged over the data)."""

    name: str
    kind: str
    ann_macs: float = 0.0
    snn_acs: float = 0.0
    events: float = 0.0
    macs: float = 0.0
    firing_rate: float | None = None
    spiking_input: bool | None = None

    @property
    def snn_energy_pj(self) -> float:
        return E_AC_PJ * self.snn_acs + E_MAC_PJ * self.macs

    @property
    def ann_energy_pj(self) -> float:
        return E_MAC_PJ * self.ann_macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "ann_macs": self.ann_macs, "snn_acs": self.snn_acs,
            "events": self.events, "macs": self.macs, "firing_rate": self.firing_rate,
            "spiking_input": self.spiking_input,
        }


@dataclass
class EnergyReport:
    """Result of :func:`measure_energy`; all counts are per sample.

    ``ratio = (0.9·sops + 4.6·macs) / (4.6·ann_macs)``; ``event_ratio`` uses ``events``
    instead of ``sops``. ``firing_rates`` maps each neuron site to its mean spike count per
    neuron and forward step (``|k|`` averaged; at most ``N``).
    """

    sops: float
    events: float
    macs: float
    ann_macs: float
    per_layer: list[LayerEnergy]
    firing_rates: dict[str, float]
    samples: int
    time_steps: int = 1
    ann_measured: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def snn_energy_pj(self) -> float:
        return E_AC_PJ * self.sops + E_MAC_PJ * self.macs

    @property
    def ann_energy_pj(self) -> float:
        return E_MAC_PJ * self.ann_macs

    @property
    def ratio(self) -> float:
        """``E_SNN / E_ANN`` with count-weighted synaptic operations."""
        return self.snn_energy_pj / self.ann_energy_pj if self.ann_macs > 0 else math.nan

    @property
    def event_ratio(self) -> float:
        """``E_SNN / E_ANN`` counting a multi-level spike as one event."""
        e = E_AC_PJ * self.events + E_MAC_PJ * self.macs
        return e / self.ann_energy_pj if self.ann_macs > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio, "event_ratio": self.event_ratio, "sops": self.sops, "events": self.events,
            "macs": self.macs, "ann_macs": self.ann_macs, "snn_energy_pj": self.snn_energy_pj,
            "ann_energy_pj": self.ann_energy_pj, "samples": self.samples, "time_steps": self.time_steps,
            "ann_measured": self.ann_measured, "firing_rates": dict(self.firing_rates),
            "per_layer": [r.to_dict() for r in self.per_layer], "constants_pj": {"ac": E_AC_PJ, "mac": E_MAC_PJ},
        }

    def table(self) -> str:
        """A plain-text per-layer table with totals."""

        def f(v: float | None) -> str:
            if v is None:
                return "-"
            if v == 0:
                return "0"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"

        head = ("layer", "kind", "ANN MACs", "SNN ACs", "events", "SNN MACs", "rate")
        rows = [head] + [
            (r.name, r.kind, f(r.ann_macs), f(r.snn_acs), f(r.events), f(r.macs), f(r.firing_rate)) for r in self.per_layer
        ]
        rows.append(("total", "", f(self.ann_macs), f(self.sops), f(self.events), f(self.macs), ""))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        lines.append(
            f"per sample, T={self.time_steps}: E_SNN = {self.snn_energy_pj / 1e6:.4g} uJ, E_ANN = {self.ann_energy_pj / 1e6:.4g} uJ, "
            f"ratio = {self.ratio:.4f} (events: {self.event_ratio:.4f})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- counting helpers ------------------------------------------------------------------


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def linear_fanout_acs(counts: torch.Tensor, layer: nn.Linear) -> tuple[float, float]:
    """``(Σ|k|·F, Σ1[k≠0]·F)`` for counts ``k`` entering ``layer`` (``F = out_features``; a ``Conv1D``'s ``nf``)."""
    a = counts.abs().to(torch.float64)
    f = float(layer.nf if _is_hf_conv1d(layer) else layer.out_features)
    return a.sum().item() * f, (a > 0).sum().item() * f


def conv_fanout_acs(counts: torch.Tensor, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[float, float]:
    """``(Σ|k|·F, Σ1[k≠0]·F)`` for counts entering a convolution, with the exact per-position fan-out.

    ``Σ_pos |k|·F(pos) = (C_out/groups) · Σ_out conv(|k|, ones[groups, C_in/groups, *kernel])``,
    computed as a grouped convolution of the per-group channel sums with ``ones[groups, 1, *kernel]``.
    """
    nd = len(layer.kernel_size)
    if counts.dim() == nd + 2:
        pass
    elif counts.dim() == nd + 1:
        counts = counts.unsqueeze(0)
    elif counts.dim() == nd + 3:  # multi-step [T, N, C, ...]
        counts = counts.flatten(0, 1)
    else:
        raise ValueError(f"counts of shape {tuple(counts.shape)} do not fit a {nd}-d convolution")
    g = layer.groups
    # summing |k| over each group's input channels first gives the same result with a 1-channel kernel
    a = counts.abs().to(torch.float64)
    e = (a > 0).to(torch.float64)
    a = a.unflatten(1, (g, -1)).sum(2)
    e = e.unflatten(1, (g, -1)).sum(2)
    ones = torch.ones(g, 1, *layer.kernel_size, dtype=torch.float64, device=a.device)
    conv = _CONV_FN[nd]
    padding = layer.padding
    if layer.padding_mode != "zeros":
        pads = layer._reversed_padding_repeated_twice
        a = TF.pad(a, pads, mode=layer.padding_mode)
        e = TF.pad(e, pads, mode=layer.padding_mode)
        padding = 0
    per_group_out = layer.out_channels // g
    kw = {"stride": layer.stride, "padding": padding, "dilation": layer.dilation, "groups": g}
    acs = conv(a, ones, **kw).sum().item() * per_group_out
    events = conv(e, ones, **kw).sum().item() * per_group_out
    return acs, events


def _is_neuron(m: nn.Module) -> bool:
    from spikingjelly.activation_based.neuron import BaseNode

    return isinstance(m, BaseNode)


def _innermost(parent_names: set[str]) -> str:
    """The innermost active module's path (the module tracker's names start with the root class name)."""
    best = max(parent_names - {"Global"}, key=lambda n: n.count("."), default="")
    return best.partition(".")[2] if "." in best else best


class _Recorder:
    """Ties neuron outputs to their counts (forward hooks) and charges every weight operation at ATen level.

    Weight operations (``convolution``, ``mm``/``addmm``, ``bmm``/``baddbmm``) are seen through
    SpikingJelly's ``DispatchCounterMode``, whatever module or functional call issued them; a row is
    named after the module owning the weight parameter (the innermost module for a computed weight).
    A product of two activations inside a module with ``energy_ops`` is left to those.
    """

    def __init__(self, model: nn.Module, role: str):
        from spikingjelly.activation_based.op_counter import BaseCounter

        from .op_counter import PROPAGATING_OPS, WEIGHT_OPS, SpikeRegistry

        self.role = role  # "snn" or "ann"
        self.registry = SpikeRegistry(model)
        self.rows: dict[str, LayerEnergy] = {}
        self.order: list[str] = []
        self.op_rows: set[str] = set()  # rows of activation products (energy_ops, matmuls): not weight layers
        self.weight_rows: set[str] = set()
        self.site_counts: dict[str, list[float]] = {}
        self.input_counts: dict[str, list[float]] = {}
        self.handles: list[Any] = []
        self.saved_store: list[tuple[nn.Module, bool]] = []
        self.step = 0
        self.owners: dict[int, tuple[str, str]] = {}
        for name, m in model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                owner = name or pname
                self.owners.setdefault(p.untyped_storage().data_ptr(), (owner, type(m).__name__))
        for name, m in model.named_modules():
            name = name or type(m).__name__
            if role == "snn" and _is_neuron(m):
                if hasattr(m, "store_counts"):
                    self.saved_store.append((m, m.store_counts))
                    m.store_counts = True
                self.handles.append(m.register_forward_hook(self._neuron_hook(name)))
            if role == "snn" and callable(getattr(m, "energy_ops", None)):
                self.handles.append(m.register_forward_hook(self._ops_hook(name)))
        recorder = self

        class _Counter(BaseCounter):
            def __init__(self) -> None:
                super().__init__()
                self.rules = dict.fromkeys(set(WEIGHT_OPS) | set(PROPAGATING_OPS))

            def count(self, func, args, kwargs, out, active_modules=None, parent_names=None) -> int:
                recorder.on_op(func, args, kwargs, out, active_modules or set(), parent_names or set())
                return 0

            def record(self, scope, func, value) -> None:
                pass

        self.counter = _Counter()
        self.weight_ops = WEIGHT_OPS

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for m, s in self.saved_store:
            m.store_counts = s
        self.registry.clear()

    def new_forward(self, x: torch.Tensor | None) -> None:
        self.registry.clear()
        if x is not None and self.step > 0:
            self.registry.mark_static(x)

    def _row(self, name: str, kind: str) -> LayerEnergy:
        if name not in self.rows:
            self.rows[name] = LayerEnergy(name, kind)
            self.order.append(name)
        return self.rows[name]

    def _neuron_hook(self, name: str):
        from .op_counter import Shadow

        def hook(m, inputs, out):
            if not isinstance(out, torch.Tensor):
                return
            shadow = Shadow.of_node(m, out)
            self.registry.mark(out, shadow)
            s = self.site_counts.setdefault(name, [0.0, 0.0])
            s[0] += shadow.mag.to(torch.float64).sum().item()
            s[1] += shadow.mag.numel()

        return hook

    def on_op(self, func, args, kwargs, out, active_modules: set, parent_names: set) -> None:
        if func not in self.weight_ops:
            self.registry.propagate(func, args, kwargs, out)
            return
        i, j = self.weight_ops[func]
        owner = None
        for w, x in ((args[j], args[i]), (args[i], args[j])):
            if isinstance(w, torch.Tensor) and (owner := self.owners.get(w.untyped_storage().data_ptr())) is not None:
                activation = x
                break
        else:
            activation = args[i]
        if owner is None:
            kind = "conv" if func is torch.ops.aten.convolution.default else "matmul"
            if kind == "matmul":  # a product of two activations
                if self.role == "ann" or any(callable(getattr(m, "energy_ops", None)) for m in active_modules):
                    return  # the ANN's products come from the SNN's rows; energy_ops count their own
            name = _innermost(parent_names) or "model"
            owner = (f"{name}.matmul" if kind == "matmul" else name, kind)
        cost = self.registry.cost(func, args, kwargs, out)
        row = self._row(*owner)
        if owner[1] == "matmul" and owner[0].endswith(".matmul"):
            self.op_rows.add(row.name)
        else:
            self.weight_rows.add(row.name)
        row.ann_macs += cost.dense_macs
        if self.role == "ann":
            return
        if self.step > 0 and self.registry.is_static(activation):
            return  # the same input every step: computed once, its output reused (direct encoding)
        if not cost.spiking:
            row.macs += cost.dense_macs
            row.spiking_input = False if row.spiking_input is None else row.spiking_input
            return
        row.spiking_input = True
        row.snn_acs += cost.acs
        row.events += cost.events
        row.macs += cost.graded_macs
        if cost.input_numel:
            kn = self.input_counts.setdefault(row.name, [0.0, 0.0])
            kn[0] += cost.input_mag
            kn[1] += cost.input_numel

    def _ops_hook(self, name: str):
        def hook(m, inputs, out):
            for op in m.energy_ops() or []:
                missing = {"name", "kind", "macs", "acs", "events", "ann_macs"} - set(op)
                if missing:
                    raise ValueError(f"{name}.energy_ops() returned an entry without {sorted(missing)}")
                row = self._row(f"{name}.{op['name']}", str(op["kind"]))
                self.op_rows.add(row.name)
                row.ann_macs += float(op["ann_macs"])
                row.macs += float(op["macs"])
                row.snn_acs += float(op["acs"])
                row.events += float(op["events"])

        return hook


def _reset_neurons(model: nn.Module) -> None:
    """Reset the state of every SpikingJelly ``MemoryModule`` (``reset_net`` would also call the ``reset`` of other
    modules, such as timm's ``ClassifierHead.reset(num_classes)``, which needs arguments)."""
    from spikingjelly.activation_based.base import MemoryModule

    for m in model.modules():
        if isinstance(m, MemoryModule):
            m.reset()


def _run(model: nn.Module, loader: Iterable, time_steps: int, num_batches: int | None, device, progress: bool,
         recorder: _Recorder, desc: str) -> int:
    # nn.MultiheadAttention's fused inference path computes its projections in one native call that the
    # op counter cannot see: count the ops of the plain path (the same arithmetic)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    # SpikingJelly's module tracker hooks every module input that requires grad; a view of a parameter made
    # under no_grad (CaiT's expanded class token, PiT's) requires grad without a grad_fn and breaks it:
    # count with the parameters frozen, then restore them
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        return _run_batches(model, loader, time_steps, num_batches, device, progress, recorder, desc)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p in trainable:
            p.requires_grad_(True)


def _run_batches(model: nn.Module, loader: Iterable, time_steps: int, num_batches: int | None, device, progress: bool,
                 recorder: _Recorder, desc: str) -> int:
    from spikingjelly.activation_based.op_counter import DispatchCounterMode
    from tqdm.auto import tqdm

    samples = 0
    seen = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        kwargs = dict(batch) if isinstance(batch, Mapping) and "input_ids" in batch else None  # Hugging Face inputs
        x = batch_inputs(batch) if kwargs is None else kwargs["input_ids"]
        if device is not None:
            x = x.to(device)
            if kwargs is not None:
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        _reset_neurons(model)
        for t in range(time_steps):
            recorder.step = t
            recorder.new_forward(x)
            with DispatchCounterMode([recorder.counter]):
                model(x) if kwargs is None else model(**kwargs)
        recorder.step = 0
        recorder.new_forward(None)
        samples += int(x.shape[0])
        seen += 1
        if num_batches is not None and seen >= num_batches:
            break
    _reset_neurons(model)
    if samples == 0:
        raise ValueError("the loader is empty: measure_energy needs at least one batch")
    return samples


@torch.no_grad()
def measure_energy(
    snn: nn.Module,
    loader: Iterable,
    ann: nn.Module | None = None,
    time_steps: int = 1,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> EnergyReport:
    """Count the operations of ``snn`` (and of ``ann``) over ``loader``; per-sample averages.

    :param snn: converted network (SFN/MTN or SpikingJelly neurons), run in single-step mode
    :param loader: batches of inputs (``x`` or ``(x, y, ...)``, or a Hugging Face mapping with ``input_ids``: ``model(**batch)``)
    :param ann: the source ANN; when given, ``ann_macs`` are its measured weight-operation MACs plus
        the ``ann_macs`` of the SNN's activation products (``energy_ops``, matmuls); otherwise the
        dense MACs of the SNN's own operations. The two must have the same weight layers: a layer
        counted on one side only raises ``ValueError`` naming it
    :param time_steps: forward passes per input (a rate-coded network run for ``T`` steps);
        the SNN counts are summed over the steps, the ANN runs once. A layer that reads the
        network input itself (the image: the same every step) is charged its MACs once
    :param num_batches: stop after this many batches
    :param device: move inputs here (default: leave them where the loader puts them)
    :param progress: show a progress bar
    """
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, got {type(snn).__name__}")
    was_training = snn.training
    snn.eval()
    rec = _Recorder(snn, "snn")
    try:
        samples = _run(snn, loader, time_steps, num_batches, device, progress, rec, "energy (SNN)")
    finally:
        rec.close()
        snn.train(was_training)
    rows = [rec.rows[n] for n in rec.order]
    # ANN MACs of one forward: the SNN layers counted them once per step
    for r in rows:
        r.ann_macs /= time_steps
    ops_ann = sum(r.ann_macs for r in rows if r.name in rec.op_rows)
    ann_total = sum(r.ann_macs for r in rows)
    if ann is not None:
        ann_was_training = ann.training
        ann.eval()
        arec = _Recorder(ann, "ann")
        try:
            ann_samples = _run(ann, loader, 1, num_batches, device, False, arec, "energy (ANN)")
        finally:
            arec.close()
            ann.train(ann_was_training)
        _check_same_layers(rec.weight_rows, arec.weight_rows)
        ann_total = sum(r.ann_macs for r in arec.rows.values()) * samples / ann_samples + ops_ann
    for r in rows:
        r.ann_macs /= samples
        r.snn_acs /= samples
        r.events /= samples
        r.macs /= samples
    firing = {}
    for name, (tot, n) in rec.site_counts.items():
        firing[name] = tot / n if n else 0.0
    # a layer's firing rate: mean |k| per element of its spiking input
    for r in rows:
        if r.name in rec.input_counts:
            tot, n = rec.input_counts[r.name]
            r.firing_rate = tot / n if n else 0.0
    sops = sum(r.snn_acs for r in rows)
    events = sum(r.events for r in rows)
    macs = sum(r.macs for r in rows)
    return EnergyReport(
        sops=sops, events=events, macs=macs, ann_macs=ann_total / samples, per_layer=rows, firing_rates=firing,
        samples=samples, time_steps=time_steps, ann_measured=ann is not None,
    )


def _check_same_layers(snn_layers: set[str], ann_layers: set[str]) -> None:
    """Every weight layer of the ANN must be counted in the SNN and vice versa."""
    only_ann, only_snn = sorted(ann_layers - snn_layers), sorted(snn_layers - ann_layers)
    if only_ann or only_snn:
        parts = []
        if only_ann:
            parts.append(f"in the ANN but not in the SNN: {only_ann}")
        if only_snn:
            parts.append(f"in the SNN but not in the ANN: {only_snn}")
        raise ValueError(
            "measure_energy: the SNN and the ANN do not run the same weight layers (" + "; ".join(parts)
            + "): pass the ANN this SNN was converted from, or count every layer on both sides"
        )
