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

from medical_diffusion.errors import InputFileError

RESAMPLERS = ("fast", "sitk")


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a volume (MHA, NIfTI, NRRD...) with SimpleITK; clear error naming the file."""
    if not os.path.isfile(path):
        raise InputFileError(path, "no such file")
    try:
        return sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputFileError(path, f"not a readable image volume ({first})") from exc


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


# --- separable cubic B-spline: the same maths as ITK's BSplineInterpolateImageFunction (order 3) ----------

_POLE = math.sqrt(3.0) - 2.0


def _bspline_coefficients_1d(data: np.ndarray, axis: int) -> np.ndarray:
    """Cubic B-spline prefilter along ``axis`` with mirror boundaries (ITK BSplineDecompositionImageFilter)."""
    c = np.moveaxis(data, axis, 0).copy()
    n = c.shape[0]
    if n == 1:
        return np.moveaxis(c, 0, axis)
    z = _POLE
    c *= (1.0 - z) * (1.0 - 1.0 / z)
    # causal initialisation (ITK: truncated sum when the horizon is shorter than the data)
    horizon = int(math.ceil(math.log(1e-10) / math.log(abs(z))))
    if horizon < n:
        zn = z
        s = c[0].copy()
        for k in range(1, horizon):
            s += zn * c[k]
            zn *= z
        c[0] = s
    else:
        zn = z
        iz = 1.0 / z
        z2n = z ** (n - 1)
        s = c[0] + z2n * c[n - 1]
        z2n *= z2n * iz
        for k in range(1, n - 1):
            s += (zn + z2n) * c[k]
            zn *= z
            z2n *= iz
        c[0] = s / (1.0 - zn * zn)
    for k in range(1, n):
        c[k] += z * c[k - 1]
    c[n - 1] = (z / (z * z - 1.0)) * (z * c[n - 2] + c[n - 1])
    for k in range(n - 2, -1, -1):
        c[k] = z * (c[k + 1] - c[k])
    return np.moveaxis(c, 0, axis)


def _interpolation_matrix(positions: np.ndarray, n_in: int) -> np.ndarray:
    """Matrix ``(len(positions), n_in)`` of cubic B-spline weights with ITK's mirror boundary rule."""
    m = np.zeros((len(positions), n_in), dtype=np.float64)
    base = np.floor(positions).astype(np.int64) - 1
    w = positions - (base + 1)
    w3 = (1.0 / 6.0) * w * w * w
    w0 = (1.0 / 6.0) + 0.5 * w * (w - 1.0) - w3
    w2 = w + w0 - 2.0 * w3
    w1 = 1.0 - w0 - w2 - w3
    rows = np.arange(len(positions))
    for k, wk in enumerate((w0, w1, w2, w3)):
        idx = base + k
        if n_in == 1:
            idx = np.zeros_like(idx)
        else:
            last = n_in - 1
            idx = np.where(idx < 0, -idx, idx)
            idx = np.where(idx > last, 2 * last - idx, idx)
            idx = np.clip(idx, 0, last)
        np.add.at(m, (rows, idx), wk)
    return m


def resample_fast(image: sitk.Image, spacing_zyx: Sequence[float]) -> np.ndarray:
    """B-spline resample as :func:`resample_sitk` (same grid, mirror boundaries, 0 outside the input,
    clamp + truncating cast to the input type), computed separably with matrix products.

    Valid because the output grid shares origin and direction with the input, so each output axis
    maps onto one input axis. Agrees with SimpleITK to floating-point rounding (a value lying within
    ~1e-9 of an integer may truncate one unit differently).
    """
    arr = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or arr.ndim != 3:
        raise ValueError("resample_fast needs a scalar 3D image")
    dtype = arr.dtype
    size_xyz = resampled_size(image, spacing_zyx)
    out_shape = size_xyz[::-1]
    in_sp = np.array(image.GetSpacing()[::-1], dtype=np.float64)
    out_sp = np.array(list(spacing_zyx), dtype=np.float64)
    coef = arr.astype(np.float64)
    for ax in range(3):
        coef = _bspline_coefficients_1d(coef, ax)
    inside = []
    mats = []
    for ax in range(3):
        pos = np.arange(out_shape[ax], dtype=np.float64) * (out_sp[ax] / in_sp[ax])
        n_in = arr.shape[ax]
        inside.append((pos >= -0.5) & (pos < n_in - 0.5))
        mats.append(_interpolation_matrix(pos, n_in))
    out = np.matmul(coef, mats[2].T)  # x
    out = np.matmul(mats[1], out)  # y
    out = np.tensordot(mats[0], out, axes=(1, 0))  # z
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out[~mask] = 0.0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(out, info.min, info.max)
        out = np.trunc(out)
    return out.astype(dtype)


def resample_array(image: sitk.Image, spacing_zyx: Sequence[float], is_label: bool = False,
                   method: str = "fast") -> np.ndarray:
    """Resampled volume as a ``(z, y, x)`` array; ``method`` "fast" (separable) or "sitk"."""
    if method not in RESAMPLERS:
        raise ValueError(f"unknown resampler {method!r} (choose from {', '.join(RESAMPLERS)})")
    if is_label or method == "sitk" or image.GetNumberOfComponentsPerPixel() != 1:
        return sitk.GetArrayFromImage(resample_sitk(image, spacing_zyx, is_label=is_label))
    return resample_fast(image, spacing_zyx)


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
