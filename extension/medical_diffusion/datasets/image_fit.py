"""2D image geometry to a square training size: crop to content, fit the longest edge, centred zero-pad."""

from __future__ import annotations

import numpy as np
from PIL import Image

FITS = ("pad", "stretch")


def crop_to_nonzero(image: np.ndarray) -> np.ndarray:
    """Crop to the bounding box of pixels > 0 (any channel); an all-zero image is returned unchanged."""
    mask = image > 0 if image.ndim == 2 else (image > 0).any(axis=-1)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return image
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def fit_longest_edge_and_pad(image: np.ndarray, size: int = 512) -> np.ndarray:
    """Resize (Lanczos) so the longest edge is ``size`` keeping the aspect ratio; zero-pad centred."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    out = np.zeros((size, size) + image.shape[2:], dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def fit_square(image: np.ndarray, size: int = 512, fit: str = "pad") -> np.ndarray:
    """uint8 image to ``size x size``: "pad" keeps the aspect ratio (zero borders), "stretch" does not."""
    if fit == "pad":
        return fit_longest_edge_and_pad(image, size)
    if fit == "stretch":
        return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))
    raise ValueError(f"unknown fit {fit!r} (choose from {', '.join(FITS)})")
