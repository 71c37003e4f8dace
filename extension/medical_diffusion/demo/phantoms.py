"""Synthetic prostate-MRI-like phantoms in the PI-CAI on-disk layout (the demo's embedded dataset).

Each case: a body ellipse with a brighter gland ellipsoid (T2W at 0.5x0.5x3 mm, ADC/HBV at 2x2x3 mm,
uint16) and, for positive cases, a lesion that is dark on T2W and ADC and bright on HBV, as
clinically significant cancer tends to be. Labels (gland, human lesion delineation with ISUP-like
values, marksheet) follow picai_labels. They are pictures for exercising the pipeline, not anatomy.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medical_diffusion.datasets.picai import GLAND, HUMAN_LESIONS, MARKSHEET

T2W_SPACING = (0.5, 0.5, 3.0)  # x, y, z (SimpleITK order)
LOW_SPACING = (2.0, 2.0, 3.0)


def _ellipsoid(shape, spacing_zyx, centre_mm, radii_mm) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=np.float64)
    coords = [z * spacing_zyx[0], y * spacing_zyx[1], x * spacing_zyx[2]]
    r = sum(((c - m) / rr) ** 2 for c, m, rr in zip(coords, centre_mm, radii_mm))
    return r <= 1.0


def _volume(shape, spacing_zyx, rng, lesion_centre, positive, kind) -> np.ndarray:
    """One modality's intensities (uint16)."""
    extent = [n * s for n, s in zip(shape, spacing_zyx)]
    centre = [e / 2 for e in extent]
    body = _ellipsoid(shape, spacing_zyx, centre, (extent[0], extent[1] * 0.42, extent[2] * 0.46))
    gland = _ellipsoid(shape, spacing_zyx, centre, (12.0, 14.0, 18.0))
    base = {"t2w": (300, 650, 0), "adc": (900, 1400, 0), "hbv": (20, 35, 0)}[kind]
    vol = np.where(body, base[0], 5.0) + np.where(gland, base[1] - base[0], 0.0)
    if positive:
        lesion = _ellipsoid(shape, spacing_zyx, lesion_centre, (5.0, 5.5, 6.0))
        factor = {"t2w": 0.45, "adc": 0.4, "hbv": 3.5}[kind]
        vol = np.where(lesion, vol * factor, vol)
    noise = rng.normal(0, 0.06 * max(base[:2]), shape)
    return np.clip(vol + noise * body, 0, 65535).astype(np.uint16)


def write_case(root: Path, pid: str, sid: str, positive: bool, seed: int) -> None:
    """Write one case's three volumes and its labels under ``root`` (images/ and labels/)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    t2w_shape, low_shape = (16, 160, 160), (16, 40, 40)  # z, y, x
    zyx = lambda sp: (sp[2], sp[1], sp[0])  # noqa: E731
    extent = [n * s for n, s in zip(t2w_shape, zyx(T2W_SPACING))]
    lesion_centre = [extent[0] / 2 + rng.uniform(-4, 4), extent[1] / 2 + rng.uniform(-6, 6),
                     extent[2] / 2 + rng.uniform(-9, 9)]

    def write(array, spacing, path):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing)
        img.SetOrigin((-40.0, -40.0, -24.0))
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), True)

    folder = root / "images" / pid
    write(_volume(t2w_shape, zyx(T2W_SPACING), rng, lesion_centre, positive, "t2w"), T2W_SPACING,
          folder / f"{pid}_{sid}_t2w.mha")
    for kind in ("adc", "hbv"):
        write(_volume(low_shape, zyx(LOW_SPACING), rng, lesion_centre, positive, kind), LOW_SPACING,
              folder / f"{pid}_{sid}_{kind}.mha")
    centre = [e / 2 for e in extent]
    gland = _ellipsoid(t2w_shape, zyx(T2W_SPACING), centre, (12.0, 14.0, 18.0)).astype(np.uint8)
    lesion = np.zeros(t2w_shape, np.uint8)
    if positive:
        lesion[_ellipsoid(t2w_shape, zyx(T2W_SPACING), lesion_centre, (5.0, 5.5, 6.0))] = 3
    labels = root / "labels"
    write(gland, T2W_SPACING, labels / GLAND / f"{pid}_{sid}.nii.gz")
    write(lesion, T2W_SPACING, labels / HUMAN_LESIONS / f"{pid}_{sid}.nii.gz")


def write_phantom_cohort(root: str | Path, n_per_class: int = 6, seed: int = 0) -> Path:
    """``n_per_class`` negative and positive cases in PI-CAI layout under ``root``; returns ``root``."""
    root = Path(root)
    rows = []
    for i in range(2 * n_per_class):
        positive = i % 2 == 1
        pid, sid = f"{90000 + i}", f"{1900000 + i}"
        write_case(root, pid, sid, positive, seed * 1000 + i)
        rows.append({"patient_id": pid, "study_id": sid, "case_csPCa": "YES" if positive else "NO"})
    path = root / "labels" / MARKSHEET
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["patient_id", "study_id", "case_csPCa"])
        writer.writeheader()
        writer.writerows(rows)
    return root
