"""A contact sheet: one PNG showing a sample of the prepared images with their class and split."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from medical_diffusion.datasets.manifest import ManifestRow
from medical_diffusion.image_grid import make_grid
from medical_diffusion.png_io import save_png


def write_contact_sheet(out_dir: str | os.PathLike, rows: list[ManifestRow], path: str | os.PathLike,
                        max_per_class: int = 8, cell: int = 128, title: str | None = None) -> Path | None:
    """Grid of up to ``max_per_class`` outputs per (split, label); returns the path, or None if no rows."""
    out_dir = Path(out_dir)
    picked: list[ManifestRow] = []
    counts: dict[tuple[str, str], int] = {}
    for row in sorted(rows, key=lambda r: (r.split, r.label, r.output)):
        k = (row.split, row.label)
        if counts.get(k, 0) < max_per_class:
            counts[k] = counts.get(k, 0) + 1
            picked.append(row)
    if not picked:
        return None
    images = []
    labels = []
    for row in picked:
        with Image.open(out_dir / row.output) as im:
            images.append(im.convert("RGB").resize((cell, cell), Image.LANCZOS))
        labels.append(f"{row.split + '/' if row.split else ''}{row.label} {row.slice}".strip())
    sheet = make_grid(images, labels, cols=min(max_per_class, len(images)), cell=cell, title=title)
    save_png(sheet, path)
    return Path(path)
