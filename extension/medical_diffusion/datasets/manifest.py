"""The manifest CSVs: one row per output image. The full one (with case IDs, sources and options) lives in
the provenance folder; the shareable one in the output folder has only :data:`SHARED_COLUMNS`."""

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
    #: the output's pixel geometry ("" when unknown): mm per pixel and the zero border left/top of the content
    mm_per_px_x: str = ""
    mm_per_px_y: str = ""
    pad_left: str = ""
    pad_top: str = ""


COLUMNS = [f.name for f in fields(ManifestRow)]
#: what the shareable manifest in the output folder holds (nothing that names a case or a source file)
SHARED_COLUMNS = ["output", "split", "label", "slice", "sha256", "mm_per_px_x", "mm_per_px_y", "pad_left", "pad_top"]
#: columns every prepare manifest has (older ones lack the geometry columns)
REQUIRED_COLUMNS = ["output", "split", "label", "slice", "sha256"]


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow], columns: list[str] = COLUMNS) -> Path:
    """Write ``rows`` (only ``columns``) as CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return atomic_write_text(path, buf.getvalue())


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest` (a shareable one gives empty case_id/source/options)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such manifest")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise InputFileError(path, f"not a prepare manifest (missing columns {sorted(missing)})")
            return [ManifestRow(**{k: r.get(k) or "" for k in COLUMNS}) for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(path, f"not a readable CSV manifest ({exc.__class__.__name__})") from None
