"""One reader for every image input of the CLI and the tabs: PNG/JPEG, a DICOM file, a DICOM series
folder, or an MHA/NIfTI/NRRD volume (one slice, the middle by default).

Pixels go through the readers of ``prepare images`` (:mod:`generic_import`): the modality LUT, the
window (the file's window tags, else min-max; 16-bit/float pictures min-max), MONOCHROME1 inverted once,
volumes reoriented to LPS, NaN/inf refused naming the file. The image stays on its own grid; the pixel
spacing comes from the same header (DICOM PixelSpacing, the oriented volume's spacing) or, for a PNG
made by ``prepare``, from the manifest beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from medical_diffusion.datasets.file_kinds import is_dicom, is_volume
from medical_diffusion.datasets.slice_geometry import SliceGeometry
from medical_diffusion.errors import InputFileError

WHAT = "PNG/JPEG, a DICOM file, a DICOM series folder, or an MHA/NIfTI/NRRD volume"
#: the window that binarises a label volume or DICOM read as a mask: values > 0 -> 255, the rest 0
LABEL_WINDOW = "0,1"


@dataclass
class ImageInput:
    """An input image on its own pixel grid."""

    path: Path
    image: Image.Image  # RGB, the source's own size
    spacing: tuple[float, float] | None  # mm per pixel (x, y)
    slice: int | None  # the slice taken from a volume or series
    kind: str  # "picture", "dicom", "series" or "volume"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def geometry(self, target_size: tuple[int, int] = (512, 512), fit: str = "pad") -> SliceGeometry:
        """How this image maps onto a ``target_size`` image (as ``prepare`` fits it)."""
        return SliceGeometry(self.size, tuple(target_size), self.spacing, fit)

    def fitted(self, target_size: tuple[int, int] = (512, 512), fit: str = "pad") -> Image.Image:
        """The image on the ``target_size`` grid (unchanged when it already has that size)."""
        if self.size == tuple(target_size):
            return self.image
        return Image.fromarray(self.geometry(target_size, fit).apply(np.asarray(self.image)))


def _kind(path: Path) -> str:
    if is_volume(path):
        return "volume"
    if is_dicom(path):
        return "dicom"
    return "picture"


def _series_files(folder: Path) -> list[str]:
    from medical_diffusion.datasets.generic_import import discover_items

    items, rejected = discover_items((str(folder),))
    series = [files for _key, kind, files, _group in items if kind == "dicom"]
    if len(items) == 1 and series:
        return series[0]
    if not items:
        why = f"; {rejected[0].error}" if rejected else ""
        raise InputFileError(folder, f"folder holds no DICOM series or image{why}")
    raise InputFileError(folder, f"folder holds {len(items)} images/series: give one file or one series folder")


def _picture(path: Path) -> tuple[np.ndarray, dict]:
    try:
        from medical_diffusion.datasets.generic_import import picture_to_uint8
    except ImportError:  # a webui without SimpleITK: plain 8-bit pictures still work
        from medical_diffusion.png_io import load_image

        return np.asarray(load_image(path, "RGB")), {"slice": ""}
    return picture_to_uint8(str(path), "auto", "auto")


def _read_series_files(paths: list[Path], slice_index: int | None, window: str = "auto") -> ImageInput:
    from medical_diffusion.datasets.generic_import import dicom_to_uint8

    if not paths:
        raise InputFileError("(no file)", "choose an image file or the DICOM files of one series")
    for p in paths:
        if not p.is_file() or not is_dicom(p):
            raise InputFileError(p, "several files are read as one DICOM series: this one is not a DICOM file")
    pixels, info = dicom_to_uint8([str(p) for p in paths], window, slice_index)
    image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    spacing = info.get("spacing")
    taken = info.get("slice", "")
    return ImageInput(paths[0].parent, image, tuple(spacing) if spacing else None,
                      None if taken == "" else int(taken), "series")


def read_image_input(path: str | os.PathLike | Sequence[str | os.PathLike],
                     slice_index: int | None = None, window: str = "auto") -> ImageInput:
    """Read ``path`` (see the module docstring; several paths: the DICOM files of one series, as an upload
    gives them); ``slice_index`` picks a slice of a volume or series (None: the middle one); ``window`` is
    that of DICOM and volumes (``prepare images --window``; :data:`LABEL_WINDOW` binarises labels). A clear
    :class:`InputFileError` names the file for anything unreadable."""
    if not isinstance(path, (str, os.PathLike)):
        paths = [Path(p) for p in path]
        if len(paths) != 1:
            return _read_series_files(paths, slice_index, window)
        path = paths[0]
    path = Path(path)
    if path.is_dir():
        from medical_diffusion.datasets.generic_import import dicom_to_uint8

        files = _series_files(path)
        pixels, info = dicom_to_uint8(files, window, slice_index)
        kind = "series" if len(files) > 1 else "dicom"
    elif not path.is_file():
        raise InputFileError(path, f"no such file or folder (an image input is {WHAT})")
    else:
        kind = _kind(path)
        if kind == "dicom":
            from medical_diffusion.datasets.generic_import import dicom_to_uint8

            pixels, info = dicom_to_uint8([str(path)], window, slice_index)
        elif kind == "volume":
            from medical_diffusion.datasets.generic_import import volume_to_uint8

            pixels, info = volume_to_uint8(str(path), window, slice_index, None)
        else:
            pixels, info = _picture(path)
    taken = info.get("slice", "")
    if slice_index is not None and taken == "":
        raise InputFileError(path, f"is a single 2D image: there is no slice {slice_index} to choose")
    spacing = info.get("spacing")
    if kind == "picture":
        from medical_diffusion.datasets.prepared_spacing import prepared_entry, row_spacing

        entry = prepared_entry(path)
        spacing = row_spacing(entry[1]) if entry else None
    image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    return ImageInput(path, image, tuple(spacing) if spacing else None, None if taken == "" else int(taken), kind)
