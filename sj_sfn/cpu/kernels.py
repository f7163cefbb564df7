"""Build, cache and call the one-pass CPU fire kernel (``fire.c``) through ``ctypes``.

The kernel is plain C (no torch headers): it compiles once (about 8 s on 2 cores: every mode and
layout is specialised) with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), with
OpenMP when the compiler has it, and is
cached under ``$SJ_SFN_CACHE_DIR`` (default ``~/.cache/sj-sfn``) keyed by the source, the
compiler, its flags and the CPU. It shares torch's OpenMP runtime (the same ``libgomp.so.1`` is
already loaded), so it adds no thread pool of its own.

``SJ_SFN_CPU_KERNEL=0`` (or ``off``/``torch``) disables it; without a compiler, or when the build
fails, :func:`status` says why and the neurons keep their torch fast path (same results, several
passes over memory instead of one).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "SOURCE_FILE", "FLAGS", "Lookup", "Bound", "FirePlan", "enabled", "status", "available", "library", "fire", "cache_dir",
           "kept_layout", "memory_order", "spike_like", "writable_in_place"]

ENV_VAR = "SJ_SFN_CPU_KERNEL"
SOURCE_FILE = "fire.c"
ABI_VERSION = 6
# IEEE arithmetic: no fast-math, no multiply-add contraction (h/θ and θ·k must round as torch's do);
# no trapping math (FP exception flags are not observed) lets the loops vectorise
FLAGS: tuple[str, ...] = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math")
NATIVE = ("-march=native",)
OPENMP = ("-fopenmp",)
# mode flags of fire.c
SELECT, TABLE, CAP, NEG, TABLE_NEG, FLOAT, SUBNORMAL = 1, 2, 4, 8, 16, 32, 64
MIN_PER_THREAD = 1 << 12  # elements per thread: below this a parallel region costs more than it saves (a site costs
# about four ReLUs per element, so it splits four times earlier than torch's elementwise ops, whose grain is 32 K)

_i64_4 = ctypes.c_int64 * 4


def cache_dir() -> Path:
    """Where built kernels live: ``$SJ_SFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/sj-sfn``, else ``~/.cache/sj-sfn``."""
    root = os.environ.get("SJ_SFN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "sj-sfn"


def _writable(folder: Path) -> Path:
    """``folder`` if it can be created and written, else a per-user folder under the system's temporary directory."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"sj-sfn-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "cpu"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def enabled() -> bool:
    """Whether the kernel may be used: ``SJ_SFN_CPU_KERNEL`` is not ``0``/``off``/``false``/``no``/``torch`` (read on every call)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "off", "false", "no", "torch")


@functools.cache
def source() -> str:
    """The C source of the kernel, read from the installed package."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc.split()[0]):
        return cc.split()[0]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """The CPU the native build is for: the model name and feature flags of ``/proc/cpuinfo`` (or the platform)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _torch_openmp() -> Path | None:
    """The OpenMP runtime bundled with torch, when its name differs from the system's ``libgomp.so.1``."""
    lib = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib"):
        for path in sorted(lib.glob(pattern)):
            return None if path.name == "libgomp.so.1" else path  # same soname: the loaded copy is shared anyway
    return None


def _commands(cc: str, flags: tuple[str, ...], src: Path, obj: Path, out: Path) -> list[list[str]]:
    """Compile (and link) commands. With OpenMP, link against torch's own runtime when it is bundled under another
    name, so that the kernel and torch share one thread pool."""
    runtime = _torch_openmp() if OPENMP[0] in flags else None
    if runtime is None:
        return [[cc, *flags, str(src), "-o", str(out), "-lm"]]
    compile_flags = [f for f in flags if f != "-shared"]
    return [[cc, *compile_flags, "-c", str(src), "-o", str(obj)],
            [cc, "-shared", str(obj), "-o", str(out), str(runtime), f"-Wl,-rpath,{runtime.parent}", "-lm"]]  # fmt: skip


def _try_build(cc: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile to ``target`` (atomically); the compiler's message on failure, else ``None``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / SOURCE_FILE
        src.write_text(source(), encoding="utf-8")
        out = Path(tmp) / target.name
        for cmd in _commands(cc, flags, src, Path(tmp) / "fire.o", out):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                return f"{type(e).__name__}: {e}"
            if proc.returncode != 0:
                return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit status {proc.returncode}"
        os.replace(out, target)
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc!r} does not run ({type(e).__name__}: {e})"
    errors = []
    # the fastest build that compiles: native code with OpenMP, then without either
    for extra in (NATIVE + OPENMP, OPENMP, NATIVE, ()):
        flags = FLAGS + extra
        parts = [source(), cc, version, *flags, _cpu_signature() if NATIVE[0] in flags else "", str(_torch_openmp())]
        key = hashlib.sha256("\0".join(parts).encode())
        target = _writable(cache_dir() / "cpu") / f"fire-{key.hexdigest()[:20]}.so"
        if not target.exists():
            err = _try_build(cc, flags, target)
            if err is not None:
                errors.append(f"{' '.join(extra) or 'plain'}: {err.splitlines()[-1] if err else err}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
            if lib.sj_sfn_abi_version() != ABI_VERSION:
                raise OSError(f"ABI version {lib.sj_sfn_abi_version()} != {ABI_VERSION}")
        except (OSError, AttributeError) as e:
            errors.append(f"{target.name}: {e}")
            continue
        f = lib.sj_sfn_fire_f32
        f.restype = ctypes.c_int
        P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        f.argtypes = [P, _i64_4, _i64_4, P, P, P, P, _i64_4, ctypes.c_int, F32, F32, P, P, ctypes.c_int, I64]
        g = lib.sj_sfn_fire_bound
        g.restype = ctypes.c_int
        g.argtypes = [P, P, P, ctypes.c_int]
        how = "with OpenMP" if OPENMP[0] in flags else "single-threaded (the compiler has no OpenMP)"
        return lib, f"built with {cc} {' '.join(extra)} ({how}), cached in {target.parent}"
    return None, "the build failed: " + "; ".join(errors)


def status() -> tuple[bool, str]:
    """``(usable, reason)``: whether the kernel is enabled, built and loaded (built on the first call)."""
    if not enabled():
        return False, f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    lib, why = _load()
    return lib is not None, why


def available() -> bool:
    """Whether the neurons fire through :func:`fire` (enabled, and built on the first call)."""
    return enabled() and _load()[0] is not None


def library() -> ctypes.CDLL:
    """The loaded kernel library; raises ``RuntimeError`` with the reason when it is unusable."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"the CPU fire kernel is unavailable: {why}")
    return lib


class Lookup(ctypes.Structure):
    """A level function ``u -> T[u]`` as ``fire.c`` reads it: a table, or the float levels computed from the bits."""

    _fields_ = [
        ("table", ctypes.c_void_p), ("shift", ctypes.c_int32), ("mask", ctypes.c_uint32),
        ("first_edge", ctypes.c_float), ("top", ctypes.c_float),
        ("pos", ctypes.c_float), ("neg", ctypes.c_float), ("add", ctypes.c_uint32), ("trunc", ctypes.c_uint32),
        ("sub", ctypes.c_float), ("inv_sub", ctypes.c_float), ("sub_edge", ctypes.c_float),
    ]  # fmt: skip


class Bound(ctypes.Structure):
    """Every argument of one kernel call but the input, the output and the thread count (``fire.c``'s ``Bound``)."""

    _fields_ = [
        ("n", ctypes.c_int64 * 4), ("hs", ctypes.c_int64 * 4), ("ts", ctypes.c_int64 * 4),
        ("tp", ctypes.c_void_p), ("tn", ctypes.c_void_p), ("cap", ctypes.c_void_p),
        ("pos", ctypes.POINTER(Lookup)), ("neg", ctypes.POINTER(Lookup)),
        ("min_per_thread", ctypes.c_int64), ("flags", ctypes.c_int32), ("max_spikes", ctypes.c_float), ("offset", ctypes.c_float),
    ]  # fmt: skip


def _float_format(levels: torch.Tensor, offset: float) -> tuple[int, int, bool] | None:
    """``(m, r·2^(23-m), subnormal)`` when ``levels`` are :func:`~sj_sfn.functional.float_levels` ``(m, ·, subnormal)``
    with ``m >= 1`` and ``r`` is dyadic in ``[0, 1)``, else ``None`` (powers of two, ``m = 0``, keep the table: a
    truncation to no mantissa bit would turn a NaN into ±inf)."""
    from ..functional import float_levels

    n, y = levels.numel(), levels.to(torch.float32)
    for m in range(1, 5):
        s = 1 << m
        for subnormal in (False, True):
            octaves = (n + 1) // s - 1 if subnormal else n // s
            if octaves < 1 or (n + 1 if subnormal else n) % s or not torch.equal(y, float_levels(m, octaves, subnormal=subnormal)):
                continue
            add = float(offset) * (1 << (23 - m))
            if 0.0 <= offset < 1.0 and add == int(add):  # r < 1 (a node's offset): the rounding of ±inf stays ±inf
                return m, int(add), subnormal
    return None


def _bucket_probe(table) -> torch.Tensor:
    """The smallest and largest float32 of every bucket of ``table``, both signs (every value the level function can take)."""
    shift = int(table.shift)
    lo = torch.arange(1 << (32 - shift), dtype=torch.int64) << shift
    hi = lo + ((1 << shift) - 1)
    bits = torch.cat([lo, hi])
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


class FirePlan:
    """The arguments of one node's kernel call that do not depend on the input: mode, level functions, ``N``, ``r``.

    ``levels`` (with a ``table``) lets float levels take the gather-free level function; it is used only
    after checking that it equals the table on every bucket boundary of both signs.
    """

    def __init__(self, signed: bool, capped: bool, max_spikes: int, offset: float, table=None, table_neg=None,
                 levels: torch.Tensor | None = None) -> None:  # fmt: skip
        self.lib = library()
        select = signed and table_neg is None and (table is not None or not capped)
        self.flags = (SELECT if select else 0) | (TABLE if table is not None else 0) | (CAP if capped and not select else 0)
        self.flags |= (NEG if signed else 0) | (TABLE_NEG if table_neg is not None else 0)
        self.max_spikes, self.offset = float(max_spikes), float(offset)
        self._n, self._r = ctypes.c_float(self.max_spikes), ctypes.c_float(self.offset)  # converted once, not per call
        self._fn = self.lib.sj_sfn_fire_f32
        self._bound = self.lib.sj_sfn_fire_bound
        self._layouts: dict = {}
        self._tables = (table, table_neg)  # kept alive: the structures point into them
        self.pos = None if table is None else self._lookup(table)
        self.neg = None if table_neg is None else self._lookup(table_neg)
        fmt = None if levels is None or table is None else _float_format(levels, offset)
        if fmt is not None:
            float_pos = None if table is None else self._float_lookup(table, levels, offset, fmt)
            float_neg = None if table_neg is None else self._float_lookup(table_neg, levels, offset, fmt)
            bits = FLOAT | (SUBNORMAL if fmt[2] else 0)
            if all(self._same_levels(t, a, b, bits) for t, a, b in ((table, self.pos, float_pos), (table_neg, self.neg, float_neg)) if t is not None):
                self.pos, self.neg, self.flags = float_pos, float_neg, self.flags | bits

    @staticmethod
    def _lookup(table) -> Lookup:
        return Lookup(table=table.values.data_ptr(), shift=int(table.shift), mask=int(table.mask))

    @staticmethod
    def _float_lookup(table, levels: torch.Tensor, offset: float, fmt: tuple[int, int, bool]) -> Lookup:
        from ..functional import level_edges

        m, add, subnormal = fmt
        edges = level_edges(levels, offset)
        top = float(levels[-1])
        far = torch.tensor([4 * top, -4 * top]).view(torch.int32) >> int(table.shift) & int(table.mask)
        pos, neg = (float(v) / top for v in table.values[far.long()])  # the sign factor of each half: T[±4·y_top] / y_top
        trunc = (0xFFFFFFFF << (23 - m)) & 0xFFFFFFFF
        return Lookup(table=table.values.data_ptr(), shift=int(table.shift), mask=int(table.mask),
                      first_edge=float(edges[0]), top=top,
                      pos=pos, neg=neg, add=add, trunc=trunc, sub=float(1 << m) if subnormal else 0.0,
                      inv_sub=1.0 / (1 << m), sub_edge=1.0 - float(offset))  # fmt: skip

    def _same_levels(self, table, as_table: Lookup, as_float: Lookup, bits: int) -> bool:
        u = _bucket_probe(table)
        one = torch.ones(())
        a, b = torch.empty_like(u), torch.empty_like(u)
        for out, lk, flags in ((a, as_table, TABLE), (b, as_float, TABLE | bits)):
            self._call(u, out, one, None, None, flags, lk, None, 1)
        nan = torch.isnan(a)
        return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a.masked_fill(nan, 0).view(torch.int32), b.masked_fill(nan, 0).view(torch.int32)))

    def _layout(self, h: torch.Tensor, t: torch.Tensor, tn: torch.Tensor | None, cap: torch.Tensor | None) -> tuple:
        """The 4-D sizes and strides of ``h`` and of thresholds shaped like ``t`` (ctypes arrays), cached per layout.

        ``tn`` and ``cap`` (when given) must have ``t``'s shape and strides.
        """
        key = (h.shape, h.stride(), t.shape, t.stride(), None if tn is None else (tn.shape, tn.stride()),
               None if cap is None else (cap.shape, cap.stride()))  # fmt: skip
        found = self._layouts.get(key)
        if found is None:
            if len(self._layouts) > 64:  # a model feeds a node a handful of shapes; bound the cache anyway
                self._layouts.clear()
            if t.dim() not in (0, h.dim()) or any(a not in (1, b) for a, b in zip(t.shape, h.shape)):
                raise ValueError(f"thresholds of shape {tuple(t.shape)} do not broadcast against an input of shape {tuple(h.shape)}")
            if any(o is not None and (o.shape, o.stride()) != (t.shape, t.stride()) for o in (tn, cap)):
                raise ValueError("theta_pos, theta_neg and cap must have the same shape and layout")
            ts = [0] * h.dim() if t.dim() == 0 else [0 if a == 1 else b for a, b in zip(t.shape, t.stride())]
            n, hs, tss = _layout(tuple(h.shape), h.stride(), ts)
            found = self._layouts[key] = (_i64_4(*n), _i64_4(*hs), _i64_4(*tss))
        return found

    def _call(self, h, out, tp, tn, cap, flags, pos, neg, threads: int) -> None:
        n, hs, ts = self._layout(h, tp, tn, cap)
        rc = self._fn(
            h.data_ptr(), n, hs, out.data_ptr(), tp.data_ptr(), None if tn is None else tn.data_ptr(),
            None if cap is None else cap.data_ptr(), ts, flags, self._n, self._r,
            None if pos is None else ctypes.byref(pos), None if neg is None else ctypes.byref(neg), threads, MIN_PER_THREAD,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"the CPU fire kernel rejected mode {flags}")

    @staticmethod
    def _oriented(h: torch.Tensor, thresholds: tuple, order: tuple[int, ...] | None) -> tuple[torch.Tensor, tuple]:
        """``h`` and its thresholds permuted into ``h``'s memory ``order`` where the spike keeps ``h``'s layout
        (:func:`kept_layout`), so that the kernel walks the memory in order and writes the spike with ``h``'s own
        strides; unchanged for ``order=None`` (the spike is written contiguous in ``h``'s logical order)."""
        if order is None:
            return h, thresholds
        return h.permute(order), tuple(t if t is None or t.dim() == 0 else t.permute(order) for t in thresholds)

    def bind(self, h: torch.Tensor, theta_pos: torch.Tensor, theta_neg: torch.Tensor | None = None,
             cap: torch.Tensor | None = None) -> tuple[Bound, int]:  # fmt: skip
        """The call's arguments for inputs of ``h``'s sizes and strides, and the address to pass to :meth:`fire_bound`.

        The structure points into the thresholds, the lookups and this plan: keep all of them (and the
        structure) alive while the address is used. ``ValueError`` as :meth:`__call__` for thresholds
        that do not fit, or a layout the kernel does not take. A dense ``h`` (contiguous, channels-last or any
        other permutation without gaps) whose layout the spike keeps (:func:`kept_layout`) is walked in memory order.
        """
        order = kept_layout(tuple(h.shape), h.stride())
        h, (theta_pos, theta_neg, cap) = self._oriented(h, (theta_pos, theta_neg, cap), order)
        n, hs, ts = self._layout(h, theta_pos, theta_neg, cap)
        b = Bound(n=n, hs=hs, ts=ts, tp=theta_pos.data_ptr(), tn=None if theta_neg is None else theta_neg.data_ptr(),
                  cap=None if cap is None else cap.data_ptr(), pos=None if self.pos is None else ctypes.pointer(self.pos),
                  neg=None if self.neg is None else ctypes.pointer(self.neg), min_per_thread=MIN_PER_THREAD,
                  flags=self.flags, max_spikes=self.max_spikes, offset=self.offset)  # fmt: skip
        return b, ctypes.addressof(b)

    def fire_bound(self, h: torch.Tensor, address: int, threads: int, inplace: bool = False) -> torch.Tensor:
        """The spike for ``h`` (of the sizes and strides :meth:`bind` was given) with the bound arguments at ``address``.

        A new tensor (:func:`spike_like`), or with ``inplace`` ``h`` itself, every element overwritten by its spike
        (``h`` must not overlap itself: :func:`writable_in_place`).
        """
        out = h if inplace else spike_like(h)
        if self._bound(h.data_ptr(), out.data_ptr(), address, threads) != 0:
            raise RuntimeError(f"the CPU fire kernel rejected mode {self.flags}")
        return out

    def __call__(self, h: torch.Tensor, theta_pos: torch.Tensor, theta_neg: torch.Tensor | None = None,
                 cap: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:  # fmt: skip
        """The spike for input ``h`` (float32, CPU, any layout of at most 4 non-mergeable dimensions) and scaled
        thresholds that broadcast against it (0-d, or a view of ``h``'s rank; all three of one shape and
        layout); a new tensor (:func:`spike_like`: ``h``'s strides for a channels-last-like ``h``, else contiguous)."""
        order = kept_layout(tuple(h.shape), h.stride())
        out = spike_like(h, order is not None)
        if h.numel():
            hp, (tp, tn, cp) = self._oriented(h, (theta_pos, theta_neg, cap), order)
            self._call(hp, out, tp, tn, cp, self.flags, self.pos, self.neg, torch.get_num_threads() if threads is None else threads)
        return out


def fire(
    h: torch.Tensor,
    theta_pos: torch.Tensor,
    theta_neg: torch.Tensor | None,
    max_spikes: int,
    offset: float,
    cap: torch.Tensor | None = None,
    table=None,
    table_neg=None,
    levels: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """:func:`sj_sfn.functional.fast_fire` in one pass: the same arguments and the same result, bit for bit.

    ``h`` is float32 on the CPU, of any layout (at most four non-mergeable dimensions); the
    thresholds (scaled ``θ±`` and ``cap``, float32) broadcast against it (0-d, or any shape that
    broadcasts, read through stride-0 views). ``table``/``table_neg`` are
    :class:`sj_sfn.functional.LevelTable`\\ s, ``levels`` the levels they were built from (optional:
    float levels then need no table gather). A node keeps its :class:`FirePlan` instead of calling this.
    """
    plan = FirePlan(theta_neg is not None, cap is not None, max_spikes, offset, table, table_neg, levels)
    return plan(h, theta_pos, theta_neg, cap, threads)


def memory_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...] | None:
    """The permutation of the dimensions from the largest stride to the smallest when a tensor of these sizes and
    strides is dense (every memory element of its span used once: contiguous, channels-last, any permutation of a
    contiguous tensor), else ``None``. Size-1 dimensions come first (their stride is free)."""
    dims = sorted((st, n, d) for d, (n, st) in enumerate(zip(shape, strides)) if n != 1)
    expected = 1
    for st, n, _ in dims:
        if st != expected:
            return None
        expected *= n
    return tuple(d for d, n in enumerate(shape) if n == 1) + tuple(d for _, _, d in reversed(dims))


def kept_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...] | None:
    """The memory order (:func:`memory_order`) in which the spike of an input of these sizes and strides is written
    with the input's own strides, or ``None``: the spike is then contiguous.

    Kept: a dense input whose innermost dimension (of size > 1) is not its last (channels-last and the like), as
    torch's elementwise operations keep it: the convolution after the site then runs in the layout the ANN's
    ran in, not on a reordered copy. Made contiguous: everything else, so rows stay contiguous where the last
    dimension is (attention's transposed q/k/v go to a matrix product that would copy them). Every fire path
    of a node returns its spike in this layout (:func:`sj_sfn.neuron.spike_layout`).
    """
    order = memory_order(shape, strides)
    if order is None:
        return None
    wide = [d for d in order if shape[d] != 1]
    return order if wide and wide[-1] != max(wide) else None


def spike_like(h: torch.Tensor, kept: bool | None = None) -> torch.Tensor:
    """An uninitialised float32 tensor for the spike of ``h``: with ``h``'s strides where :func:`kept_layout` keeps
    them (``kept``, when the caller already knows), else contiguous."""
    if kept is None:
        kept = kept_layout(tuple(h.shape), h.stride()) is not None
    if kept:  # a kept layout is dense: empty_like keeps its strides
        return torch.empty_like(h, dtype=torch.float32)
    return torch.empty_like(h, dtype=torch.float32, memory_format=torch.contiguous_format)


def writable_in_place(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a tensor of these sizes and strides has a separate memory element for every index (no stride-0 or
    interleaved dimension), so that a spike can overwrite its own input element."""
    dims = sorted((st, n) for n, st in zip(shape, strides) if n > 1)
    span = 1
    for st, n in dims:
        if st < span:
            return False
        span = st * n
    return True


def _layout(shape: tuple[int, ...], h_strides: tuple[int, ...], t_strides: list[int]) -> tuple[list[int], list[int], list[int]]:
    """4-D sizes with the strides of ``h`` and of the thresholds over them.

    Dimensions are merged where both ``h`` and the thresholds are contiguous across them (and size-1 ones
    dropped), so a contiguous input with a per-tensor threshold is one flat run.
    """
    ms: list[int] = []
    mh: list[int] = []
    mt: list[int] = []
    for s, a, b in zip(shape, h_strides, t_strides):
        if s == 1:
            continue
        if ms and mh[-1] == a * s and mt[-1] == b * s:
            ms[-1] *= s
            mh[-1], mt[-1] = a, b
        else:
            ms.append(s)
            mh.append(a)
            mt.append(b)
    if len(ms) > 4:
        raise ValueError(f"an input of shape {shape} and strides {h_strides} has more than 4 non-mergeable dimensions")
    pad = 4 - len(ms)
    return [1] * pad + ms, [0] * pad + mh, [0] * pad + mt
