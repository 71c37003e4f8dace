"""2D image geometry to a square training size: crop to content, fit the longest edge, centred zero-pad
(the geometry itself is :class:`medical_diffusion.datasets.slice_geometry.SliceGeometry`)."""

from __future__ import annotations

import numpy as np

from medical_diffusion.datasets.slice_geometry import FITS, square  # noqa: F401 (FITS re-exported)


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
    return square((image.shape[1], image.shape[0]), size).apply(image.astype(np.uint8, copy=False))

