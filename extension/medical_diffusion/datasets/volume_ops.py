"""3D volume operations for slice extraction: read, resample, normalise, crop/pad, slice to 8-bit.

Arrays are in SimpleITK's numpy order ``(z, y, x)``; spacings passed here are ``(z, y, x)`` too.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image

from medical_diffusion.datasets.volume_limits import DEFAULT_MAX_VOXELS, too_many_voxels
from medical_diffusion.errors import InputFileError

RESAMPLERS = ("fast", "sitk")  # both give SimpleITK's exact values; "fast" computes only what is needed


def _itk_reason(exc: RuntimeError) -> str:
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else "unreadable"
    return last.removeprefix("Reason: ").strip()


def read_volume(path: str | os.PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS, ndim: int | None = None,
                nonfinite: float | None = None) -> sitk.Image:
    """Read a volume (MHA, NIfTI, NRRD...) with SimpleITK; every problem is an InputFileError naming the file.

    The header is read first: more than ``max_voxels`` voxels, or a dimension other than ``ndim``, is refused
    before the pixels are allocated. NaN/inf voxels are refused, or replaced by ``nonfinite`` when given.
    """
    if not os.path.isfile(path):
        raise InputFileError(path, "no such file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputFileError(path, f"not a readable image volume ({_itk_reason(exc)})") from None
    size = list(reader.GetSize())
    if ndim is not None and len(size) != ndim:
        raise InputFileError(path, f"is a {len(size)}D image ({' x '.join(map(str, size))}); "
                                   f"a {ndim}D volume is expected")
    problem = too_many_voxels(size + [reader.GetNumberOfComponents()], int(max_voxels))
    if problem:
        raise InputFileError(path, problem)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "No such file" in reason or "not read completely" in str(exc) or "cannot be read" in str(exc):
            reason = "pixel data missing or cut short: the file is truncated or damaged"
        raise InputFileError(path, f"cannot read the pixel data ({reason})") from None
    return check_finite(image, path, nonfinite)


def check_finite(image: sitk.Image, path: str | os.PathLike, replace: float | None = None) -> sitk.Image:
    """``image`` if every voxel is finite; else an InputFileError (or, with ``replace``, that value instead)."""
    view = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(view.dtype, np.floating) and not np.issubdtype(view.dtype, np.complexfloating):
        return image
    bad = ~np.isfinite(view)
    if image.GetNumberOfComponentsPerPixel() == 1:
        from medical_diffusion.datasets.nifti_nonfinite import nonfinite_mask

        stored = nonfinite_mask(path, view.shape)  # ITK reads NIfTI NaN as 0: look at the stored values
        if stored is not None:
            bad |= stored
    count = int(bad.sum())
    if count == 0:
        return image
    if replace is None:
        raise InputFileError(path, f"{count:,} of {view.size:,} voxels are NaN or infinite "
                                   "(fix the file, or choose a replacement value)")
    arr = np.where(bad, np.asarray(replace, dtype=view.dtype), view)
    out = sitk.GetImageFromArray(arr, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out


def resampled_size(image: sitk.Image, spacing_zyx: Sequence[float]) -> list[int]:
    """Output size (x, y, z) = ``round(n * in_spacing / out_spacing)`` with numpy's half-to-even round."""
    out_xyz = list(spacing_zyx)[::-1]
    return [int(np.round(n * s_in / s_out)) for n, s_in, s_out in zip(image.GetSize(), image.GetSpacing(), out_xyz)]


def resample_sitk(image: sitk.Image, spacing_zyx: Sequence[float], is_label: bool = False) -> sitk.Image:
    """SimpleITK resample to ``spacing_zyx``: same origin and direction, identity transform, default 0,
    B-spline (images) or nearest (labels), output pixel type = input pixel type."""
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([float(s) for s in list(spacing_zyx)[::-1]])
    f.SetSize(resampled_size(image, spacing_zyx))
    f.SetOutputDirection(image.GetDirection())
    f.SetOutputOrigin(image.GetOrigin())
    f.SetTransform(sitk.Transform())
    f.SetDefaultPixelValue(0)
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline)
    return f.Execute(image)


def resample_array(image: sitk.Image, spacing_zyx: Sequence[float], is_label: bool = False) -> np.ndarray:
    """SimpleITK-resampled volume (see :func:`resample_sitk`) as a ``(z, y, x)`` array."""
    return sitk.GetArrayFromImage(resample_sitk(image, spacing_zyx, is_label=is_label))


def minmax_normalise(volume: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)`` over the whole volume, float64; ValueError for a constant volume."""
    lo = volume.min()
    hi = volume.max()
    if hi <= lo:
        raise ValueError("volume is constant (cannot min-max normalise)")
    return (volume.astype(np.float64) - float(lo)) / (float(hi) - float(lo))


def crop_or_pad_offsets(shape: Sequence[int], size: Sequence[int]) -> list[int]:
    """Per-axis start index of the centre crop (>= 0) or minus the lower padding (< 0)."""
    out = []
    for n, s in zip(shape, size):
        out.append(int(math.floor((n - s) / 2.0)) if n >= s else -((s - n) // 2))
    return out


def center_crop_or_pad(volume: np.ndarray, size: Sequence[int], pad_value: float = 0) -> np.ndarray:
    """Centre crop (start ``floor((n - s)/2)``) or pad (``(d//2, d - d//2)``) every axis to ``size``."""
    pads = []
    slicer = []
    for n, s in zip(volume.shape, size):
        if n < s:
            d = s - n
            pads.append((d // 2, d - d // 2))
            slicer.append(slice(None))
        else:
            start = int(math.floor((n - s) / 2.0))
            pads.append((0, 0))
            slicer.append(slice(start, start + s))
    out = volume[tuple(slicer)]
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads, mode="constant", constant_values=pad_value)
    return out


def cropped_reference(image: sitk.Image, size_zyx: Sequence[int]) -> sitk.Image:
    """An empty image on the centre-cropped/padded grid of ``image`` (same spacing and direction)."""
    shape = image.GetSize()[::-1]
    start_zyx = crop_or_pad_offsets(shape, size_zyx)
    origin = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in start_zyx[::-1]])
    ref = sitk.Image([int(s) for s in list(size_zyx)[::-1]], image.GetPixelID())
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(origin)
    return ref


def resample_onto(image: sitk.Image, reference: sitk.Image, is_label: bool = False) -> np.ndarray:
    """Resample ``image`` onto ``reference``'s grid (B-spline or nearest, default 0, input pixel type)."""
    out = sitk.Resample(image, reference, sitk.Transform(),
                        sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline, 0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def to_uint8_truncating(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Stack [0, 1] slices as channels (1 -> grey, 3 -> RGB), ``* 255`` and cast to uint8 by truncation."""
    if len(channels) == 1:
        stacked = np.asarray(channels[0], dtype=np.float64)
    else:
        stacked = np.stack([np.asarray(c, dtype=np.float64) for c in channels], axis=-1)
    return (stacked * 255).astype(np.uint8)


def resize_lanczos(image: np.ndarray, size: int = 512) -> np.ndarray:
    """Lanczos resize of a uint8 grey/RGB array to ``size x size``."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def normalised_crop_slice(image: sitk.Image, spacing_zyx: Sequence[float], crop_zyx: Sequence[int], z: int,
                          method: str = "fast") -> np.ndarray:
    """Paper-mode steps 1-3 for one volume, returning only slice ``z`` of the cropped volume:
    B-spline resample (SimpleITK semantics), min-max over the whole resampled volume, centre crop/pad.

    "sitk" runs SimpleITK on the whole volume. "fast" gives bit-identical results: a separable
    approximation of the whole volume bounds every voxel's value, and only voxels whose integer value
    is not settled by the bounds (candidates for the min/max, and the output slice) are computed with
    ITK's exact arithmetic (:mod:`itk_bspline`). It falls back to "sitk" where that is not possible.
    """
    if method not in RESAMPLERS:
        raise ValueError(f"unknown resampler {method!r} (choose from {', '.join(RESAMPLERS)})")
    if method == "fast":
        from medical_diffusion.datasets.fast_paper_slice import fast_normalised_crop_slice

        out = fast_normalised_crop_slice(image, spacing_zyx, crop_zyx, z)
        if out is not None:
            return out
    volume = minmax_normalise(resample_array(image, spacing_zyx))
    return center_crop_or_pad(volume, crop_zyx)[z]
