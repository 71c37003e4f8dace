"""How a source slice maps onto a prepared (e.g. 512 x 512) image: the one geometry shared by
``prepare images``, ``meddiff mask``, the Inpaint tab's overlay and ``meddiff inpaint``.

"pad" (the default) keeps the pixel aspect ratio: the longest edge is scaled to the target and the
other one is centred with zero borders; "stretch" scales each axis to the target. Coordinates are pixel
centres: ``(0, 0)`` is the centre of the top-left pixel, so source ``x`` lands on target
``(x + 0.5) * scale_x - 0.5 + pad_left``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

FITS = ("pad", "stretch")


@dataclass(frozen=True)
class SliceGeometry:
    """A ``source_size`` grid (width, height) with ``spacing`` (mm per source pixel, x and y, or None)
    fitted into ``target_size`` (width, height) by ``fit``."""

    source_size: tuple[int, int]
    target_size: tuple[int, int] = (512, 512)
    spacing: tuple[float, float] | None = None
    fit: str = "pad"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"unknown fit {self.fit!r} (choose from {', '.join(FITS)})")
        if len(self.source_size) != 2 or min(self.source_size) <= 0:
            raise ValueError(f"source size must be two positive integers, got {self.source_size}")
        if len(self.target_size) != 2 or min(self.target_size) <= 0:
            raise ValueError(f"target size must be two positive integers, got {self.target_size}")

    @property
    def scaled_size(self) -> tuple[int, int]:
        """(width, height) the source is resized to before padding."""
        (w, h), (tw, th) = self.source_size, self.target_size
        if self.fit == "stretch":
            return tw, th
        scale = min(tw / w, th / h)
        return min(tw, max(1, int(round(w * scale)))), min(th, max(1, int(round(h * scale))))

    @property
    def pad(self) -> tuple[int, int]:
        """(left, top) zero border in target pixels."""
        (nw, nh), (tw, th) = self.scaled_size, self.target_size
        return (tw - nw) // 2, (th - nh) // 2

    @property
    def scale(self) -> tuple[float, float]:
        """Target pixels per source pixel along x and y."""
        (nw, nh), (w, h) = self.scaled_size, self.source_size
        return nw / w, nh / h

    @property
    def mm_per_px(self) -> tuple[float, float] | None:
        """mm per target pixel (x, y), or None without a source spacing."""
        if self.spacing is None:
            return None
        return self.spacing[0] / self.scale[0], self.spacing[1] / self.scale[1]

    def source_to_target(self, x, y):
        """Source pixel coordinates -> target pixel coordinates (numbers or arrays)."""
        (sx, sy), (left, top) = self.scale, self.pad
        return (np.asarray(x) + 0.5) * sx - 0.5 + left, (np.asarray(y) + 0.5) * sy - 0.5 + top

    def target_to_source(self, x, y):
        """Target pixel coordinates -> source pixel coordinates (numbers or arrays)."""
        (sx, sy), (left, top) = self.scale, self.pad
        return (np.asarray(x) - left + 0.5) / sx - 0.5, (np.asarray(y) - top + 0.5) / sy - 0.5

    def apply(self, image: np.ndarray | Image.Image, resample: int = Image.LANCZOS) -> np.ndarray:
        """``image`` (the source grid, uint8 grey or RGB) resized and padded onto the target grid."""
        arr = np.asarray(image)
        h, w = arr.shape[:2]
        if (w, h) != tuple(self.source_size):
            raise ValueError(f"image is {w}x{h} but the geometry's source is "
                             f"{self.source_size[0]}x{self.source_size[1]}")
        nw, nh = self.scaled_size
        resized = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
        tw, th = self.target_size
        out = np.zeros((th, tw) + arr.shape[2:], dtype=arr.dtype)
        left, top = self.pad
        out[top:top + nh, left:left + nw] = resized
        return out

    def record(self) -> dict:
        """What a prepare manifest keeps about an output: mm per pixel (when known) and padding."""
        mm = self.mm_per_px
        left, top = self.pad
        return {"mm_per_px_x": round(mm[0], 10) if mm else "", "mm_per_px_y": round(mm[1], 10) if mm else "",
                "pad_left": left, "pad_top": top}


def square(source_size: tuple[int, int], size: int = 512, spacing: tuple[float, float] | None = None,
           fit: str = "pad") -> SliceGeometry:
    """The geometry of a source slice prepared as a ``size x size`` image."""
    return SliceGeometry((int(source_size[0]), int(source_size[1])), (int(size), int(size)),
                         None if spacing is None else (float(spacing[0]), float(spacing[1])), fit)
