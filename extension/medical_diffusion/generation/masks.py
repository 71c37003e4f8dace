"""Inpainting masks from simple geometry: ellipses/circles given in source pixels or millimetres.

Coordinates refer to the *source* image grid (e.g. the DICOM slice): ``x`` is the column and
``y`` the row, pixel centres at integer positions, so ``(0, 0)`` is the centre of the top-left
pixel. Millimetres are ``x * spacing_x`` / ``y * spacing_y`` (non-square pixels allowed). The
mask is drawn directly at the target size (512x512 for SD2) on the grid ``prepare`` gives the image
(:class:`~medical_diffusion.datasets.slice_geometry.SliceGeometry`: aspect ratio kept, centred zero
padding) by mapping every target pixel centre back to physical space, so shapes stay exact under
rescaling. White (255) = repaint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from medical_diffusion.datasets.slice_geometry import FITS, SliceGeometry
from medical_diffusion.errors import MedDiffError

#: pixels per latent cell for SD (shapes smaller than this barely reach the model)
LATENT_CELL_PX = 8


@dataclass
class MaskShape:
    """An ellipse (``radii=(rx, ry)``) or circle (``rx == ry``) rotated by ``angle`` degrees
    (clockwise on screen, i.e. from +x towards +y)."""

    center: tuple[float, float]
    radii: tuple[float, float]
    angle: float = 0.0

    @classmethod
    def circle(cls, x: float, y: float, r: float) -> "MaskShape":
        return cls((float(x), float(y)), (float(r), float(r)))


@dataclass
class MaskSpec:
    """Everything that defines a mask; saved as JSON next to it."""

    shapes: list[MaskShape]
    unit: str = "px"  # "px" (source pixels) or "mm"; applies to centres, radii and feather
    source_size: tuple[int, int] = (512, 512)  # (width, height) of the source grid
    spacing: tuple[float, float] | None = None  # mm per source pixel (x, y); needed for "mm"
    target_size: tuple[int, int] = (512, 512)
    feather: float = 0.0  # width of the soft edge (linear ramp centred on the outline)
    invert: bool = False
    fit: str = "pad"  # how the source lies on the target: "pad" (as prepare does) or "stretch"

    def geometry(self) -> SliceGeometry:
        """Where the source grid lies on the target grid."""
        return SliceGeometry(tuple(self.source_size), tuple(self.target_size), self.spacing, self.fit)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "MaskSpec":
        data = dict(data)
        data.setdefault("fit", "stretch")  # masks saved before the fit was recorded were stretched
        data["shapes"] = [MaskShape(tuple(s["center"]), tuple(s["radii"]), float(s.get("angle", 0.0)))
                          for s in data["shapes"]]
        for key in ("source_size", "target_size", "spacing"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class MaskResult:
    """The mask (uint8, white = repaint) and what is worth telling the user about it."""

    mask: np.ndarray
    target_spacing: tuple[float, float] | None  # mm per target pixel (x, y)
    shape_sizes_px: list[tuple[float, float]]  # each shape's diameters along its own axes, target px
    shape_sizes_mm: list[tuple[float, float]] | None
    warnings: list[str] = field(default_factory=list)


def _validate(spec: MaskSpec) -> tuple[float, float]:
    if spec.unit not in ("px", "mm"):
        raise MedDiffError(f"mask unit must be 'px' or 'mm', got {spec.unit!r}")
    if not spec.shapes:
        raise MedDiffError("a mask needs at least one shape")
    if spec.unit == "mm" and spec.spacing is None:
        raise MedDiffError("shapes in mm need the pixel spacing (from a DICOM/volume file or given)")
    if spec.spacing is not None and (len(spec.spacing) != 2 or min(spec.spacing) <= 0):
        raise MedDiffError(f"pixel spacing must be two positive numbers, got {spec.spacing}")
    for size in (spec.source_size, spec.target_size):
        if len(size) != 2 or min(size) <= 0:
            raise MedDiffError(f"image sizes must be two positive integers, got {size}")
    for shape in spec.shapes:
        if min(shape.radii) <= 0:
            raise MedDiffError(f"shape radii must be positive, got {shape.radii}")
    if spec.fit not in FITS:
        raise MedDiffError(f"mask fit must be one of {', '.join(FITS)}, got {spec.fit!r}")
    if spec.feather < 0:
        raise MedDiffError(f"feather must not be negative, got {spec.feather}")
    # the unit frame: mm, or source pixels (x spacing 1, y spacing 1)
    return tuple(spec.spacing) if spec.unit == "mm" else (1.0, 1.0)


def _shape_distance(shape: MaskShape, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) from points to the ellipse outline, in the
    unit frame: first-order ``(r - 1) / |grad r|`` with the exact value along the axes."""
    cx, cy = shape.center
    rx, ry = shape.radii
    a = math.radians(shape.angle)
    dx, dy = px - cx, py - cy
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    grad = np.sqrt((u / rx**2) ** 2 + (v / ry**2) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(r > 1e-12, (r - 1) * r / np.maximum(grad, 1e-300), -min(rx, ry))
    return dist


def render_mask(spec: MaskSpec) -> MaskResult:
    """Draw the union of the shapes at ``target_size``; feathered edge, optional inversion."""
    frame_spacing = _validate(spec)
    geo = spec.geometry()
    wt, ht = spec.target_size
    # source pixel coordinates of every target pixel centre (the image is fitted as prepare fits it)
    xs, ys = geo.target_to_source(np.arange(wt), np.arange(ht))
    gx, gy = np.meshgrid(xs * frame_spacing[0], ys * frame_spacing[1])
    value = np.zeros((ht, wt), dtype=np.float64)
    sizes_px, sizes_mm, warnings = [], [], []
    for i, shape in enumerate(spec.shapes):
        dist = _shape_distance(shape, gx, gy)
        if spec.feather > 0:
            inside = np.clip(0.5 - dist / spec.feather, 0.0, 1.0)
        else:
            inside = (dist <= 0).astype(np.float64)
        value = np.maximum(value, inside)
        # the shape's two diameters (along its own rotated axes) in target pixels and in mm
        a = math.radians(shape.angle)
        rx, ry = shape.radii
        per_unit_x, per_unit_y = geo.scale[0] / frame_spacing[0], geo.scale[1] / frame_spacing[1]
        w_px = 2 * rx * math.hypot(math.cos(a) * per_unit_x, math.sin(a) * per_unit_y)
        h_px = 2 * ry * math.hypot(math.sin(a) * per_unit_x, math.cos(a) * per_unit_y)
        sizes_px.append((w_px, h_px))
        if spec.spacing is not None:
            mm_x, mm_y = spec.spacing[0] / frame_spacing[0], spec.spacing[1] / frame_spacing[1]
            sizes_mm.append((2 * rx * math.hypot(math.cos(a) * mm_x, math.sin(a) * mm_y),
                             2 * ry * math.hypot(math.sin(a) * mm_x, math.cos(a) * mm_y)))
        if min(w_px, h_px) < LATENT_CELL_PX:
            warnings.append(
                f"shape {i + 1} is {w_px:.1f}x{h_px:.1f} px at {wt}x{ht}: smaller than one latent cell "
                f"({LATENT_CELL_PX} px), so the model can hardly paint anything inside it"
            )
        if not (inside > 0.5).any():
            warnings.append(f"shape {i + 1} does not cover any pixel of the image")
    if spec.invert:
        value = 1.0 - value
    mask = np.round(value * 255).astype(np.uint8)
    return MaskResult(mask, geo.mm_per_px, sizes_px, sizes_mm if spec.spacing is not None else None, warnings)


# -- sources: the image inputs' grid and spacing --------------------------------------------

@dataclass
class SourceGeometry:
    size: tuple[int, int]  # (width, height) in pixels
    spacing: tuple[float, float] | None  # mm per pixel (x, y)


def read_source_geometry(path: str | os.PathLike, slice_index: int | None = None) -> SourceGeometry:
    """Pixel grid and spacing of an image input (PNG/JPEG, DICOM file or series folder, volume), read
    as :func:`~medical_diffusion.datasets.image_input.read_image_input` reads it."""
    from medical_diffusion.datasets.image_input import read_image_input

    source = read_image_input(path, slice_index)
    return SourceGeometry(source.size, source.spacing)


def load_source_image(path: str | os.PathLike, slice_index: int | None = None) -> Image.Image:
    """An RGB picture of an image input (one slice of a volume or series: the middle by default)."""
    from medical_diffusion.datasets.image_input import read_image_input

    return read_image_input(path, slice_index).image


# -- preview -----------------------------------------------------------------------------

def overlay_preview(image: Image.Image | None, result: MaskResult, spec: MaskSpec) -> Image.Image:
    """The image at target size with the repaint area tinted red, outlines, and each shape's
    size written next to it (mm when the spacing is known, else px)."""
    wt, ht = spec.target_size
    geo = spec.geometry()
    if image is None:
        base = Image.new("RGB", (wt, ht), "black")
    elif image.size == tuple(spec.source_size):  # the source slice: fitted as prepare fits it
        base = Image.fromarray(geo.apply(np.asarray(image.convert("RGB"))))
    elif image.size == (wt, ht):  # already on the target grid
        base = image.convert("RGB")
    else:
        raise MedDiffError(f"the overlay image is {image.size[0]}x{image.size[1]}, neither the mask's source "
                           f"({spec.source_size[0]}x{spec.source_size[1]}) nor its target ({wt}x{ht})")
    arr = np.asarray(base).astype(np.float64)
    alpha = (result.mask.astype(np.float64) / 255.0)[..., None] * 0.45
    tint = np.array([255.0, 40.0, 40.0])
    out = Image.fromarray(np.clip(arr * (1 - alpha) + tint * alpha, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    frame = tuple(spec.spacing) if spec.unit == "mm" else (1.0, 1.0)
    for i, shape in enumerate(spec.shapes):
        cx, cy = (float(v) for v in geo.source_to_target(shape.center[0] / frame[0], shape.center[1] / frame[1]))
        w_px, h_px = result.shape_sizes_px[i]
        if result.shape_sizes_mm is not None:
            label = f"{i + 1}: {result.shape_sizes_mm[i][0]:.1f}x{result.shape_sizes_mm[i][1]:.1f} mm"
        else:
            label = f"{i + 1}: {w_px:.0f}x{h_px:.0f} px"
        a = math.radians(shape.angle)
        outline = []
        for k in range(49):
            th = 2 * math.pi * k / 48
            u, v = shape.radii[0] * math.cos(th), shape.radii[1] * math.sin(th)
            px = shape.center[0] + u * math.cos(a) - v * math.sin(a)
            py = shape.center[1] + u * math.sin(a) + v * math.cos(a)
            tx, ty = geo.source_to_target(px / frame[0], py / frame[1])
            outline.append((float(tx), float(ty)))
        draw.line(outline, fill=(255, 255, 0), width=1)
        tx = min(max(0, cx + w_px / 2 + 3), wt - 6 * len(label))
        ty = min(max(0, cy - 6), ht - 12)
        draw.text((tx, ty), label, fill=(255, 255, 0))
    if result.target_spacing is not None:
        draw.text((4, ht - 14), f"{result.target_spacing[0]:.3f}x{result.target_spacing[1]:.3f} mm/px",
                  fill=(255, 255, 255))
    return out
