"""The manifest CSV: one row per output image, kept beside (never inside) the training folders."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.errors import InputFileError


@dataclass
class ManifestRow:
    """Where one output PNG came from and how it was made."""

    output: str  # path relative to the output folder
    split: str  # "train"/"val"/"test", or "" without splits
    label: str  # class folder name
    case_id: str
    source: str  # source file(s), ";"-joined
    slice: str  # slice index for volumes, "" otherwise
    options: str  # JSON of the preparation options
    sha256: str


COLUMNS = [f.name for f in fields(ManifestRow)]


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow]) -> Path:
    """Write ``rows`` as CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such manifest")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise InputFileError(path, f"not a prepare manifest (missing columns {sorted(missing)})")
        return [ManifestRow(**{k: r[k] for k in COLUMNS}) for r in reader]
