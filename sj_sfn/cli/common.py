"""What the subcommands share: argparse value types and option groups, logging, the device, and small steps.

Every step that reads or writes a file goes through :mod:`sj_sfn.io`; every error a user can
cause is a :class:`~sj_sfn.utils.UserError` (one line, exit code 2, see :mod:`sj_sfn.cli.main`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..distributed import is_main
from ..io import check_output_path, load, load_state_dict_into, state_dict_of
from ..utils import UserError, batch_inputs, write_json
from ..zoo import build_model

__all__ = [
    "UserError",
    "number",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "quantile",
    "offset",
    "lam",
    "groups",
    "add_common",
    "add_tune_options",
    "add_converted_input",
    "level_sets",
    "reconstruct_kwargs",
    "log",
    "write_json_main",
    "check_outputs",
    "device_of",
    "load_ann",
    "ann_for",
    "sample_shape",
    "check_model_accepts",
    "check_input_shape",
    "tune",
]


# -- argparse value types --------------------------------------------------------------------


def number(kind: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` (int or float) for which ``ok(x)`` holds, else ``expected {what}``."""

    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return x

    return parse


positive_int = number(int, lambda x: x >= 1, "an integer >= 1")
non_negative_int = number(int, lambda x: x >= 0, "an integer >= 0")
non_negative_float = number(float, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
positive_float = number(float, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")
quantile = number(float, lambda x: 0 < x <= 1, "a quantile in (0, 1]")
offset = number(float, lambda x: 0 <= x < 1, "a threshold offset in [0, 1)")


def lam(v: str) -> float:
    """``--lam`` / ``--bounds``: λ finite and > 0."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"λ must be a number, got {v!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"λ must be finite and > 0, got {v}")
    return x


def groups(v: str) -> str | dict[str, list[str]]:
    """``--groups``: ``kind``, or ``NAME=PAT,PAT;NAME=PAT``."""
    if v == "kind":
        return v
    out = {}
    for part in v.split(";"):
        name, eq, patterns = part.partition("=")
        pats = [q.strip() for q in patterns.split(",") if q.strip()]
        if not eq or not name.strip() or not pats:
            raise argparse.ArgumentTypeError(f"expected 'kind' or 'NAME=PATTERN,PATTERN;NAME=PATTERN', got {part!r} in {v!r}")
        out[name.strip()] = pats
    return out


# -- option groups ---------------------------------------------------------------------------


def add_tune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("λ tuning (Ax Bayesian optimisation on the validation split)")
    g.add_argument("--trials", type=positive_int, default=20, help="number of trials (default 20)")
    g.add_argument("--objective", choices=("accuracy", "tradeoff", "pareto"), default="accuracy",
                   help="maximise accuracy, accuracy − β·energy ratio, or both (Pareto front)")
    g.add_argument("--beta", type=non_negative_float, default=10.0, help="β of the tradeoff objective (accuracy points per unit of energy ratio)")
    g.add_argument("--bounds", type=lam, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="λ range (log scale); default 0.25 4 for energy-budget thresholds (λ = 1), else 0.05 1")
    g.add_argument("--groups", type=groups, default=None,
                   help="separate λ per group: 'kind' (SFormer site kinds) or 'NAME=PAT,PAT;NAME=PAT' (fnmatch patterns or kinds)")
    g.add_argument("--timeout", type=positive_float, default=None, help="start no new trial after this many seconds")
    g.add_argument("--energy-vs-ann", action="store_true", help="measure the energy denominator on the ANN itself")
    g.add_argument("--val-samples", type=positive_int, default=None, help="cap the validation split (images)")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--device", default=None, help="torch device (default: CPU, or the local GPU under torchrun)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits and of Ax")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle checkpoints that hold Python objects besides tensors (runs code: only files you trust)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs, one JSON line")


def add_converted_input(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """The converted file, its data and its ANN checkpoint: what ``eval`` and ``tune`` read."""
    p.add_argument("snn", metavar="CONVERTED", help="file written by 'sj-sfn convert'")
    p.add_argument("--data", default=None, help="data set (default: the one it was converted on)")
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)


# -- small steps -----------------------------------------------------------------------------


def level_sets(args: argparse.Namespace) -> str | list[str] | None:
    """``--level-sets``: ``None`` (the default sets), ``'all'``, or the names given."""
    sets = getattr(args, "level_sets", None)
    return "all" if sets and "all" in sets else sets


def log(args: argparse.Namespace, *msg: Any) -> None:
    """Print to stderr unless ``--quiet`` (rank 0 only under torchrun)."""
    if not getattr(args, "quiet", False) and is_main():
        print(*msg, file=sys.stderr, flush=True)


def write_json_main(path: str | None, obj: Any) -> None:
    """Write ``obj`` as JSON (atomically, NaN as null) on rank 0; nothing without a path."""
    if path and is_main():
        write_json(path, obj)


def check_outputs(args: argparse.Namespace, *options: str) -> None:
    """Check every given output option (``out``, ``json``, ``plot``) before any work: one line for a path that cannot be written."""
    for name in options:
        path = getattr(args, name, None)
        if path:
            check_output_path(path, "--" + name)


def device_of(args: argparse.Namespace, dist_on: bool) -> str | None:
    """``--device``, else the local GPU under torchrun (``LOCAL_RANK``), else ``None`` (CPU)."""
    if args.device:
        return args.device
    if dist_on and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def load_ann(model: nn.Module, path: str, spec: str, trusted: bool = False) -> None:
    """Load an ANN checkpoint into ``model``; a bad file or a mismatch is one line naming the problem."""
    load_state_dict_into(model, state_dict_of(load(path, trusted=trusted), path), path, spec)


def ann_for(meta: dict, checkpoint: str | None, device: str | None, trusted: bool = False) -> nn.Module | None:
    """The ANN a converted file came from (``--checkpoint``, else the path recorded at conversion), or ``None``."""
    ck = checkpoint or meta.get("checkpoint")
    if not ck:
        return None
    if not os.path.isfile(ck):
        raise UserError(f"ANN checkpoint not found: {ck} (give --checkpoint, or --no-ann)")
    mk = meta["model_kwargs"]
    ann = build_model(meta["model"], mk["num_classes"], mk["in_chans"], mk.get("img_size"))
    load_ann(ann, ck, meta["model"], trusted)
    return ann.to(device).eval() if device else ann.eval()


def sample_shape(loader: Iterable) -> tuple[int, ...]:
    for batch in loader:
        return tuple(batch_inputs(batch).shape[1:])
    raise UserError("the data loader is empty")


def check_model_accepts(ann: nn.Module, loader: Iterable, args: argparse.Namespace, device: str | None) -> None:
    """One calibration image through the ANN, so that a model/data mismatch is one clear line, not a traceback."""
    x = batch_inputs(next(iter(loader)))[:1]
    try:
        with torch.no_grad():
            ann(x.to(device) if device else x)
    except Exception as e:  # noqa: BLE001 - any failure here is a mismatch between the model and the data
        raise UserError(f"{args.model} does not accept the images of --data {args.data} (shape {list(x.shape[1:])}): "
                        f"{str(e).splitlines()[0]}; check --img-size and the model") from e


def check_input_shape(loader: Iterable, meta: dict, data: str, path: str) -> None:
    shape = sample_shape(loader)
    if list(shape) != list(meta["input_shape"]):
        raise UserError(f"--data {data} gives inputs of shape {list(shape)} but {path} was converted for {meta['input_shape']}")


def tune(args: argparse.Namespace, snn: nn.Module, val_loader: Iterable, ann: nn.Module | None = None, device: str | None = None):
    """:func:`sj_sfn.tune.tune_lambda` with the command line's options; bad options are one line."""
    from ..tune import tune_lambda

    if args.bounds is not None and not args.bounds[0] < args.bounds[1]:
        raise UserError(f"--bounds LOW HIGH needs LOW < HIGH, got {args.bounds[0]} {args.bounds[1]}")
    try:
        return tune_lambda(
            snn, val_loader, objective=args.objective, beta=args.beta, trials=args.trials,
            bounds=None if args.bounds is None else tuple(args.bounds),
            groups=args.groups, seed=args.seed, timeout=args.timeout, ann=ann, progress=not args.quiet, device=device,
        )
    except (ValueError, TypeError) as e:  # bad options (e.g. a group pattern that matches no site)
        raise UserError(f"cannot tune λ: {str(e).splitlines()[0]}") from e


def reconstruct_kwargs(args: argparse.Namespace) -> dict:
    """``reconstruct=`` for ``convert`` when ``--reconstruct`` was given (not saved: loading rebuilds, then loads the weights)."""
    return {} if args.reconstruct is None else {"reconstruct": args.reconstruct}
