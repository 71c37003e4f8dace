"""``meddiff``: one console script, one subcommand module per capability.

Every module in this package that defines ``register(subparsers)`` adds its
subcommands; the handler is stored as ``func`` on the parsed namespace and
returns an exit code. Modules import heavy libraries inside their handlers so
that ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from medical_diffusion import __version__
from medical_diffusion.errors import MedDiffError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddiff",
        description="Textual Inversion for medical images on Stable Diffusion 2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def describe_os_error(exc: OSError) -> str:
    """``PATH: problem`` for an OS error (``PermissionError`` on an output folder names the folder)."""
    import errno
    import os

    path = exc.filename if exc.filename is not None else exc.filename2
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if path is None:
        return reason
    path = os.fspath(path)
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        # an existing file or folder is named itself; a file that could not be created, its folder
        where = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
        return f"{where}: cannot write here ({reason}); choose another output folder or fix its permissions"
    return f"{path}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedDiffError as exc:
        if args.verbose:
            raise
        print(f"meddiff {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only or full output folder, missing file...: one line naming it
        if args.verbose:
            raise
        print(f"meddiff {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"meddiff {args.command}: interrupted", file=sys.stderr)
        return 130
