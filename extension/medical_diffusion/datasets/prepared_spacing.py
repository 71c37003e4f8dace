"""Pixel spacing of a prepared image, from the manifest ``prepare`` wrote beside it (mm per pixel of the
output PNG, recorded per row since the geometry columns exist)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from medical_diffusion.datasets.layout import MANIFEST_NAME
from medical_diffusion.datasets.manifest import ManifestRow, read_manifest
from medical_diffusion.datasets.slice_geometry import SliceGeometry
from medical_diffusion.errors import InputFileError, MedDiffError

#: how many folders above a PNG its prepare output folder may be (classifier/<split>/<class>/x.png)
_MAX_DEPTH = 4


def row_spacing(row: ManifestRow) -> tuple[float, float] | None:
    """(x, y) mm per pixel of a manifest row, or None when not recorded."""
    try:
        sx, sy = float(row.mm_per_px_x), float(row.mm_per_px_y)
    except (TypeError, ValueError):
        return None
    return (sx, sy) if sx > 0 and sy > 0 else None


def prepared_entry(image: str | os.PathLike) -> tuple[Path, ManifestRow] | None:
    """The manifest and its row for a PNG inside a prepare output folder, or None when none lists it."""
    path = Path(image).resolve()
    for folder in list(path.parents)[:_MAX_DEPTH]:
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        try:
            rows = read_manifest(manifest)
        except InputFileError:
            continue  # some other manifest.csv
        for row in rows:
            if row.output == rel:
                return manifest, row
    return None


def _rows_for(manifest: Path, rows: list[ManifestRow], entry: str | None) -> tuple[list[ManifestRow], str]:
    """The rows ``entry`` names (all rows without one) and how to call them in messages."""
    if not entry:
        return rows, "its outputs"
    name = Path(entry).as_posix()
    hits = [r for r in rows if r.output == name] or [r for r in rows if Path(r.output).name == Path(name).name]
    if not hits:
        raise InputFileError(manifest, f"lists no output {entry!r}")
    return hits, f"output {hits[0].output}"


def manifest_spacing(manifest: str | os.PathLike, entry: str | None = None) -> tuple[float, float]:
    """mm per pixel from a prepare manifest: of the row ``entry`` (its output path or file name), or the
    one spacing every row shares; a clear error when it is not recorded or rows differ."""
    manifest = Path(manifest)
    rows, what = _rows_for(manifest, read_manifest(manifest), entry)
    spacings = {row_spacing(r) for r in rows}
    if len(spacings) > 1 and entry:
        raise InputFileError(manifest, f"several outputs are named {Path(entry).name!r}: give the path "
                                       f"relative to the output folder, e.g. {rows[0].output}")
    if len(spacings) > 1:
        raise InputFileError(manifest, "its outputs have different pixel spacings: name the image "
                                       "(e.g. --image OUT/embedding/<class>/<file>.png)")
    spacing = next(iter(spacings), None)
    if spacing is None:
        raise InputFileError(manifest, f"records no pixel spacing for {what} (prepared before spacing was "
                                       "recorded, or the source had none): prepare again, or give --spacing")
    return spacing


def manifest_grid(manifest: str | os.PathLike, entry: str | None = None) -> tuple[tuple[float, float], tuple[int, int]]:
    """The spacing of :func:`manifest_spacing` and the pixel size (width, height) of the prepared images it
    applies to, read from their PNG headers; a clear error when they are missing or differ in size."""
    manifest = Path(manifest)
    spacing = manifest_spacing(manifest, entry)
    rows, what = _rows_for(manifest, read_manifest(manifest), entry)
    sizes = set()
    for row in rows:
        path = manifest.parent / row.output
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except OSError as exc:
            raise InputFileError(path, f"listed in {manifest} but not readable ({exc}): the prepared image's "
                                       "pixel size is what its spacing applies to") from exc
    if len(sizes) > 1:
        raise InputFileError(manifest, f"{what} differ in pixel size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})"
                                       ": name the image with --entry")
    if not sizes:
        raise InputFileError(manifest, "lists no outputs")
    return spacing, next(iter(sizes))


def check_prepared_geometry(image: str | os.PathLike, geometry: SliceGeometry) -> None:
    """Refuse ``geometry`` (a source fitted onto ``image``'s grid) when ``image`` is a prepare output whose
    manifest records another fit, e.g. one made with ``--crop-nonzero``: shapes placed on the source would
    be shifted on it. Images not listed in a manifest, or listed without geometry, pass."""
    found = prepared_entry(image)
    if found is None:
        return
    manifest, row = found
    recorded = row_spacing(row)
    expected = geometry.mm_per_px
    try:
        pads = (int(row.pad_left), int(row.pad_top))
    except (TypeError, ValueError):
        pads = None
    spacing_differs = recorded is not None and expected is not None and any(
        abs(a - b) > 1e-6 * max(abs(b), 1e-12) for a, b in zip(recorded, expected))
    if (pads is not None and pads != geometry.pad) or spacing_differs:
        raise MedDiffError(
            f"{image} is a prepared image ({manifest}) that does not lie on its source as the mask's source grid "
            f"({geometry.source_size[0]}x{geometry.source_size[1]}, fit {geometry.fit}) would put it (prepared "
            "e.g. with --crop-nonzero or another --fit): take the geometry from the prepared image, "
            f"--spacing-from {manifest}")


def spacing_on(size: tuple[int, int], spacing: tuple[float, float], prepared_size: tuple[int, int],
               what: str | os.PathLike) -> tuple[float, float]:
    """``spacing`` (mm per pixel of a ``prepared_size`` image) for an image of the same field of view at
    ``size`` (e.g. a 128 px generated one); ``what`` (the image) is refused when its aspect ratio differs."""
    (w, h), (pw, ph) = size, prepared_size
    if (w, h) == (pw, ph):
        return spacing
    if abs(w * ph - h * pw) > 0.01 * pw * h:
        raise InputFileError(what, f"is {w}x{h} but the prepared images are {pw}x{ph}: their spacing fits an "
                                   "image of the same field of view (the same aspect ratio); give --spacing SX SY")
    return spacing[0] * pw / w, spacing[1] * ph / h
