"""Find NaN/inf voxels in a NIfTI file's raw data.

ITK's NIfTI reader turns NaN voxels into 0 without a word, so a float NIfTI is checked on its stored
values. NIfTI-1 and NIfTI-2, ``.nii`` or ``.nii.gz``, float32/float64 data; other files give None.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_FLOAT_TYPES = {16: np.float32, 64: np.float64}  # NIfTI datatype codes


def _open(path: str | os.PathLike):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def nonfinite_mask(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray | None:
    """Boolean ``shape`` (numpy ``(z, y, x)`` order) marking NaN/inf voxels, or None when the file is not a
    float NIfTI or its data cannot be matched to ``shape``."""
    name = os.fspath(path).lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    try:
        with _open(path) as fh:
            head = fh.read(540)
            for endian in ("<", ">"):
                size = struct.unpack(endian + "i", head[:4])[0]
                if size in (348, 540):
                    break
            else:
                return None
            if size == 348:
                datatype = struct.unpack(endian + "h", head[70:72])[0]
                offset = int(struct.unpack(endian + "f", head[108:112])[0])
            else:
                datatype = struct.unpack(endian + "h", head[12:14])[0]
                offset = int(struct.unpack(endian + "q", head[168:176])[0])
            dtype = _FLOAT_TYPES.get(datatype)
            if dtype is None:
                return None
            count = int(np.prod(shape))
            fh.seek(max(offset, size))
            data = np.frombuffer(fh.read(count * np.dtype(dtype).itemsize), dtype=np.dtype(dtype).newbyteorder(endian))
    except (OSError, EOFError, struct.error):
        return None
    if data.size != count:
        return None
    return ~np.isfinite(data).reshape(shape)
