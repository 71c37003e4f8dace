"""Turning an image file into a feature-network input, in a named, recorded mode.

* ``paper``: what the paper's pipeline (torchmetrics 0.10 / torch-fidelity) did with z-scored
  slices: per-image z-score over all pixels and channels, ``clip(x * 64 + 128, 0, 255)``, a
  truncating cast to uint8, then a TF1-style bilinear resize (no antialias, no half-pixel centres).
* ``clean``: the stored 8-bit pixels, resized with PIL bicubic (antialiased).

Both give a float ``(3, size, size)`` tensor on the 0-255 scale; the network applies its own scaling.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.png_io import load_image

MODES = ("paper", "clean")
MODE_DESCRIPTIONS = {
    "paper": "per-image z-score, clip(x*64+128), truncating uint8 cast, TF1 bilinear resize without antialias",
    "clean": "stored 8-bit pixels, PIL bicubic resize",
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise MedDiffError(f"unknown preprocessing mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def zscore_to_uint8(array: np.ndarray) -> np.ndarray:
    """Per-image z-score over all values, ``clip(z * 64 + 128, 0, 255)``, truncating uint8 cast."""
    x = np.asarray(array, dtype=np.float64)
    std = x.std()
    z = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    return np.clip(z * 64.0 + 128.0, 0.0, 255.0).astype(np.uint8)  # astype truncates toward zero


def resize_bilinear_tf1(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: source = dest * in/out, no half-pixel shift, no antialias.

    ``images`` is float ``(N, C, H, W)``.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images.float()

    def axis_weights(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        lo = torch.floor(src).long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo.double()).float()
        return lo, hi, frac

    lo, hi, fr = axis_weights(x.shape[-2], out_h)
    x = x[..., lo, :] * (1 - fr)[:, None] + x[..., hi, :] * fr[:, None]
    lo, hi, fr = axis_weights(x.shape[-1], out_w)
    return x[..., lo] * (1 - fr) + x[..., hi] * fr


def prepare_array(rgb: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """``(H, W, 3)`` uint8/float array -> float ``(3, size, size)`` tensor on the 0-255 scale."""
    check_mode(mode)
    if mode == "paper":
        u8 = zscore_to_uint8(rgb)
        t = torch.from_numpy(u8.astype(np.float32)).permute(2, 0, 1)[None]
        return resize_bilinear_tf1(t, size)[0]
    u8 = np.asarray(rgb)
    if u8.dtype != np.uint8:
        raise MedDiffError("clean mode needs 8-bit pixels")
    pil = Image.fromarray(u8).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1)


def load_for_network(path: str | os.PathLike, size: int, mode: str) -> torch.Tensor:
    """Read an image file (grey or colour) as RGB and prepare it; errors name the file.

    In ``paper`` mode 16-bit / float grey images keep their full range (the z-score comes first);
    ``clean`` mode needs 8-bit pixels and says so.
    """
    check_mode(mode)
    try:
        with Image.open(path) as probe:
            image_mode = probe.mode
    except Exception:  # missing or unreadable: load_image below raises the named-file error
        image_mode = ""
    if image_mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        if mode == "clean":
            raise InputFileError(path, f"{image_mode} image: 'clean' preprocessing needs 8-bit pixels (use 'paper')")
        grey = np.asarray(load_image(path, "F"), dtype=np.float64)
        return prepare_array(np.repeat(grey[:, :, None], 3, axis=2), size, mode)
    return prepare_array(np.asarray(load_image(path, "RGB")), size, mode)
