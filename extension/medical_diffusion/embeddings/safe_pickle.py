"""Strict loading of pickled ``.pt``/``.bin`` files: tensors and plain containers only.

``torch.load(weights_only=True)`` (torch >= 1.13) unpickles with an allow-list of tensor
rebuild functions and builtin containers; any other global (``os.system``, a class whose
``__reduce__`` runs code) stops the load *before* it is called. We never fall back to a full
unpickle.
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
    """Load a torch pickle (zip or legacy format) onto the CPU without running any code from it."""
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
        raise InputFileError(path, f"not a readable torch file (truncated or corrupt: {message.splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError, TypeError) as exc:
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
        raise InputFileError(path, f"not a readable torch file (truncated or corrupt: {first})") from None
