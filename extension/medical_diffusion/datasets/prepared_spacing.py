"""Pixel spacing of a prepared image, from the manifest ``prepare`` wrote beside it (mm per pixel of the
output PNG, recorded per row since the geometry columns exist)."""

from __future__ import annotations

import os
from pathlib import Path

from medical_diffusion.datasets.layout import MANIFEST_NAME
from medical_diffusion.datasets.manifest import ManifestRow, read_manifest
from medical_diffusion.errors import InputFileError

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


def manifest_spacing(manifest: str | os.PathLike, entry: str | None = None) -> tuple[float, float]:
    """mm per pixel from a prepare manifest: of the row ``entry`` (its output path or file name), or the
    one spacing every row shares; a clear error when it is not recorded or rows differ."""
    manifest = Path(manifest)
    rows = read_manifest(manifest)
    if entry:
        name = Path(entry).as_posix()
        hits = [r for r in rows if r.output == name] or [r for r in rows if Path(r.output).name == Path(name).name]
        if not hits:
            raise InputFileError(manifest, f"lists no output {entry!r}")
        spacings = {row_spacing(r) for r in hits}
        if len(spacings) > 1:
            raise InputFileError(manifest, f"several outputs are named {Path(name).name!r}: give the path "
                                           f"relative to the output folder, e.g. {hits[0].output}")
        what = f"output {hits[0].output}"
    else:
        spacings = {row_spacing(r) for r in rows}
        what = "its outputs"
        if len(spacings) > 1:
            raise InputFileError(manifest, "its outputs have different pixel spacings: name the image "
                                           "(e.g. --image OUT/embedding/<class>/<file>.png)")
    spacing = next(iter(spacings), None)
    if spacing is None:
        raise InputFileError(manifest, f"records no pixel spacing for {what} (prepared before spacing was "
                                       "recorded, or the source had none): prepare again, or give --spacing")
    return spacing
