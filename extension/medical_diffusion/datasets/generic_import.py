"""Generic import: DICOM (single files, series), NIfTI/MHA/NRRD volumes and PNG/JPEG -> 512x512 8-bit PNGs.

DICOM pixels are read with pydicom (stored values), the modality LUT (RescaleSlope/Intercept) and a
window (the file's WindowCenter/Width, min-max, percentiles or a chosen centre/width) are applied, and
MONOCHROME1 is inverted exactly once. When pydicom cannot decode a file, SimpleITK (GDCM) reads it;
GDCM has already inverted MONOCHROME1, so that inversion is undone first. No DICOM tag is written out.
Volumes are reoriented to LPS so that slices are axial (radiological view); the slice is chosen by
index (default: the middle one) or from a mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from medical_diffusion.datasets import volume_ops as vo
from medical_diffusion.datasets.batch import (BatchOptions, BatchResult, ItemFailure, ProgressCallback,
                                            options_to_json, run_batch)
from medical_diffusion.datasets.image_fit import FITS, crop_to_nonzero
from medical_diffusion.datasets.slice_geometry import square
from medical_diffusion.datasets.layout import PlannedItem, plan_outputs, slug
from medical_diffusion.datasets.picai import choose_slice
from medical_diffusion.datasets.splits import Candidate, select_items
from medical_diffusion.datasets.file_kinds import DICOM_SUFFIXES, VOLUME_SUFFIXES, is_dicom  # noqa: F401 (re-exported)
from medical_diffusion.datasets.volume_limits import DEFAULT_MAX_VOXELS, too_many_voxels
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.png_io import IMAGE_SUFFIXES

WINDOWS = ("auto", "minmax", "percentile")  # or "CENTER,WIDTH"
MASK_RULES = ("max", "median")
#: most slices one --slice choice may name (a range like 0-99999999 is refused, not expanded)
MAX_SLICE_CHOICES = 4096


#: options that change the pixels of an item (a change redoes finished items on a re-run); not the slice
#: choice: a chosen slice is in its output's name, and the middle one is the only unnamed one
PIXEL_OPTIONS = ("window", "mask", "mask_rule", "color", "fit", "crop_nonzero", "size", "nonfinite")

@dataclass
class ImportOptions(BatchOptions):
    """Options for :func:`prepare_images`."""

    inputs: tuple[str, ...]
    label: str = "images"  # class folder when class_from == "label"
    class_from: str = "label"  # "label", or "folder": the name of each item's parent folder
    window: str = "auto"  # "auto" (DICOM window tags, else min-max), "minmax", "percentile", "C,W"
    #: volumes/series: axial slice(s): None or "middle", an index, "all", a range "5-12", a list "3,5,9-11"
    slice_index: int | str | None = None
    mask: str | None = None  # volumes: a mask file, or a folder of masks named like the volumes
    mask_rule: str = "max"  # "max": slice with the largest mask sum; "median": median of the slices holding mask voxels
    color: str = "auto"  # "auto", "grey" or "rgb" (2D colour images)
    fit: str = "pad"  # "pad": keep aspect ratio, zero borders; "stretch"
    crop_nonzero: bool = False
    nonfinite: float | None = None  # NaN/inf voxels: None = the item fails; a number = replaced by it

    def validate(self) -> None:
        self.check_common()
        parse_window(self.window)
        if self.fit not in FITS:
            raise MedDiffError(f"unknown fit {self.fit!r} (choose from {', '.join(FITS)})")
        if self.mask_rule not in MASK_RULES:
            raise MedDiffError(f"unknown mask rule {self.mask_rule!r} (choose from {', '.join(MASK_RULES)})")
        if self.color not in ("auto", "grey", "rgb"):
            raise MedDiffError(f"unknown color mode {self.color!r} (choose from auto, grey, rgb)")
        if self.class_from not in ("label", "folder"):
            raise MedDiffError(f"unknown class_from {self.class_from!r} (choose from label, folder)")
        for p in self.inputs:
            if not os.path.exists(p):
                raise InputFileError(p, "no such file or folder")
        if self.mask and not os.path.exists(self.mask):
            raise InputFileError(self.mask, "mask not found")
        if self.mask and parse_slices(self.slice_index) is not None:
            raise MedDiffError("choose the slice either by --slice or by --mask, not both")


def parse_slices(value: int | str | None) -> tuple[int, ...] | str | None:
    """A slice choice: None (the middle slice), "all", or the indexes of an int, a range ``5-12`` or a list
    ``3,5,9-11``; a clear error for anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "middle")):
        return None
    if isinstance(value, bool):
        raise MedDiffError(f"bad slice choice {value!r}")
    if isinstance(value, int):
        value = str(value)
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    out: dict[int, None] = {}  # ordered, without repeats
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            if len(bounds) not in (1, 2) or not all(b.strip().isdigit() for b in bounds):
                raise ValueError
            lo, hi = int(bounds[0]), int(bounds[-1])
        except ValueError:
            raise MedDiffError(f"bad slice choice {value!r}: use middle, all, an index (9), a range (5-12) or "
                               "a list (3,5,9-11) of slice indexes from 0") from None
        if hi < lo:
            raise MedDiffError(f"bad slice range {part.strip()!r}: the first index must not exceed the last")
        if hi - lo + 1 <= MAX_SLICE_CHOICES:  # checked before expanding the range
            out.update(dict.fromkeys(range(lo, hi + 1)))
        if hi - lo + 1 > MAX_SLICE_CHOICES or len(out) > MAX_SLICE_CHOICES:
            raise MedDiffError(f"slice choice {value!r} names more than {MAX_SLICE_CHOICES} slices: use 'all', "
                               "or a shorter range")
    return tuple(out)


def parse_window(text: str) -> tuple[str, float, float]:
    """("auto"|"minmax"|"percentile", 0, 0) or ("fixed", centre, width)."""
    if text in WINDOWS:
        return text, 0.0, 0.0
    try:
        c, w = (float(v) for v in text.split(","))
    except ValueError:
        raise MedDiffError(f"bad window {text!r}: use auto, minmax, percentile or CENTER,WIDTH") from None
    if w < 1:
        raise MedDiffError(f"bad window {text!r}: width must be >= 1")
    return "fixed", c, w


# --- intensity ----------------------------------------------------------------------------------------------

def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI (PS3.3 C.11.2.1.2) to [0, 255] uint8."""
    x = values.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0 if width > 1 else (x > center) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def to_uint8(values: np.ndarray, window: str, tag_window: tuple[float, float] | None = None,
             reference: np.ndarray | None = None) -> np.ndarray:
    """Map real values to uint8 with ``window``; min-max/percentiles are taken over ``reference``."""
    kind, c, w = parse_window(window)
    ref = values if reference is None else reference
    if kind == "fixed":
        return apply_window(values, c, w)
    if kind == "auto" and tag_window is not None:
        return apply_window(values, *tag_window)
    lo, hi = (np.percentile(ref, (0.5, 99.5)) if kind == "percentile" else (ref.min(), ref.max()))
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    y = (values.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


# --- DICOM ------------------------------------------------------------------------------------------------

@dataclass
class DicomFrame:
    """Stored-value pixels of one DICOM file plus the few tags needed (kept in memory only)."""

    pixels: np.ndarray  # stored values (not inverted), (H, W) or (H, W, 3), or (frames, H, W)
    slope: float
    intercept: float
    monochrome1: bool
    window: tuple[float, float] | None
    position: float | None
    instance: int
    spacing: tuple[float, float] | None = None  # mm per pixel (x = column, y = row)


def dicom_pixel_spacing(ds) -> tuple[float, float] | None:
    """(x, y) mm per pixel from PixelSpacing (row, column), else ImagerPixelSpacing; None without either."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            try:
                row_sp, col_sp = (float(v) for v in value)
            except (TypeError, ValueError):
                continue
            if row_sp > 0 and col_sp > 0:
                return col_sp, row_sp
    return None


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def read_dicom(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> DicomFrame:
    """Read one DICOM file's stored pixels (pydicom; SimpleITK fallback with GDCM's inversion undone);
    a header claiming more than ``max_voxels`` samples is refused before the pixels are decoded."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputFileError(path, f"not a readable DICOM file ({exc.__class__.__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputFileError(path, "DICOM file has no pixel data")
    try:
        claimed = [int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0),
                   int(ds.get("Columns", 0) or 0), int(ds.get("SamplesPerPixel", 1) or 1)]
    except (TypeError, ValueError):
        raise InputFileError(path, "DICOM header has a bad Rows/Columns/NumberOfFrames value") from None
    problem = too_many_voxels(claimed, int(max_voxels))
    if problem:
        raise InputFileError(path, problem)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    mono1 = photometric == "MONOCHROME1"
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # no pydicom decoder for this transfer syntax: GDCM via SimpleITK
        try:
            pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError:
            raise InputFileError(path, f"cannot decode DICOM pixels ({exc})") from None
        if pixels.ndim == 3 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if mono1:  # GDCM returned (2^bits - 1) - stored: undo, so inversion happens once, below
            bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
            pixels = (2 ** bits - 1) - pixels.astype(np.int64)
    slope = _first(ds.get("RescaleSlope")) or 1.0
    intercept = _first(ds.get("RescaleIntercept")) or 0.0
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    position = None
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(iop) == 6:
        normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        position = float(np.dot(normal, np.array(ipp, float)))
    return DicomFrame(pixels, float(slope), float(intercept), mono1,
                      (c, w) if c is not None and w is not None and w >= 1 else None,
                      position, int(ds.get("InstanceNumber", 0) or 0), dicom_pixel_spacing(ds))


def sort_series(frames: list[DicomFrame]) -> list[DicomFrame]:
    """Sort slices by position along the slice normal (InstanceNumber when positions are missing)."""
    if all(f.position is not None for f in frames):
        return sorted(frames, key=lambda f: f.position)
    return sorted(frames, key=lambda f: f.instance)


def series_spacing_warnings(positions: list[float]) -> list[str]:
    """Warnings for sorted slice positions (mm along the normal): missing slices, duplicates, uneven steps."""
    if len(positions) < 2:
        return []
    steps = np.diff(np.asarray(positions, dtype=np.float64))
    out = []
    dup = int((np.abs(steps) < 1e-3).sum())
    if dup:
        out.append(f"{dup} slice(s) share a position with another (duplicates?)")
        steps = steps[np.abs(steps) >= 1e-3]
        if steps.size == 0:
            return out
    step = float(np.median(steps))
    tol = max(0.01 * step, 1e-3)
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        where = ", ".join(f"{steps[i]:.3g} mm after slice {i}" for i in gaps[:3])
        out.append(f"missing slice(s): gap(s) of {where} (spacing {step:.3g} mm elsewhere)")
    elif (np.abs(steps - step) > tol).any():
        out.append(f"uneven slice spacing: {steps.min():.4g} to {steps.max():.4g} mm")
    return out


def _finite(values: np.ndarray, path: str | os.PathLike, replace: float | None) -> np.ndarray:
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if replace is None:
        raise InputFileError(path, f"{int(bad.sum()):,} of {values.size:,} pixel values are NaN or infinite "
                                   "(fix the file, or choose a replacement value)")
    return np.where(bad, float(replace), values)


def dicom_to_uint8(files: list[str], window: str, slice_index: int | None, max_voxels: int = DEFAULT_MAX_VOXELS,
                   nonfinite: float | None = None) -> tuple[np.ndarray, dict]:
    """A DICOM file or series -> uint8 (grey, or RGB for colour DICOM) and {"slice": z or "", "warnings": [...]}.

    Each slice gets its own RescaleSlope/Intercept; a series with missing, duplicate or unevenly spaced
    slices is still made, with a warning."""
    frames = [read_dicom(files[0], max_voxels=max_voxels)]
    if len(files) > 1:
        problem = too_many_voxels([len(files), *frames[0].pixels.shape], int(max_voxels))
        if problem:
            raise InputFileError(os.path.dirname(files[0]), f"series of {len(files)} files: {problem}")
        frames += [read_dicom(f, max_voxels=max_voxels) for f in files[1:]]
    warnings: list[str] = []
    if len(frames) > 1:
        frames = sort_series(frames)
        shapes = {f.pixels.shape for f in frames}
        if len(shapes) != 1:
            raise InputFileError(os.path.dirname(files[0]), f"series slices differ in size {sorted(shapes)}")
        if all(f.position is not None for f in frames):
            warnings = series_spacing_warnings([f.position for f in frames])
        values = np.stack([f.pixels.astype(np.float64) * f.slope + f.intercept for f in frames])
    else:
        stored = frames[0].pixels
        if stored.ndim == 3 and stored.shape[-1] == 3:  # colour DICOM: already display RGB
            return stored.astype(np.uint8), {"slice": "", "spacing": frames[0].spacing}
        values = stored.astype(np.float64) * frames[0].slope + frames[0].intercept
    first = frames[0]
    values = _finite(values, files[0] if len(files) == 1 else os.path.dirname(files[0]), nonfinite)
    info: dict = {"slice": "", "spacing": first.spacing}
    if warnings:
        info["warnings"] = warnings
    if values.ndim == 3:
        z = values.shape[0] // 2 if slice_index is None else slice_index
        if not 0 <= z < values.shape[0]:
            raise InputFileError(files[0], f"slice {z} out of range (0..{values.shape[0] - 1})")
        chosen = frames[z] if len(frames) > 1 else first
        out = to_uint8(values[z], window, chosen.window, reference=values)
        info["slice"] = z
    else:
        out = to_uint8(values, window, first.window)
    if first.monochrome1:
        out = 255 - out
    return out, info


# --- volumes and 2D images ------------------------------------------------------------------------------

def _mask_for(volume_path: str, mask: str | None) -> str | None:
    if not mask:
        return None
    if os.path.isdir(mask):
        candidate = os.path.join(mask, os.path.basename(volume_path))
        if not os.path.isfile(candidate):
            raise InputFileError(candidate, "no mask for this volume")
        return candidate
    return mask


def volume_to_uint8(path: str, window: str, slice_index: int | None, mask: str | None,
                    mask_rule: str = "max", max_voxels: int = DEFAULT_MAX_VOXELS,
                    nonfinite: float | None = None) -> tuple[np.ndarray, dict]:
    """An axial slice of a NIfTI/MHA/NRRD volume (reoriented to LPS) as uint8 grey."""
    img = vo.read_volume(path, max_voxels=max_voxels, nonfinite=nonfinite)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(path, "vector/colour volumes are not supported")
    if img.GetDimension() == 2:
        return (to_uint8(sitk.GetArrayFromImage(img).astype(np.float64), window),
                {"slice": "", "spacing": tuple(float(v) for v in img.GetSpacing()[:2])})
    if img.GetDimension() != 3:
        raise InputFileError(path, f"{img.GetDimension()}D images are not supported (3D volumes only)")
    oriented = sitk.DICOMOrient(img, "LPS")
    values = sitk.GetArrayFromImage(oriented).astype(np.float64)
    if mask:
        m_img = vo.read_volume(mask, max_voxels=max_voxels, ndim=3)
        m = sitk.GetArrayFromImage(sitk.DICOMOrient(
            sitk.Resample(m_img, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0), "LPS"))
        try:
            z = choose_slice((m > 0).astype(np.uint8) if mask_rule == "median" else m, mask_rule == "max")
        except MedDiffError:
            raise InputFileError(mask, "mask is empty on this volume") from None
    else:
        z = values.shape[0] // 2 if slice_index is None else slice_index
    if not 0 <= z < values.shape[0]:
        raise InputFileError(path, f"slice {z} out of range (0..{values.shape[0] - 1})")
    return (to_uint8(values[z], window, reference=values),
            {"slice": z, "spacing": tuple(float(v) for v in oriented.GetSpacing()[:2])})


def picture_to_uint8(path: str, window: str, color: str, nonfinite: float | None = None) -> tuple[np.ndarray, dict]:
    """PNG/JPEG/TIFF -> uint8 grey or RGB; >8-bit grey is windowed."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                values = _finite(np.asarray(im).astype(np.float64), path, nonfinite)
                return to_uint8(values, window), {"slice": ""}
            rgb = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputFileError(path, f"not a readable image ({exc})") from exc
    is_colour = not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    if color == "rgb" or (color == "auto" and is_colour):
        return rgb, {"slice": ""}
    return np.asarray(Image.fromarray(rgb).convert("L")), {"slice": ""}


@dataclass
class ImportJob:
    kind: str  # "dicom", "volume", "picture"
    files: list[str]
    window: str
    slice_index: int | None
    mask: str | None
    mask_rule: str
    color: str
    fit: str
    crop_nonzero: bool
    size: int
    max_voxels: int = DEFAULT_MAX_VOXELS
    nonfinite: float | None = None

    @property
    def slice_choice(self) -> str:
        """How a volume's slice is chosen: "mask", "middle" or "index"."""
        return "mask" if self.mask else ("middle" if self.slice_index is None else "index")


def process_item(job: ImportJob) -> tuple[np.ndarray, dict]:
    """One input item -> ``size x size`` uint8 image."""
    if job.kind == "dicom":
        img, info = dicom_to_uint8(job.files, job.window, job.slice_index, job.max_voxels, job.nonfinite)
    elif job.kind == "volume":
        img, info = volume_to_uint8(job.files[0], job.window, job.slice_index, job.mask, job.mask_rule,
                                    job.max_voxels, job.nonfinite)
    else:
        img, info = picture_to_uint8(job.files[0], job.window, job.color, job.nonfinite)
    if job.color == "grey" and img.ndim == 3:
        img = np.asarray(Image.fromarray(img).convert("L"))
    if job.crop_nonzero:
        img = crop_to_nonzero(img)
    geometry = square((img.shape[1], img.shape[0]), job.size, info.pop("spacing", None), job.fit)
    info["geometry"] = geometry.record()
    if info.get("slice", "") != "":  # how the slice was chosen: a re-run choosing otherwise must not replace it
        info["slice_choice"] = job.slice_choice
    return geometry.apply(img), info


def slice_count(kind: str, files: list[str]) -> int | None:
    """How many axial slices an item has (as :func:`dicom_to_uint8`/:func:`volume_to_uint8` index them),
    from headers only; None for a 2D image (or a header that cannot be read: processing reports it)."""
    import pydicom

    if kind == "dicom":
        if len(files) > 1:
            return len(files)
        try:
            frames = int(pydicom.dcmread(files[0], stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
        except Exception:
            return None
        return frames if frames > 1 else None
    if kind != "volume":
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    if len(size) != 3:
        return None
    # the image axis DICOMOrient(..., "LPS") puts last: the one pointing most along S
    direction = np.abs(np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3))
    axes = [j for j in range(3) if int(np.argmax(direction[:, j])) == 2]
    return int(size[axes[0] if axes else int(np.argmax(direction[2]))])


def slice_suffix(z: int) -> str:
    """What an output name gets for slice ``z`` of a volume or series."""
    return f"_s{z:03d}"


def _check_slice_choices(planned: list, jobs: dict, out: str, provenance: str | None) -> None:
    """Refuse when an output this run would write was made by an earlier run from a slice chosen
    otherwise (the middle one vs. by mask): it would be replaced silently."""
    from medical_diffusion.datasets.batch import load_journal
    from medical_diffusion.datasets.layout import JOURNAL_NAME, provenance_folder

    journal = load_journal(provenance_folder(out, provenance) / JOURNAL_NAME)
    for item in planned:
        rec = journal.get(item.candidate.key)
        job = jobs[item.candidate.key][1]
        if rec is None or rec.get("outputs") != item.outputs or job.kind == "picture":
            continue
        before = (rec.get("info") or {}).get("slice_choice")
        now = job.slice_choice
        existing = Path(out) / item.outputs[0]
        if before and before != now and existing.is_file():
            raise MedDiffError(f"{existing}: made by an earlier run from slice {rec['info'].get('slice')} "
                               f"(chosen: {before}); this run chooses the slice by {now} and would replace it. "
                               "Use another --out, or delete the earlier outputs first")


# --- discovery --------------------------------------------------------------------------------------------

def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if any(name.endswith(s) for s in VOLUME_SUFFIXES):
        return "volume"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "picture"
    if is_dicom(path):
        return "dicom"
    return None


def discover_items(inputs: tuple[str, ...]) -> tuple[list[tuple[str, str, list[str], str]], list[ItemFailure]]:
    """Items ``(key, kind, files, group)``: DICOM files of one folder and series form one item."""
    import pydicom

    items: list[tuple[str, str, list[str], str]] = []
    rejected: list[ItemFailure] = []
    for root in inputs:
        root_p = Path(root)
        files = [root_p] if root_p.is_file() else sorted(p for p in root_p.rglob("*") if p.is_file()
                                                           and not p.name.startswith("."))
        base = root_p.parent if root_p.is_file() else root_p
        series: dict[tuple[str, str], list[str]] = {}
        patients: dict[tuple[str, str], str] = {}
        for f in files:
            kind = _kind(f)
            if kind is None:
                continue
            rel = f.relative_to(base).as_posix()
            key = f"{base.name}/{rel}" if base.name else rel
            if kind != "dicom":
                items.append((key, kind, [str(f)], key))
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as exc:
                rejected.append(ItemFailure(key, str(f), f"not a readable DICOM file ({exc.__class__.__name__})"))
                continue
            uid = str(ds.get("SeriesInstanceUID", "")) or f.name
            if ds.get("ImagePositionPatient") is None:  # projection images (CR/DX...): one item per file
                uid += "/" + f.name
            k = (str(f.parent), uid)
            series.setdefault(k, []).append(str(f))
            patients[k] = str(ds.get("PatientID", "")) or str(f.parent)
        for (folder, uid), group_files in sorted(series.items()):
            if len(group_files) == 1:
                rel = Path(group_files[0]).relative_to(base).as_posix()
            else:
                same_folder = [k for k in series if k[0] == folder]
                rel = Path(folder).relative_to(base).as_posix()
                if len(same_folder) > 1:
                    rel += f"#{sorted(same_folder).index((folder, uid)) + 1}"
            key = f"{base.name}/{rel}" if base.name else rel
            items.append((key, "dicom", sorted(group_files), patients[(folder, uid)]))
    return items, rejected


def prepare_images(options: ImportOptions, progress: ProgressCallback | None = None) -> BatchResult:
    """Import medical images of any supported format into 512x512 8-bit PNG class folders (resumable)."""
    options.validate()
    items, rejected = discover_items(tuple(options.inputs))
    if not items and not rejected:
        raise MedDiffError(f"no supported images found in {', '.join(options.inputs)}")
    choice = parse_slices(options.slice_index)
    candidates, jobs, several = [], {}, {}
    for key, kind, files, group in items:
        label = slug(Path(files[0]).parent.name if kind != "dicom" or len(files) == 1
                     else Path(files[0]).parent.parent.name) if options.class_from == "folder" else slug(options.label)
        try:
            mask = _mask_for(files[0], options.mask) if kind == "volume" else None
        except MedDiffError as exc:
            rejected.append(ItemFailure(key, files[0], str(exc)))
            continue
        source = ";".join(files) if len(files) <= 3 else f"{os.path.dirname(files[0])} ({len(files)} files)"
        count = slice_count(kind, files) if choice is not None else None
        if count is not None:  # chosen slices of a volume or series: each its own output, named by slice
            wanted = range(count) if choice == "all" else choice
            bad = [z for z in wanted if z >= count]
            if bad:
                rejected.append(ItemFailure(key, source, f"slice(s) {', '.join(map(str, bad))} out of range "
                                                         f"(0..{count - 1})"))
            several[key] = [z for z in wanted if z < count]
            if not several[key]:
                continue
        candidates.append(Candidate(key, label, group))
        jobs[key] = (source, ImportJob(kind, files, options.window, None, mask, options.mask_rule, options.color,
                                       options.fit, options.crop_nonzero, options.size, options.max_voxels,
                                       options.nonfinite))
    labels = tuple(sorted({c.label for c in candidates}))
    selected = select_items(candidates, options.n_per_class, tuple(options.splits), options.seed, labels)
    planned = []
    for item in plan_outputs(selected, options.neutral_names):
        key = item.candidate.key
        if key not in several:
            planned.append(item)
            continue
        source, job = jobs.pop(key)
        for z in several[key]:
            slice_key = f"{key}#s{z:03d}"
            jobs[slice_key] = (f"{source} slice {z}", replace(job, slice_index=z))
            planned.append(PlannedItem(replace(item.candidate, key=slice_key), item.split,
                                       [o[:-len(".png")] + slice_suffix(z) + ".png" for o in item.outputs]))
    _check_slice_choices(planned, jobs, options.out, options.provenance)
    return run_batch(planned, {p.candidate.key: jobs[p.candidate.key] for p in planned}, process_item, options.out,
                     options_to_json(options), workers=options.workers, progress=progress, rejected=rejected,
                     contact_sheet_title="Imported images" if options.contact_sheet else None,
                     pixel_options_json=options_to_json(options, only=PIXEL_OPTIONS),
                     provenance=options.provenance)
