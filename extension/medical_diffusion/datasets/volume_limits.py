"""Limits checked before an input's pixels are allocated."""

from __future__ import annotations

#: the most voxels (x * y * z * components) a volume or DICOM item may claim: 512 x 512 x 1024; larger
#: headers are refused before anything is allocated (raise it with ``max_voxels`` / ``--max-voxels``)
DEFAULT_MAX_VOXELS = 512 * 512 * 1024


def too_many_voxels(shape: tuple[int, ...] | list[int], limit: int) -> str | None:
    """The problem text when ``shape`` holds more than ``limit`` voxels, else None."""
    n = 1
    for s in shape:
        n *= int(s)
    if n <= limit:
        return None
    dims = " x ".join(str(int(s)) for s in shape)
    return (f"header claims {dims} = {n:,} voxels, above the limit of {limit:,}; if the file is genuine, "
            f"raise the limit (--max-voxels N, or max_voxels=N)")
