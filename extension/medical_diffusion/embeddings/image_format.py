"""A1111 embeddings hidden in images (PNG/WebP).

A1111 (``modules/textual_inversion/image_embedding.py``) stores the ``.pt`` dictionary in two ways:

- a PNG text chunk ``sd-ti-embedding``: base64 of JSON in which every tensor is written as
  ``{"TORCHTENSOR": nested lists}``;
- in the pixels: the same JSON, zlib-compressed, split into low and high nibbles, each nibble
  block XOR-ed with a fixed LCG key stream (a=1664525, c=1013904223, m=2**32, seed 0, value
  ``% 255``, low 4 bits) and pasted as two strips left and right of the preview image,
  separated from it by one black column each.

This module reads both and writes the text-chunk form.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from medical_diffusion.errors import InputFileError

TEXT_KEY = "sd-ti-embedding"
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32


def _tensor_hook(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        return torch.tensor(np.asarray(obj["TORCHTENSOR"], dtype=np.float32))
    return obj


class _TensorEncoder(json.JSONEncoder):
    def default(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.detach().cpu().float().numpy().tolist()}
        return super().default(obj)


def data_to_json(data: dict) -> str:
    """The JSON A1111 uses for an embedding dictionary (tensors as ``TORCHTENSOR`` lists)."""
    return json.dumps(data, cls=_TensorEncoder)


def data_from_json(text: str | bytes) -> Any:
    return json.loads(text, object_hook=_tensor_hook)


def key_stream(n: int) -> np.ndarray:
    """The first ``n`` values of A1111's LCG key stream (``uint8``, before masking to 4 bits)."""
    if n <= 0:
        return np.zeros(0, np.uint8)
    # x_{k+1} = a x_k + c (mod 2**32), x_0 = 0; outputs x_1, x_2, ... (mod 255).
    # Vectorised by doubling: applying the map B times is x -> A_B x + C_B.
    states = np.array([(_LCG_A * 0 + _LCG_C) % _LCG_M], dtype=np.uint64)
    mult, add = np.uint64(_LCG_A), np.uint64(_LCG_C)  # the map applied once
    while states.size < n:
        # uint64 arithmetic wraps mod 2**64, a multiple of 2**32, so "& mask" gives the right residue
        nxt = (states * mult + add) & np.uint64(_LCG_M - 1)
        states = np.concatenate([states, nxt])
        mult, add = (mult * mult) & np.uint64(_LCG_M - 1), (mult * add + add) & np.uint64(_LCG_M - 1)
    return (states[:n] % np.uint64(255)).astype(np.uint8)


def _xor_nibbles(block: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(block.astype(np.uint8), key_stream(block.size).reshape(block.shape) & 0x0F)


def _crop_black(img: np.ndarray) -> np.ndarray:
    mask = (img > 0).all(2)
    cols, rows = mask.any(0), mask.any(1)
    if not cols.any():
        return img[:0, :0]
    c0, c1 = cols.argmax(), mask.shape[1] - cols[::-1].argmax()
    r0, r1 = rows.argmax(), mask.shape[0] - rows[::-1].argmax()
    return img[r0:r1, c0:c1]


def extract_from_pixels(image: Image.Image) -> bytes | None:
    """The JSON bytes hidden in the image's pixels, or None when there is no data strip."""
    arr = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black_cols = np.where(arr.sum(axis=(0, 2)) == 0)[0]
    if black_cols.shape[0] < 2:
        return None
    lower = _xor_nibbles(arr[:, : black_cols.min(), :])
    upper = _xor_nibbles(arr[:, black_cols.max() + 1 :, :])
    if lower.shape != upper.shape or lower.size == 0:
        return None
    raw = ((upper << 4) | lower).astype(np.uint8).tobytes()
    try:
        return zlib.decompressobj().decompress(raw)
    except zlib.error:
        return None


def embed_in_pixels(image: Image.Image, data: dict) -> Image.Image:
    """``image`` with ``data`` stored in two side strips, readable by A1111 and :func:`extract_from_pixels`.

    The strips' high nibbles are set to a constant (A1111 draws a decorative dot pattern there;
    readers ignore those bits).
    """
    depth = 3
    packed = np.frombuffer(zlib.compress(data_to_json(data).encode(), level=9), np.uint8)
    h = image.size[1]
    size = packed.size + (h - packed.size % h)
    size += h * depth - size % (h * depth)
    strips = []
    for nibbles in (packed & 0x0F, packed >> 4):
        block = np.resize(nibbles, size).reshape(h, -1, depth)
        strips.append(Image.fromarray(_xor_nibbles(block) | 0xA0, mode="RGB"))
    low, high = strips
    out = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, h), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(image.convert("RGB"), (low.size[0] + 1, 0))
    out.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def read_image_embedding(path: str | os.PathLike, with_source: bool = False) -> Any:
    """The embedding dictionary stored in an image, or None when it holds none (a plain preview).

    With ``with_source`` returns ``(data, "text chunk" | "pixel data")``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", None) or {}
            payload = text.get(TEXT_KEY)
            if payload is None:
                raw = extract_from_pixels(im)
                if raw is None:
                    return None
                source = "pixel data"
                where = "pixel data"
            else:
                raw = base64.b64decode(payload, validate=False)
                source = f"'{TEXT_KEY}' text chunk"
                where = "text chunk"
    except InputFileError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputFileError(path, f"not a readable image ({exc.__class__.__name__}: {exc})") from None
    except binascii.Error as exc:  # pragma: no cover - b64decode(validate=False) rarely raises
        raise InputFileError(path, f"{TEXT_KEY} chunk is not base64 ({exc})") from None
    try:
        data = data_from_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"embedding in the image's {source} is not valid JSON ({exc})") from None
    except RecursionError:  # e.g. "[[[[..." a hundred thousand deep: no embedding looks like that
        raise InputFileError(path, f"embedding in the image's {source} is JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise InputFileError(path, f"embedding in the image's {source} is not a dictionary")
    return (data, where) if with_source else data


def png_text_chunk(data: dict) -> PngImagePlugin.PngInfo:
    """PNG metadata holding ``data`` the way A1111 writes it (``sd-ti-embedding`` chunk)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(data_to_json(data).encode()).decode("ascii"))
    return info
