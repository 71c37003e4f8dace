"""Image files in and out: 8-bit PNGs that hold only pixels, written atomically."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from medical_diffusion.atomic_io import atomic_path
from medical_diffusion.errors import InputFileError


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """PIL image from a PIL image or a uint8 array ``(H, W)`` / ``(H, W, 3|4)``."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {array.dtype}")
    return Image.fromarray(array)


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike, text: Mapping[str, str] | None = None) -> str:
    """Write a PNG with no EXIF or ICC chunks and no text chunks but ``text`` (``{key: value}``,
    e.g. A1111's ``parameters``), atomically. Returns the file's sha256."""
    pil = to_pil(image)
    if pil.mode not in ("L", "RGB", "RGBA", "I;16"):
        pil = pil.convert("RGBA" if "A" in pil.getbands() else "RGB")
    clean = Image.new(pil.mode, pil.size)  # a fresh image carries no info/EXIF/ICC
    clean.paste(pil)
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(str(key), str(value))
    with atomic_path(path) as tmp:
        clean.save(tmp, format="PNG", optimize=False, pnginfo=info)
        data = tmp.read_bytes()
    return hashlib.sha256(data).hexdigest()


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image file fully (so the file is closed) in ``mode``; clear error when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Exception as exc:  # PIL raises many types for broken files
        raise InputFileError(path, f"not a readable image ({exc.__class__.__name__}: {exc})") from exc


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "not a folder")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
