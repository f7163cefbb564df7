"""Checkpoints: read them safely, write them atomically, and check output paths before any work.

- :func:`load` reads a ``.pth``/``.pt`` file with ``torch.load(weights_only=True)`` (tensors,
  containers and plain values only: no code runs) or a ``.safetensors`` file. A file that needs
  arbitrary unpickling is refused unless the caller passes ``trusted=True``. A missing, empty,
  text, truncated or random-bytes file raises one :class:`CheckpointError` that names the file.
- :func:`save` writes with ``torch.save`` into a temporary file beside the target and renames it
  over the target (``os.replace``): an interrupted write never leaves half a file.
- :func:`check_output_path` says before any work whether a path can be written (not a directory,
  its parent not a regular file, the nearest existing folder writable).
- :func:`state_dict_of` finds the ``state_dict`` inside a training checkpoint;
  :func:`load_state_dict_into` loads one into a model and names the mismatching keys.
- :func:`save_converted` / :func:`load_converted`: the file ``sj-sfn convert`` writes (the SNN's
  ``state_dict`` and what rebuilds the module) and the module rebuilt from it.
- :func:`unrestricted_torch_load` is a scope (a ``with`` block) in which libraries that call
  ``torch.load`` themselves (mmengine) may unpickle full checkpoints; outside it nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .utils import UserError, add_missing_biases, atomic_write

__all__ = [
    "CheckpointError",
    "OutputPathError",
    "check_output_path",
    "check_output_dir",
    "load",
    "save",
    "state_dict_of",
    "load_state_dict_into",
    "unrestricted_torch_load",
    "CONVERTED_FORMAT",
    "save_converted",
    "load_converted",
    "converted_data_config",
]

CONVERTED_FORMAT = "sj-sfn-snn"  # the "format" entry of a file written by save_converted

STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net")


class CheckpointError(UserError):
    """A checkpoint that cannot be read (missing, not a checkpoint, corrupt) or does not fit the model."""


class OutputPathError(UserError):
    """An output path that cannot be written (a directory, under a regular file, a read-only folder)."""


def check_output_path(path: str | os.PathLike, what: str = "output") -> str:
    """Raise :class:`OutputPathError` unless ``path`` can be written; returns its absolute path.

    Checked: the path is not empty and not an existing directory; an existing file there is
    writable; the nearest existing ancestor is a directory (not a regular file) in which this
    process can create a file (missing folders between it and the file are created by the writers).
    """
    if path is None or not os.fspath(path):
        raise OutputPathError(f"{what}: empty path")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputPathError(f"{what} {path} is a directory; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path} exists and is not writable")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    _check_writable_folder(parent, path, what)
    return path


def _check_writable_folder(folder: str, path: str, what: str) -> None:
    """``folder`` (the nearest existing ancestor of ``path``) is a directory in which a file can be created.

    Tried for real with a temporary file (removed at once): permission bits do not tell for the
    superuser, read-only mounts or pseudo file systems.
    """
    if not os.path.isdir(folder):
        raise OutputPathError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputPathError(f"{what} {path}: cannot write in {folder} ({e.strerror or _first_line(e)})") from e


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Raise :class:`OutputPathError` unless ``path`` is, or can be created as, a writable folder; returns its absolute path."""
    if path is None or not os.fspath(path):
        raise OutputPathError(f"{what}: empty path")
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        up = os.path.dirname(probe)
        if up == probe:
            break
        probe = up
    _check_writable_folder(probe, path, what)
    return path


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (``KeyError 101`` for a bare key)."""
    text = str(e).strip()
    if not text or isinstance(e, KeyError):
        return f"{type(e).__name__} {text}".strip()
    line = text.splitlines()[0]
    return line.split(". ")[0] if len(line) > 120 else line


def load(path: str | os.PathLike, *, trusted: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """The object stored in a checkpoint file (``torch.save`` output or ``.safetensors``).

    ``trusted=False`` (the default) loads with ``weights_only=True``: a file that holds other
    pickled Python objects (e.g. an ``argparse.Namespace``) is refused with a
    :class:`CheckpointError` naming them. ``trusted=True`` unpickles such a file in full — only
    for files you made or trust: unpickling runs code.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(f"{path}: reading .safetensors needs 'pip install safetensors'") from e
        try:
            return load_file(path, device=str(map_location))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise CheckpointError(f"cannot read {path}: not a valid .safetensors file ({_first_line(e)})") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of tensors at all: text, random bytes, another format
            raise CheckpointError(f"cannot read {path}: not a torch checkpoint or corrupt ({_unpickler_error(e)})") from e
        if not trusted:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors ({_unsafe_globals(e)}), which a safe load refuses; "
                "re-save its state_dict, or trust the file (--trust-checkpoint; unpickling runs code)"
            ) from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt file (RuntimeError, EOFError, KeyError, ...)
        raise CheckpointError(f"cannot read {path}: not a torch checkpoint or corrupt ({_first_line(e)})") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from e


def _unsafe_globals(e: BaseException) -> str:
    """The global a weights-only load refused, from torch's message (``Unsupported global: GLOBAL x.y ...``)."""
    for line in str(e).splitlines():
        if "GLOBAL " in line:
            return line.split("GLOBAL ", 1)[1].split(" ")[0].strip(".,")
    return "not allowed by weights_only"


def _unpickler_error(e: BaseException) -> str:
    """The reason in torch's weights-only message (``WeightsUnpickler error: ...``), else its first line."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()]
        if rest:
            return rest[0]
    return _first_line(e)


def save(obj: Any, path: str | os.PathLike, what: str = "output") -> str:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + ``os.replace``); missing folders are created."""
    path = check_output_path(path, what)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise OutputPathError(f"cannot write {what} {path}: {_first_line(e)}") from e
    return path


def state_dict_of(obj: Any, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` in a loaded checkpoint: a module's, a dict of tensors, or one under a usual key.

    Keys tried, in order: ``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``, ``module``, ``net``.
    """
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        if obj.get("format") == CONVERTED_FORMAT:
            raise CheckpointError(f"{path} is a converted SNN (sj-sfn convert output), not an ANN checkpoint")
        for key in STATE_DICT_KEYS:
            sd = obj.get(key)
            if isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
                return dict(sd)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors or one under 'state_dict'/'model')")


def load_state_dict_into(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: str = "checkpoint",
                         spec: str = "the model") -> None:
    """``model.load_state_dict(sd)`` after stripping DDP's ``module.`` prefix; a mismatch is one line naming the keys."""
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise CheckpointError(f"checkpoint {path} does not match {spec}: " + "; ".join(parts))
    model.load_state_dict(sd)


@contextlib.contextmanager
def unrestricted_torch_load() -> Iterator[None]:
    """Within the block, ``torch.load`` calls that do not pass ``weights_only`` unpickle in full.

    For libraries that load their own checkpoints (mmengine's hold numpy and meta objects that
    torch >= 2.6's default ``weights_only=True`` rejects). Sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    for the block only and restores the previous value on exit.
    """
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def save_converted(path: str | os.PathLike, snn: torch.nn.Module, meta: Mapping[str, Any]) -> str:
    """Write a converted SNN atomically: ``{"format": CONVERTED_FORMAT, **meta, "state_dict": ...}``.

    ``meta`` holds what rebuilds the module: ``model`` (the factory name), ``model_kwargs``,
    ``convert_kwargs`` and ``input_shape`` (see :func:`load_converted`).
    """
    return save({"format": CONVERTED_FORMAT, **meta, "state_dict": snn.state_dict()}, path, "converted model")


def load_converted(path: str | os.PathLike, device: str | torch.device | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a converted SNN from :func:`save_converted` output: ``(snn in eval mode, meta)``.

    The module is rebuilt by converting the (untrained) architecture on one random batch of the
    recorded input shape; then every weight, threshold and λ comes from the saved ``state_dict``.
    """
    import warnings

    from .conversion import convert
    from .zoo import build_model

    path = os.fspath(path)
    obj = load(path)
    if not (isinstance(obj, dict) and obj.get("format") == CONVERTED_FORMAT):
        raise CheckpointError(f"{path} is not a converted SNN written by 'sj-sfn convert'")
    if obj.get("hf_task"):  # a Hugging Face model: rebuilt from its directory
        from .hf.pretrained import load_converted_hf

        try:
            snn = load_converted_hf(obj)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match the model in {obj['model']}: {_first_line(e)}") from e
        return (snn.to(device) if device is not None else snn).eval(), obj
    try:
        mk, ck, shape = obj["model_kwargs"], obj["convert_kwargs"], obj["input_shape"]
        ann = build_model(obj["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e} (written by another version of sj-sfn?)") from e
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snn = convert(ann, [(x,)], progress=False, **{**ck, "reconstruct": 0})
    add_missing_biases(snn, obj["state_dict"])
    try:
        snn.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match {obj['model']} as converted by this version: {_first_line(e)}") from e
    if device is not None:
        snn.to(device)
    return snn.eval(), obj


def converted_data_config(meta: Mapping[str, Any], data: str, ann: torch.nn.Module | None = None) -> dict | None:
    """The data config ``convert`` used; files written before it was recorded rebuild it from the model."""
    from .data import BUNDLED_DATA, data_config
    from .zoo import build_model

    if "data_config" in meta:
        return meta["data_config"]
    if data in BUNDLED_DATA:
        return None
    if ann is None:
        mk = meta["model_kwargs"]
        ann = build_model(meta["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    return data_config(ann, meta["model"])
