"""What kind of image file a path is, decided without importing any imaging package."""

from __future__ import annotations

from pathlib import Path

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


def is_volume(path: Path) -> bool:
    """An MHA/NIfTI/NRRD volume, by its name."""
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the "DICM" preamble for files without a known suffix."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
