"""Strict loading of pickled ``.pt``/``.bin`` files: tensors and plain containers only.

``torch.load(weights_only=True)`` (torch >= 1.13) unpickles with an allow-list of tensor
rebuild functions and builtin containers; any other global (``os.system``, a class whose
``__reduce__`` runs code) stops the load *before* it is called. We never fall back to a full
unpickle, never advise one, and never hand a TorchScript archive (whose ``code/`` runs while it
loads) to ``torch.jit.load``. Refusals are one line naming the file and what it held.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from medical_diffusion.errors import InputFileError


class UnsafePickleError(InputFileError):
    """The file's pickle would import something other than tensors and containers."""


#: How a user turns a TorchScript file they trust into a plain state dict we can read.
TORCHSCRIPT_RECIPE = (
    "convert it to a plain state dict, on a file you trust (this runs its code): "
    "python -c \"import torch; torch.save(torch.jit.load('IN.pt').state_dict(), 'OUT.pth')\" "
    "and use OUT.pth"
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A zip whose entries include TorchScript source (``code/``) or ``constants.pkl``."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            records = [n.split("/", 1)[1] for n in z.namelist() if "/" in n]  # names below the archive folder
            return any(r == "constants.pkl" or r.startswith("code/") for r in records)
    except (OSError, zipfile.BadZipFile):
        return False


def clean_detail(exc: BaseException) -> str:
    """The first line of an exception's message, without ANSI codes or torch's weights_only advice."""
    first = (_ANSI.sub("", str(exc)).strip().splitlines() or [exc.__class__.__name__])[0]
    if "weights_only" in first or "weights only" in first.lower():
        return "refused by the weights-only loader"
    return first[:200]


def _refusal_detail(message: str) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"it asks for {match.group(1)}"
    match = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", message)
    if match:
        return match.group(0).lower()
    return "it holds objects other than tensors"


def _allow_parameter_dict() -> contextlib.AbstractContextManager:
    """Admit ``torch.nn.ParameterDict``, which files from the original textual-inversion code hold.

    Rebuilding it only sets attributes from the (equally restricted) pickled state, so nothing
    beyond tensors and containers is created. ``safe_globals`` exists from torch 2.4; on older
    torch such files are refused like any other object.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([torch.nn.ParameterDict]) if safe_globals else contextlib.nullcontext()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a torch pickle (zip or legacy format) onto the CPU without running any code from it.

    TorchScript archives are refused (:data:`TORCHSCRIPT_RECIPE` says how to convert one).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputFileError(path, "empty file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (PK..) or, legacy, pickle protocol >= 2 (0x80 ..)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise InputFileError(path, "not a torch file (truncated or corrupt: neither a zip archive nor pickle data)")
    if is_torchscript_archive(path):
        raise UnsafePickleError(path, f"refused to load: a TorchScript archive (it holds code, which is never run "
                                      f"here); {TORCHSCRIPT_RECIPE}")
    try:
        with warnings.catch_warnings(), _allow_parameter_dict():  # warnings: e.g. "pickle protocol 4" notes
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "truncated" in message.lower():
            raise InputFileError(path, "not a readable torch file (truncated pickle data)") from None
        if "weights only" in message.lower() or "weights_only" in message.lower() or "GLOBAL" in message:
            raise UnsafePickleError(
                path,
                f"refused to load: the pickle would run code or build arbitrary objects ({_refusal_detail(message)}); "
                "only tensors and plain containers are accepted",
            ) from None
        raise InputFileError(path, f"not a readable torch file (truncated or corrupt: {clean_detail(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError) as exc:
        raise InputFileError(path, f"not a readable torch file (truncated or corrupt: {clean_detail(exc)})") from None
