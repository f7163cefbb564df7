"""The ``sj-sfn`` parser and entry point: every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ..utils import UserError
from ..version import __version__
from . import convert, demo, evaluate, info, theorem, tune

SUBCOMMANDS = (demo, convert, evaluate, tune, info, theorem)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sj-sfn", description="One-timestep ANN-to-SNN conversion for SpikingJelly (MTN, SFN, SFormer).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  sj-sfn demo\n  sj-sfn convert zoo:digits_cnn --checkpoint cnn.pth --data digits --tune --out snn.pth\n"
                                       "  sj-sfn eval snn.pth --data digits --json eval.json\n  sj-sfn info")
    p.add_argument("--version", action="version", version=f"sj-sfn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in SUBCOMMANDS:
        cmd.add_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_guarded(prog: str, fn: Callable[[], Any]) -> int:
    """Run a script's ``fn()``: 0 on success (or ``fn``'s int), one line on stderr and 2 for a user error.

    What counts as a user error is the same as for ``sj-sfn`` (see :func:`main`);
    ``SJ_SFN_TRACEBACK=1`` shows the traceback instead. For ``classification/`` and ``detection/``.
    """
    if os.environ.get("SJ_SFN_TRACEBACK"):
        rc = fn()
        return rc if isinstance(rc, int) else 0
    try:
        rc = fn()
    except (UserError, OSError, ImportError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``sj-sfn``; returns the exit code (0, 2 for a user error, 130 when interrupted).

    User errors: :class:`~sj_sfn.utils.UserError` (bad options, data, checkpoints, output paths),
    a missing file or optional package, and any other error of the operating system (permissions,
    a full disk). ``SJ_SFN_TRACEBACK=1`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TQDM_DISABLE", "1")
    if os.environ.get("SJ_SFN_TRACEBACK"):
        return args.func(args)
    try:
        return args.func(args)
    except (UserError, OSError, ImportError) as e:  # FileNotFoundError and PermissionError are OSErrors
        print(f"sj-sfn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sj-sfn {args.command}: interrupted", file=sys.stderr)
        return 130
