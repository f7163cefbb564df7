"""Energy accounting: ANN multiply-accumulates vs SNN synaptic operations.

The model (SPEC §5, 45 nm figures, Horowitz ISSCC 2014)::

    E_ANN = 4.6 pJ · MACs_ANN
    E_SNN = 0.9 pJ · ACs + 4.6 pJ · MACs_SNN          ratio = E_SNN / E_ANN

For a layer whose input is *spiking*, every input element with signed spike count ``k`` costs
``|k|·F`` accumulates (``F`` = its fan-out: how many weights it meets), so
``ACs = Σ |k|·F`` (count-weighted synaptic operations, "SOPs") and
``events = Σ 1[k≠0]·F`` (what it costs if a multi-level spike is one event). A layer whose
input is not spiking (the image into the first convolution, an average-pooled spike map,
a LayerNorm output) costs its dense MACs. Run for ``T`` steps on a constant input, the layer
that reads the input itself is charged once (its output is the same every step).

Fan-out: a ``Linear`` input element meets ``out_features`` weights. A convolution input
element at a given position meets ``C_out/groups`` times the number of kernel taps that
cover that position (fewer at the borders, none in the gaps of a strided convolution): the
count is exact, computed as ``Σ_out (C_out/groups) · conv(|k|, 1)`` (a convolution of the
absolute counts with an all-ones kernel, one per group).

How spiking inputs are found: during measurement every :class:`~sj_sfn.SFNode`,
:class:`~sj_sfn.MTNode` and SpikingJelly spiking node (``BaseNode``, binary spikes) has its
output tensor remembered together with its integer counts; a layer input *is* spiking when
it is one of those tensors (identity, same forward). Counts are carried through modules that
keep spikes spikes: ``Flatten``, ``Identity``, ``Dropout`` (eval), SpikingJelly's
``VoltageScaler``/``ChannelVoltageScaler`` and, for non-negative counts, ``MaxPool``.
Everything else (``AvgPool``, additions, ...) produces non-spiking values: the layers they
feed are charged MACs.

Modules may describe extra operations (attention matrix products, ...) by defining
``energy_ops(self) -> list[dict]``, called after each forward of the module; each dict has
``name``, ``kind``, ``macs``, ``acs``, ``events`` and ``ann_macs`` (summed over the batch).
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


def _dense_macs(layer: nn.Module, out: torch.Tensor) -> float:
    """Dense MACs of one forward: ``out.numel() · (fan-in per output)``."""
    if isinstance(layer, nn.Linear):
        return float(out.numel()) * layer.in_features
    if _is_hf_conv1d(layer):
        return float(out.numel()) * layer.weight.shape[0]
    k = math.prod(layer.kernel_size)
    return float(out.numel()) * (layer.in_channels // layer.groups) * k


def _is_neuron(m: nn.Module) -> bool:
    from spikingjelly.activation_based.neuron import BaseNode

    from .neuron import MTNode, SFNode

    return isinstance(m, (SFNode, MTNode, BaseNode))


def _passthrough_kind(m: nn.Module) -> str | None:
    """How a module carries spike counts from its input to its output (or ``None``)."""
    from spikingjelly.activation_based.ann2snn.modules import ChannelVoltageScaler, VoltageScaler

    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, VoltageScaler, ChannelVoltageScaler)):
        return "same"
    if isinstance(m, nn.Flatten):
        return "flatten"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return "maxpool"
    return None


class _Recorder:
    """Hooks that tie neuron outputs to counts and charge every Linear/Conv call."""

    def __init__(self, model: nn.Module, role: str):
        self.role = role  # "snn" or "ann"
        self.spiking: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: dict[str, LayerEnergy] = {}
        self.order: list[str] = []
        self.op_rows: set[str] = set()  # rows from energy_ops() (products), not from layers
        self.site_counts: dict[str, list[float]] = {}
        self.input_counts: dict[str, list[float]] = {}
        self.handles: list[Any] = []
        self.saved_store: list[tuple[nn.Module, bool]] = []
        self.step = 0
        self.static_input: torch.Tensor | None = None
        for name, m in model.named_modules():
            name = name or type(m).__name__
            if role == "snn" and _is_neuron(m):
                if hasattr(m, "store_counts"):
                    self.saved_store.append((m, m.store_counts))
                    m.store_counts = True
                self.handles.append(m.register_forward_hook(self._neuron_hook(name)))
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_hf_conv1d(m):
                self.handles.append(m.register_forward_hook(self._layer_hook(name)))
            elif role == "snn" and _passthrough_kind(m) is not None:
                self.handles.append(m.register_forward_hook(self._pass_hook(_passthrough_kind(m))))
            if role == "snn" and callable(getattr(m, "energy_ops", None)):
                self.handles.append(m.register_forward_hook(self._ops_hook(name)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for m, s in self.saved_store:
            m.store_counts = s
        self.spiking.clear()

    def new_forward(self) -> None:
        self.spiking.clear()

    def _row(self, name: str, kind: str) -> LayerEnergy:
        if name not in self.rows:
            self.rows[name] = LayerEnergy(name, kind)
            self.order.append(name)
        return self.rows[name]

    def _mark(self, out: torch.Tensor, counts: torch.Tensor) -> None:
        self.spiking[id(out)] = (out, counts)

    def _counts_of(self, x: Any) -> torch.Tensor | None:
        if not isinstance(x, torch.Tensor):
            return None
        hit = self.spiking.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else None

    def _neuron_hook(self, name: str):
        def hook(m, inputs, out):
            if not isinstance(out, torch.Tensor):
                return
            counts = getattr(m, "last_counts", None)
            if counts is None:  # a SpikingJelly node: binary (or ternary) spikes
                counts = (out != 0).to(torch.int8) * torch.sign(out).to(torch.int8)
            self._mark(out, counts)
            s = self.site_counts.setdefault(name, [0.0, 0.0])
            s[0] += counts.abs().to(torch.float64).sum().item()
            s[1] += counts.numel()

        return hook

    def _pass_hook(self, kind: str):
        def hook(m, inputs, out):
            counts = self._counts_of(inputs[0]) if inputs else None
            if counts is None or not isinstance(out, torch.Tensor):
                return
            if kind == "same":
                c = counts
            elif kind == "flatten":
                c = counts.flatten(m.start_dim, m.end_dim)
            else:
                if (counts < 0).any():
                    return
                c = _maxpool_like(m, counts)
            if c.shape == out.shape:
                self._mark(out, c)

        return hook

    def _layer_hook(self, name: str):
        def hook(m, inputs, out):
            row = self._row(name, type(m).__name__)
            ann = _dense_macs(m, out)
            row.ann_macs += ann
            if self.role == "ann":
                return
            counts = self._counts_of(inputs[0])
            if counts is None:
                if self.step > 0 and inputs[0] is self.static_input:
                    return  # the same input every step: computed once, its output reused (direct encoding)
                row.macs += ann
                row.spiking_input = False if row.spiking_input is None else row.spiking_input
                return
            row.spiking_input = True
            kn = self.input_counts.setdefault(name, [0.0, 0.0])
            kn[0] += counts.abs().to(torch.float64).sum().item()
            kn[1] += counts.numel()
            if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
                acs, ev = linear_fanout_acs(counts, m)
            else:
                acs, ev = conv_fanout_acs(counts, m)
            row.snn_acs += acs
            row.events += ev

        return hook

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


def _maxpool_like(m: nn.Module, counts: torch.Tensor) -> torch.Tensor:
    """Max-pool non-negative counts with ``m``'s geometry (valid when thresholds are constant over the window)."""
    return m(counts.to(torch.float32)).round().to(counts.dtype)


def _run(model: nn.Module, loader: Iterable, time_steps: int, num_batches: int | None, device, progress: bool,
         recorder: _Recorder, desc: str) -> int:
    from spikingjelly.activation_based import functional as sjf
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
        sjf.reset_net(model)
        recorder.static_input = x
        for t in range(time_steps):
            recorder.new_forward()
            recorder.step = t
            model(x) if kwargs is None else model(**kwargs)
        recorder.new_forward()
        recorder.static_input = None
        samples += int(x.shape[0])
        seen += 1
        if num_batches is not None and seen >= num_batches:
            break
    sjf.reset_net(model)
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
    :param ann: the source ANN; when given, ``ann_macs`` are its measured Linear/Conv MACs plus
        the ``ann_macs`` that ``energy_ops`` report; otherwise the dense MACs of the SNN's own layers
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
    # MACs of energy_ops products (attention): the ANN recorder sees only layers, so these are added to its total
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
