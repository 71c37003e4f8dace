"""PI-CAI paper-mode preparation speed: ``prepare_picai`` vs the authors' method written with picai_prep.

Run by hand in an environment that has picai_prep (kept out of the project's dependencies), e.g.::

    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install numpy==1.26.4 SimpleITK pillow==10.4.0 picai_prep
    /work/bench-venv/bin/python benchmarks/bench_prepare_picai.py --cases 8

It writes PI-CAI-sized synthetic cases (T2W 384x384 or 640x640 in-plane, ADC/HBV 84x128 or 120x120, 19-27
slices, oblique directions, uint16; gland and lesion masks on the T2W grid), runs the reference
(one case after another, SimpleITK with its default threads, i.e. what the authors' script does) and
``prepare_picai`` with ``--workers`` processes, checks that every output PNG agrees within 1 grey level,
and prints a table with cases/s and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extension"))

from medical_diffusion.datasets import picai  # noqa: E402
from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai  # noqa: E402

GEOMETRIES = [  # (t2w size xyz, t2w spacing, dwi size xyz, dwi spacing)
    ((384, 384, 19), (0.5, 0.5, 3.0), (84, 128, 19), (2.0, 2.0, 3.0)),
    ((640, 640, 24), (0.3, 0.3, 3.0), (120, 120, 24), (1.75, 1.75, 3.0)),
    ((384, 384, 27), (0.5, 0.5, 3.6), (86, 128, 21), (2.0, 2.0, 3.6)),
    ((320, 320, 20), (0.5625, 0.5625, 3.3), (128, 128, 20), (1.6, 1.6, 3.3)),
]


def _direction(rng: np.random.Generator) -> tuple:
    angles = rng.normal(0, 0.12, 3)
    return sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()


def _volume(size_xyz, rng, scale) -> np.ndarray:
    nx, ny, nz = size_xyz
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    r = np.sqrt(((x - nx / 2) / nx) ** 2 + ((y - ny / 2) / ny) ** 2)
    body = (r < 0.45) * (600 + 300 * np.sin(x / (nx / 12)) * np.cos(y / (ny / 9)) + 20 * z)
    noise = rng.gamma(2.0, 40.0, body.shape)
    return np.clip((body + noise) * scale, 0, 65535).astype(np.uint16)


def write_case(root: Path, i: int, rng: np.random.Generator) -> None:
    t2_size, t2_sp, dw_size, dw_sp = GEOMETRIES[i % len(GEOMETRIES)]
    pid, sid = f"1{i:04d}", f"100{i:04d}"
    direction = _direction(rng)
    origin = tuple(rng.normal(0, 20, 3))
    d = np.array(direction).reshape(3, 3)

    def write(arr, path, spacing, size):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        # centre the DWI field of view on the T2W one (as in real scans)
        t2_centre = np.array(origin) + d @ (np.array(t2_sp) * (np.array(t2_size) - 1) / 2)
        img.SetOrigin(tuple(t2_centre - d @ (np.array(spacing) * (np.array(size) - 1) / 2)))
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), useCompression=True)

    img_dir = root / "images" / pid
    write(_volume(t2_size, rng, 1.0), img_dir / f"{pid}_{sid}_t2w.mha", t2_sp, t2_size)
    write(_volume(dw_size, rng, 2.5), img_dir / f"{pid}_{sid}_adc.mha", dw_sp, dw_size)
    write(_volume(dw_size, rng, 0.6), img_dir / f"{pid}_{sid}_hbv.mha", dw_sp, dw_size)
    nx, ny, nz = t2_size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    ell = ((x - nx / 2) / (nx / 7)) ** 2 + ((y - ny / 2) / (ny / 8)) ** 2 + ((z - nz / 2) / (nz / 4)) ** 2
    gland = (ell < 1).astype(np.uint8)
    lesion = np.zeros_like(gland)
    if i % 2:
        les = ((x - nx / 2 - nx / 20) / (nx / 30)) ** 2 + ((y - ny / 2) / (ny / 30)) ** 2 + \
              ((z - nz / 2 - 2) / 1.5) ** 2
        lesion[les < 1] = 2 + i % 4
    name = f"{pid}_{sid}.nii.gz"
    write(gland, root / "labels" / picai.GLAND / name, t2_sp, t2_size)
    write(lesion, root / "labels" / picai.HUMAN_LESIONS / name, t2_sp, t2_size)


def reference_case(case: picai.PicaiCase, positive: bool, out_png: Path) -> int:
    """The authors' steps with picai_prep's resample_img / crop_or_pad (z, y, x conventions)."""
    from picai_prep.preprocessing import crop_or_pad, resample_img

    chans = []
    for mod in ("t2w", "adc", "hbv"):
        img = resample_img(sitk.ReadImage(case.scans[mod]), out_spacing=(3.0, 0.5, 0.5))
        arr = sitk.GetArrayFromImage(img)
        arr = (arr - arr.min()) / (arr.max() - arr.min())
        chans.append(crop_or_pad(arr, size=(30, 300, 300)))
    lab = resample_img(sitk.ReadImage(case.human_lesion if positive else case.gland), out_spacing=(3.0, 0.5, 0.5),
                       is_label=True)
    lab = crop_or_pad(sitk.GetArrayFromImage(lab), size=(30, 300, 300))
    z = int(np.argmax(lab.sum(axis=(1, 2)))) if positive else int(np.median(np.unique(np.where(lab == 1)[0])))
    rgb = (np.stack([c[z] for c in chans], axis=-1) * 255).astype(np.uint8)
    Image.fromarray(rgb).resize((512, 512), Image.LANCZOS).save(out_png)
    return z


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus finished child processes."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_picai_"))
    rng = np.random.default_rng(0)
    if not (work / "images").is_dir():
        for i in range(args.cases):
            write_case(work, i, rng)
    cases = picai.discover_cases(work / "images", work / "labels")[: args.cases]
    n = len(cases)
    labels = {c.case_id: picai.case_label(c, "combined")[0] for c in cases}

    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir()
    t0, c0 = time.perf_counter(), cpu_seconds()
    ref_slices = {c.case_id: reference_case(c, labels[c.case_id], ref_dir / f"{c.case_id}.png") for c in cases}
    t_ref, cpu_ref = time.perf_counter() - t0, cpu_seconds() - c0

    timings = {}
    cpu = {}
    results = {}
    runs = [("fast", 1), ("fast", args.workers), ("sitk", args.workers)]
    for resampler, workers in runs:
        out = work / f"ours_{resampler}_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        opts = PicaiOptions(images=str(work / "images"), labels=str(work / "labels"), out=str(out),
                            resampler=resampler, workers=workers, neutral_names=False, contact_sheet=False,
                            cases=tuple(c.case_id for c in cases))
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = prepare_picai(opts)
        timings[(resampler, workers)] = time.perf_counter() - t0
        cpu[(resampler, workers)] = cpu_seconds() - c0
        assert not res.failures, res.failures
        results[(resampler, workers)] = (out, res)

    print(f"\nPI-CAI paper mode, {n} synthetic PI-CAI-sized cases, {os.cpu_count()} cores\n")
    print(f"{'method':<52}{'wall s':>8}{'cases/s':>9}{'speed-up':>10}{'CPU s/case':>12}{'CPU ratio':>11}"
          f"{'max |diff|':>12}")
    print(f"{'authors (picai_prep resample_img + crop_or_pad), loop':<52}{t_ref:>8.2f}{n / t_ref:>9.2f}"
          f"{1.0:>9.2f}x{cpu_ref / n:>12.2f}{1.0:>10.2f}x{'-':>12}")
    for (resampler, workers), (out, res) in results.items():
        worst = 0
        for row in res.rows:
            if not row.output.startswith("embedding/"):
                continue
            assert int(row.slice) == ref_slices[row.case_id], (row.case_id, row.slice, ref_slices[row.case_id])
            a = np.asarray(Image.open(out / row.output)).astype(int)
            b = np.asarray(Image.open(ref_dir / f"{row.case_id}.png")).astype(int)
            worst = max(worst, int(np.abs(a - b).max()))
        t = timings[(resampler, workers)]
        name = f"prepare_picai resampler={resampler} workers={workers}"
        c = cpu[(resampler, workers)]
        print(f"{name:<52}{t:>8.2f}{n / t:>9.2f}{t_ref / t:>9.2f}x{c / n:>12.2f}{cpu_ref / c:>10.2f}x{worst:>12d}")
    print("\nslices chosen: identical to the reference for every case; max |diff| in grey levels over all pixels")
    print(f"load average during the run: {os.getloadavg()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
