"""SFormer: one-timestep conversion of timm Vision Transformers (ViT/DeiT/DINOv2-style, EVA/EVA-02).

Sites (docs/method.md, "Where the sites go: Vision Transformers"), per block: the inputs of ``qkv``, ``proj``, ``fc1`` and ``fc2``; ``q``, ``k``
and ``v`` before the two attention products; the SoftMax output ``attn``; plus ``head_in``, the
classifier's input (the head's output stays analog, as does the patch embedding's input,
the image). Every site but ``attn`` is a signed SFN with

    θ+ = mean over batches of the p-quantile,  θ- = |mean of the (1-p)-quantile|,
    o = ±λθ±·clip(floor(±h/(λθ±)), 0, N)

(``fc2_in`` is signed too: GELU/SiLU outputs reach -0.17/-0.28, and dropping that lobe biases
every fc2 output; the negative branch costs nothing when it does not fire).

SoftMax threshold adaptation (``attn``): positive-only, with its own ``N_a``
(``softmax_max_spikes``) and a cap ``c`` = θ_softmax, the largest attention probability seen in
calibration (``softmax_cap='max'``), ``1.0`` (``'one'``) or the mean per-batch ``q``-quantile
(a float ``q``). The cap is the site's ``ceiling``: no output ever exceeds it. With
``softmax_theta='cap'`` (default) the base threshold is ``θ_a = c/(λ·N_a)`` for the conversion
λ, so the ``N_a`` levels evenly cover ``[0, c]`` (step ``c/N_a``); a later ``set_lambda(λ')``
rescales the step to ``c·λ'/(λ·N_a)`` like every other site, and the ceiling still caps at
``c``. With ``softmax_theta='quantile'`` θ_a is the p-quantile of the probabilities like the
other sites, capped by ``c``.

Rounding by default (``offset=0.5``, a half-threshold start): flooring shrinks every
signed activation toward zero by half a step on average, and in a Transformer that bias
compounds through LayerNorm and the residual stream. Measured on the digits ViT (ANN
94.99%): floor gives 93.59% at λ=0.1 and 71.3% at λ=0.25; rounding 94.15% at both, with
energy ratio 0.31 at λ=0.25. ``offset=0.0`` restores the floor.
"""

from __future__ import annotations

import copy
import numbers
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import neuron
from ..ann2snn.inputs import calibration_loader, check_model
from ..calibration import SiteObserver, calibrate
from ..checks import check_max_spikes, check_offset, check_positive_float, check_quantile
from ..neuron import SFNode
from ..utils import model_device
from . import variants as _variants  # noqa: F401  (registers the attention variants)
from .modules import SITE_KINDS, HeadSite, SFormerAttention, SFormerMlp, attention_types, mlp_types, wrapper_for

__all__ = [
    "SITE_KINDS",
    "Site",
    "prepare",
    "convert",
    "sites",
    "site_modules",
    "set_lambda",
    "set_max_spikes",
    "is_sformer",
    "site_observers",
    "place_calibrated_sites",
    "attention_modules",
    "UnreachedSite",
]

_SITE_RE = re.compile(r"(?:^|\.)sfn_([a-z0-9_]+)$")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _unsupported(model: nn.Module) -> list[str]:
    """Names and classes of attention-like modules that SFormer cannot convert (with the reason, when known)."""
    supported = attention_types()
    bad = []
    for name, m in model.named_modules():
        cls = type(m)
        where = f"{name or '<root>'} ({cls.__module__}.{cls.__qualname__})"
        if isinstance(m, SFormerAttention):
            continue
        if isinstance(m, supported):
            wrapper = wrapper_for(m)
            why = "a subclass with its own forward" if wrapper is None else getattr(wrapper, "refusal", lambda _m: None)(m)
            if why is not None:
                bad.append(f"{where}: {why}")
            continue
        if isinstance(m, nn.MultiheadAttention) or _attention_like(cls.__name__) or hasattr(m, "fused_attn"):
            bad.append(where)
    return bad


def _attention_like(class_name: str) -> bool:
    """``Attention``, ``Attn`` (CaiT), ``XCA`` or ``MSA`` in a class name, outside its block/layer containers."""
    if any(w in class_name for w in ("Block", "Layer", "Stage")):
        return False
    return any(w in class_name for w in ("Attention", "Attn", "XCA", "MSA"))


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules of ``model`` that SFormer converts (empty: no Transformer for SFormer)."""
    supported = attention_types()
    return [name for name, m in model.named_modules() if isinstance(m, supported)]


def is_sformer(model: nn.Module) -> bool:
    """Whether ``model`` already has SFormer attention modules in place."""
    return any(isinstance(m, SFormerAttention) for m in model.modules())


def prepare(
    model: nn.Module,
    site_factory: Callable[[str, str], nn.Module] | None = None,
    spike_head: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Rewrite a timm ViT/Eva onto the explicit SFormer path with a site at every SFN position.

    ``site_factory(kind, name)`` builds the module for the site ``name`` of kind ``kind``;
    the default places uncalibrated :class:`SFNode` sites (what a converted checkpoint loads
    into), ``lambda kind, name: nn.Identity()`` gives the exact ANN on the explicit path.

    :raises TypeError: for an attention module SFormer does not convert (named in the message)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_sformer(model):
        raise ValueError(f"{type(model).__name__} already has SFormer sites: convert the original ANN")
    bad = _unsupported(model)
    if bad:
        raise TypeError(
            "SFormer cannot convert these attention modules: " + ", ".join(bad)
            + ". Supported: timm Attention, AttentionRope and EvaAttention (ViT/DeiT/EVA), Swin (V1, V2), BEiT, "
            "LeViT, XCiT, CaiT, Visformer, NesT, TNT, MetaFormer (CAFormer), EfficientFormer, TinyViT, CrossViT, PVT-v2, "
            "DaViT, Hiera, MViTv2, VOLO, MobileViTV2 and torch nn.MultiheadAttention"
        )
    if site_factory is None:
        site_factory = _default_site
    if not inplace:
        model = copy.deepcopy(model)
    mlp = mlp_types()
    targets = [(n, m, wrapper_for(m)) for n, m in model.named_modules()]
    # a use_conv MLP (1x1 convolutions on maps: CAFormer's conv stages) is left to module-level placement
    targets = [(n, m, w if w is not None else SFormerMlp) for n, m, w in targets
               if w is not None or isinstance(m, mlp) and not any(isinstance(c, nn.Conv2d) for c in m.children())]
    if not any(w is not SFormerMlp for *_, w in targets):
        raise TypeError(
            f"no timm attention module (or other attention SFormer converts) found in {type(model).__name__}: sformer converts timm "
            "ViT/DeiT/EVA, Swin, BEiT, LeViT, XCiT, CaiT and models with nn.MultiheadAttention (use sj_sfn.convert for CNNs)"
        )
    for name, m, wrapper in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model

        def factory(kind: str, _prefix: str = name) -> nn.Module:
            return site_factory(kind, f"{_prefix}.sfn_{kind}")

        setattr(parent, attr, wrapper(m, factory))
    if spike_head and isinstance(getattr(model, "head", None), nn.Linear) and hasattr(model, "head_drop"):
        model.head_drop = HeadSite(model.head_drop, site_factory("head_in", "head_drop.sfn_head_in"))
    return model


def _default_site(kind: str, name: str) -> SFNode:
    if kind == "attn":
        return SFNode(theta_pos=1.0, theta_neg=None, ceiling=1.0, kind=kind)
    return SFNode(theta_pos=1.0, theta_neg=1.0, kind=kind)


def _site_kind(name: str) -> str | None:
    m = _SITE_RE.search(name)
    return m.group(1) if m and m.group(1) in SITE_KINDS else None


def site_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` for every site of a prepared/converted model, in module order."""
    out = []
    for name, m in model.named_modules():
        kind = _site_kind(name)
        if kind is not None:
            out.append((name, kind, m))
    return out


def _check_kinds(kinds: Iterable[str] | str | None) -> set[str]:
    if kinds is None:
        return set(SITE_KINDS)
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = set(kinds)
    unknown = kinds - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"unknown site kind(s) {sorted(unknown)}; the kinds are {list(SITE_KINDS)}")
    return kinds


def _check_cap(softmax_cap: Any) -> str | float:
    if isinstance(softmax_cap, str):
        if softmax_cap not in ("max", "one"):
            raise ValueError(f"softmax_cap must be 'max', 'one' or a quantile in (0, 1], got {softmax_cap!r}")
        return softmax_cap
    if isinstance(softmax_cap, bool) or not isinstance(softmax_cap, numbers.Real) or not 0.0 < float(softmax_cap) <= 1.0:
        raise ValueError(f"softmax_cap must be 'max', 'one' or a quantile in (0, 1], got {softmax_cap!r}")
    return float(softmax_cap)


class UnreachedSite(nn.Module):
    """An optional site that no calibration batch reached (a cross-attention input of a self-attention call)."""

    def __init__(self, name: str):
        super().__init__()
        self.site_name = name

    def extra_repr(self) -> str:
        return self.site_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"site {self.site_name} saw no calibration data (calibration only ran the module as a self-attention); "
            "convert again with calibration batches that reach it"
        )


def site_observers(p: float, cap_mode: str | float, per_channel: bool) -> Callable[[str, str], nn.Module]:
    """The ``site_factory`` of calibration: a signed :class:`SiteObserver` per site (per channel: the last dim); the
    SoftMax site (``attn``) positive-only, with a second observer for a quantile cap."""

    def observer(kind: str, name: str) -> nn.Module:
        if kind == "attn":
            obs = SiteObserver(p=float(p), signed=False, name=name)
            if isinstance(cap_mode, float):
                return nn.Sequential(obs, SiteObserver(p=cap_mode, signed=False, name=name + "(cap)"))
            return obs
        return SiteObserver(p=float(p), signed=True, channel_dim=-1 if per_channel else None, name=name)

    return observer


@torch.no_grad()
def place_calibrated_sites(
    snn: nn.Module,
    *,
    lam: float,
    max_spikes: int,
    softmax_max_spikes: int,
    cap_mode: str | float,
    softmax_theta: str,
    per_channel: bool,
    offset: float,
    device: torch.device | str | None = None,
) -> None:
    """Replace every calibrated observer of :func:`site_observers` by its SFN (see the module doc for the SoftMax cap).

    The SFNs go to ``device``, or to the device of ``snn``'s weights (not to the observers' CPU statistics).
    """
    home = model_device(snn) if device is None else torch.device(device)
    for name, kind, site in site_modules(snn):
        parent_name, _, attr = name.rpartition(".")
        parent = snn.get_submodule(parent_name) if parent_name else snn
        if kind in getattr(parent, "OPTIONAL_SITES", ()) and isinstance(site, SiteObserver) and site.num_batches.item() == 0:
            setattr(parent, attr, UnreachedSite(name))
            continue
        if kind == "attn":
            obs = site[0] if isinstance(site, nn.Sequential) else site
            stats = obs.statistics()
            if cap_mode == "max":
                cap = float(stats["max"].max())
            elif cap_mode == "one":
                cap = 1.0
            else:
                cap = float(site[1].statistics()["pos"].max())
            cap = min(max(cap, 1e-6), 1.0)
            # (1 - 1e-6): floor(cap / (λθ)) must be N_a, not N_a - 1 by rounding
            theta = cap / (lam * softmax_max_spikes) * (1 - 1e-6) if softmax_theta == "cap" else float(stats["pos"].max())
            node = SFNode(theta_pos=theta, lam=lam, max_spikes=softmax_max_spikes, ceiling=cap, offset=offset, kind=kind)
        else:
            stats = site.statistics()
            node = SFNode.from_statistics(
                stats, lam=lam, max_spikes=max_spikes, signed=True, offset=offset, kind=kind,
                channel_dim=-1 if per_channel else None,
            )
        setattr(parent, attr, node.to(home))


@torch.no_grad()
def convert(
    model: nn.Module,
    loader: Iterable,
    lam: float = 0.25,
    max_spikes: int = 32,
    p: float = 0.99,
    softmax_max_spikes: int | None = None,
    softmax_cap: str | float = "max",
    softmax_theta: str = "cap",
    num_batches: int | None = None,
    progress: bool = True,
    spike_head: bool = True,
    offset: float = 0.5,
    per_channel: bool = False,
    device: torch.device | str | None = None,
    v_init: float | None = None,
) -> nn.Module:
    """Convert a timm ViT/DeiT/EVA into a one-timestep SFormer (the caller's model is not touched).

    Calibrates every site on ``loader`` (``num_batches`` batches, all by default), then
    places an SFN with ``θ`` from the statistics, scale ``lam`` and ``max_spikes`` levels per
    sign; the SoftMax site gets ``softmax_max_spikes`` levels (default: ``max_spikes``) under
    the cap ``softmax_cap`` (see the module doc for ``softmax_theta``).

    :param per_channel: per-channel thresholds (last dim) for the token sites instead of one per tensor
    :param v_init: deprecated name of ``offset``
    :param offset: threshold offset in ``[0, 1)`` of every SFN: ``0.5`` (the default, as for CNNs) rounds,
        ``0.0`` floors (the paper's rule; see the module doc for why SFormer rounds)
    :returns: the converted ``nn.Module``; ``snn(x)`` takes the ANN's input and returns its kind of output
    """
    model = check_model(model, "sformer.convert")  # an nn.Module, not converted yet, no meta tensors, a weight layer
    loader = calibration_loader(loader, "sformer.convert")  # a single tensor is one batch
    if v_init is not None:
        warnings.warn("sformer.convert(v_init=...) is deprecated: the threshold offset is called offset", DeprecationWarning, stacklevel=2)
        offset = check_offset(v_init, "v_init")
    lam = check_positive_float(lam, "lam (λ)")
    max_spikes = check_max_spikes(max_spikes)
    softmax_max_spikes = max_spikes if softmax_max_spikes is None else check_max_spikes(softmax_max_spikes)
    p = check_quantile(p)
    cap_mode = _check_cap(softmax_cap)
    if softmax_theta not in ("cap", "quantile"):
        raise ValueError(f"softmax_theta must be 'cap' or 'quantile', got {softmax_theta!r}")
    if not isinstance(per_channel, bool):
        raise TypeError("per_channel must be a bool")

    snn = prepare(model, site_observers(p, cap_mode, per_channel), spike_head=spike_head, inplace=False)
    snn.eval()
    if device is not None:
        snn.to(device)
    calibrate(snn, loader, num_batches=num_batches, device=device, progress=progress, desc="calibrating SFormer")
    place_calibrated_sites(snn, lam=lam, max_spikes=max_spikes, softmax_max_spikes=softmax_max_spikes, cap_mode=cap_mode,
                           softmax_theta=softmax_theta, per_channel=per_channel, offset=offset, device=device)
    return snn


@dataclass
class Site:
    """One SFN site of a converted SFormer, with its thresholds and (optional) firing statistics.

    ``threshold = λθ+`` (the first positive threshold, the value of one spike), ``full_scale``
    the largest positive output (``min(N·λθ+, ceiling)``). Firing statistics, over the data
    given to :func:`sites`: ``rate`` = mean ``|k|`` per neuron, ``active`` = fraction with
    ``k ≠ 0``, ``saturated`` = fraction at the top level of either branch.
    """

    name: str
    kind: str
    block: int | None
    signed: bool
    lam: float
    max_spikes: int
    theta_pos: float | list[float]
    theta_neg: float | list[float] | None
    threshold: float
    full_scale: float
    ceiling: float | None
    rate: float | None = None
    active: float | None = None
    saturated: float | None = None
    module: SFNode | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("module")
        return d


def _scalar_or_list(t: torch.Tensor | None) -> float | list[float] | None:
    if t is None:
        return None
    return t.item() if t.numel() == 1 else [float(v) for v in t.flatten()]


def _sfn_sites(snn: nn.Module) -> list[tuple[str, str, SFNode]]:
    out = [(n, k, m) for n, k, m in site_modules(snn) if isinstance(m, SFNode)]
    if not out:
        raise ValueError("the model has no SFormer SFN sites: convert it with sj_sfn.sformer.convert first")
    return out


@torch.no_grad()
def sites(snn: nn.Module, loader: Iterable | None = None, num_batches: int | None = 1, progress: bool = False) -> list[Site]:
    """Every SFN site of ``snn`` with its kind, thresholds and, given ``loader``, firing statistics."""
    nodes = _sfn_sites(snn)
    stats: dict[str, list[float]] = {}
    if loader is not None:
        handles, saved = [], []

        def hook_for(name: str):
            def hook(m: SFNode, inputs, out):
                k = m.last_counts
                if k is None:
                    return
                tp, _ = m.broadcast_thresholds(out)
                k_top_pos = torch.full_like(out, float(m.max_spikes))
                if m.ceiling is not None:
                    k_top_pos = torch.clamp(torch.floor(m.ceiling / (tp * m.lam)), min=1).expand_as(out).clamp(max=m.max_spikes)
                kf = k.to(torch.float64)
                sat = (kf >= k_top_pos.to(torch.float64)) | (kf <= -m.max_spikes)
                s = stats.setdefault(name, [0.0, 0.0, 0.0, 0.0])
                s[0] += kf.abs().sum().item()
                s[1] += (k != 0).sum().item()
                s[2] += sat.sum().item()
                s[3] += k.numel()

            return hook

        for name, _, m in nodes:
            saved.append((m, m.store_counts))
            m.store_counts = True
            handles.append(m.register_forward_hook(hook_for(name)))
        try:
            calibrate(snn, loader, num_batches=num_batches, progress=progress, desc="firing statistics")
        finally:
            for h in handles:
                h.remove()
            for m, s in saved:
                m.store_counts = s
    out = []
    for name, kind, m in nodes:
        block = _BLOCK_RE.search(name)
        tp, tn = m.scaled_thresholds()
        fs = m.full_scale()
        if m.ceiling is not None:
            fs = torch.minimum(fs, m.ceiling)
        s = stats.get(name)
        out.append(
            Site(
                name=name, kind=kind, block=int(block.group(1)) if block else None, signed=m.signed,
                lam=float(m.lam), max_spikes=m.max_spikes, theta_pos=_scalar_or_list(m.theta_pos),
                theta_neg=_scalar_or_list(m.theta_neg), threshold=float(tp.max()), full_scale=float(fs.max()),
                ceiling=None if m.ceiling is None else float(m.ceiling),
                rate=None if s is None else s[0] / s[3], active=None if s is None else s[1] / s[3],
                saturated=None if s is None else s[2] / s[3], module=m,
            )
        )
    return out


def set_lambda(snn: nn.Module, lam: float, kinds: Iterable[str] | str | None = None) -> int:
    """Set ``λ`` of the sites of the given kinds (all by default); returns how many were set.

    :func:`sj_sfn.set_lambda` with the kinds checked against :data:`SITE_KINDS`. No recalibration:
    the thresholds become ``λ·θ·i``. The SoftMax site keeps its ceiling.
    """
    _sfn_sites(snn)  # a clear error for a model without SFormer sites
    return neuron.set_lambda(snn, lam, kinds=None if kinds is None else sorted(_check_kinds(kinds)))


def set_max_spikes(snn: nn.Module, max_spikes: int, kinds: Iterable[str] | str | None = None) -> int:
    """Set ``N`` (levels per sign) of the sites of the given kinds; returns how many were set.

    Only evenly spaced sites can change ``N``. The thresholds ``λθ`` stay and the full scale
    becomes ``N·λθ``, except on a site whose ``N`` levels span its ceiling (the SoftMax site in
    ``softmax_theta='cap'`` mode): there the levels keep spanning ``[0, c]``, ``θ ← θ·N_old/N``,
    as a conversion with ``softmax_max_spikes=N`` would make them.
    """
    n_new = check_max_spikes(max_spikes)
    chosen = _check_kinds(kinds)
    n = 0
    for name, kind, m in _sfn_sites(snn):
        if kind in chosen:
            if m.levels is not None:
                raise ValueError(f"site {name} has custom levels: its N is fixed by them")
            if m.ceiling is not None:
                full_scale = m.max_spikes * m.lam * m.theta_pos
                if bool(((full_scale - m.ceiling).abs() <= 1e-5 * m.ceiling).all()):  # levels span the cap: keep it so
                    m.theta_pos.mul_(m.max_spikes / n_new)
            m.max_spikes = n_new
            n += 1
    return n
