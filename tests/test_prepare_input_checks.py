"""Bad inputs become clear per-item failures: NaN/inf voxels, headers claiming huge volumes, 2D files
where 3D is expected, truncated files; DICOM series get per-slice rescale and gap/spacing warnings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medical_diffusion.cli import main as cli_main
from medical_diffusion.datasets import generic_import as gi
from medical_diffusion.datasets import picai
from medical_diffusion.datasets import volume_ops as vo
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai
from medical_diffusion.errors import InputFileError

from test_prepare_generic import write_dicom
from test_prepare_picai import make_case


def _volume(path: Path, arr: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


# --- NaN / inf -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how,suffix", [("partly", ".nii.gz"), ("wholly", ".nii.gz"), ("inf", ".nii.gz"),
                                        ("partly", ".mha"), ("partly", ".nii")])
def test_nan_volume_is_a_per_case_failure_naming_the_file(tmp_path, how, suffix):
    """(ITK reads NIfTI NaN as 0 silently: the stored values are checked.)"""
    arr = np.linspace(0, 1, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    if how == "partly":
        arr[2, 3:5, 3:5] = np.nan
    elif how == "wholly":
        arr[:] = np.nan
    else:
        arr[1, 1, 1] = np.inf
    (tmp_path / "in").mkdir()
    bad = _volume(tmp_path / "in" / f"bad{suffix}", arr)
    _volume(tmp_path / "in" / "good.nii.gz", np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8))
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "out")))
    assert len(result.rows) == 1 and len(result.failures) == 1
    err = result.failures[0].error
    assert str(bad) in err and "NaN or infinite" in err


def test_nan_replaced_by_a_stated_value_when_asked(tmp_path):
    arr = np.full((3, 6, 6), 100.0, np.float32)
    arr[1, :, :3] = 0.0
    arr[1, 0, 5] = np.nan
    path = _volume(tmp_path / "v.nii.gz", arr)
    img, _ = gi.volume_to_uint8(str(path), "minmax", 1, None, nonfinite=0.0)
    assert img[0, 5] == 0 and img[0, 4] == 255 and img[0, 0] == 0  # NaN -> 0 -> black (not garbage)
    rc = cli_main(["prepare", "images", str(path), "--out", str(tmp_path / "o"), "--quiet", "--replace-nonfinite", "0"])
    assert rc == 0


def test_nan_in_a_picai_scan_fails_that_case(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=False)
    make_case(tmp_path, "1002", "2002", positive=False)
    adc = tmp_path / "images" / "1002" / "1002_2002_adc.mha"
    ref = sitk.ReadImage(str(adc))
    arr = sitk.GetArrayFromImage(ref).astype(np.float32)
    arr[4, 10, 10] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(adc))
    result = prepare_picai(PicaiOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                                        out=str(tmp_path / "out"), contact_sheet=False))
    assert [r.case_id for r in result.rows] == ["1001_2001"]
    assert str(adc) in result.failures[0].error and "NaN" in result.failures[0].error


# --- voxel limit ---------------------------------------------------------------------------------------

def _huge_header(path: Path) -> Path:
    """A 100-byte .mha whose header claims 4000 x 4000 x 2500 float voxels (160 GB)."""
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 2500\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 16)
    return path


def test_huge_header_is_refused_before_allocation(tmp_path):
    (tmp_path / "in").mkdir()
    huge = _huge_header(tmp_path / "in" / "huge.mha")
    start = time.monotonic()
    with pytest.raises(InputFileError, match=r"huge\.mha: header claims 4000 x 4000 x 2500 x 1 = 40,000,000,000 "
                                             r"voxels, above the limit of 268,435,456.*--max-voxels"):
        vo.read_volume(huge)
    assert time.monotonic() - start < 2.0
    # as a per-item failure in a batch; the good item is still made
    _volume(tmp_path / "in" / "ok.nii.gz", np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4))
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "out")))
    assert len(result.rows) == 1 and "header claims" in result.failures[0].error
    # the limit is an option (and a CLI flag)
    with pytest.raises(InputFileError, match="32 voxels, above the limit of 10;"):
        vo.read_volume(tmp_path / "in" / "ok.nii.gz", max_voxels=10)
    rc = cli_main(["prepare", "images", str(tmp_path / "in" / "ok.nii.gz"), "--out", str(tmp_path / "o2"),
                   "--quiet", "--max-voxels", "10"])
    assert rc == 3


def test_huge_dicom_header_is_refused(tmp_path):
    path = tmp_path / "big.dcm"
    write_dicom(path, np.zeros((4, 4)), generate_uid())
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 100
    ds.save_as(path)
    with pytest.raises(InputFileError, match=r"big\.dcm: header claims 100 x 60000 x 60000 x 1"):
        gi.dicom_to_uint8([str(path)], "auto", None)


# --- 2D where 3D is expected, truncated files ----------------------------------------------------------

def test_2d_scan_in_picai_is_a_clear_per_case_error(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=False)
    t2w = tmp_path / "images" / "1001" / "1001_2001_t2w.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((64, 64), np.uint16)), str(t2w))
    result = prepare_picai(PicaiOptions(images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                                        out=str(tmp_path / "out"), contact_sheet=False))
    assert not result.rows
    assert result.failures[0].error == f"{t2w}: is a 2D image (64 x 64); a 3D volume is expected"


def test_truncated_mha_names_the_problem(tmp_path):
    full = _volume(tmp_path / "full.mha", np.arange(4 * 20 * 20, dtype=np.uint16).reshape(4, 20, 20))
    cut = tmp_path / "in" / "cut.mha"
    cut.parent.mkdir()
    cut.write_bytes(full.read_bytes()[:1500])
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "out")))
    err = result.failures[0].error
    assert err.startswith(f"{cut}: ") and "truncated or damaged" in err
    assert "No such file or directory" not in err and "\n" not in err


# --- DICOM series ---------------------------------------------------------------------------------------

def _series(folder: Path, zs, slopes=None, intercepts=None) -> list[str]:
    uid = generate_uid()
    files = []
    for i, z in enumerate(zs):
        pixels = np.full((6, 6), 100 + 10 * i)
        pixels[0, 0] = 0
        slope = None if slopes is None else slopes[i]
        p = folder / f"s{i:02d}.dcm"
        write_dicom(p, pixels, uid, slope=slope, intercept=None if slopes is None else intercepts[i], z=z,
                    instance=i + 1)
        files.append(str(p))
    return files


def test_dicom_series_applies_each_slices_rescale(tmp_path):
    slopes, intercepts = [1.0, 2.0, 0.5, 4.0, 1.0], [0.0, -100.0, 50.0, -1000.0, 10.0]
    files = _series(tmp_path, [0.0, 3.0, 6.0, 9.0, 12.0], slopes, intercepts)
    stored = [100 + 10 * i for i in range(5)]
    real = np.array([s * m + b for s, m, b in zip(stored, slopes, intercepts)] + [0 * m + b for m, b in
                                                                                    zip(slopes, intercepts)])
    lo, hi = real.min(), real.max()
    for z in range(5):
        out, info = gi.dicom_to_uint8(files, "minmax", z)
        expect = np.clip(np.round((stored[z] * slopes[z] + intercepts[z] - lo) / (hi - lo) * 255), 0, 255)
        assert out[3, 3] == expect, z
        assert "warnings" not in info


def test_dicom_series_warns_on_a_missing_slice_and_uneven_spacing(tmp_path):
    (tmp_path / "gap").mkdir()
    gap = _series(tmp_path / "gap", [0.0, 3.0, 6.0, 12.0, 15.0])  # the slice at 9 mm removed
    _, info = gi.dicom_to_uint8(gap, "minmax", None)
    assert len(info["warnings"]) == 1 and "missing slice" in info["warnings"][0] and "6 mm" in info["warnings"][0]
    (tmp_path / "uneven").mkdir()
    uneven = _series(tmp_path / "uneven", [0.0, 3.0, 6.2, 9.0, 12.0])
    _, info = gi.dicom_to_uint8(uneven, "minmax", None)
    assert info["warnings"] == ["uneven slice spacing: 2.8 to 3.2 mm"]
    # through a batch: the series is made, and the warning is reported (and kept on a resumed run)
    opts = ImportOptions(inputs=(str(tmp_path / "gap"),), out=str(tmp_path / "out"))
    first = prepare_images(opts)
    assert len(first.rows) == 1 and not first.failures and "missing slice" in first.warnings[0].error
    again = prepare_images(opts)
    assert again.skipped == 1 and "missing slice" in again.warnings[0].error


def test_real_dicom_series_has_no_warning(testdata):
    files = sorted(str(p) for p in (testdata / "dicom_series" / "ProstateX-0000_adc").glob("*.dcm"))
    _, info = gi.dicom_to_uint8(files, "auto", None)
    assert "warnings" not in info


def test_2d_mask_for_a_3d_volume_is_a_clear_error(tmp_path):
    vol = _volume(tmp_path / "vol.nii.gz", np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8))
    mask = _volume(tmp_path / "mask.nii.gz", np.ones((8, 8), np.uint8))
    with pytest.raises(InputFileError) as info:
        gi.volume_to_uint8(str(vol), "minmax", None, str(mask))
    assert str(info.value) == f"{mask}: is a 2D image (8 x 8); a 3D volume is expected"


def test_unexpected_errors_are_reported_on_one_line():
    from medical_diffusion.datasets.batch import _describe

    assert _describe(RuntimeError("Exception thrown in X\nITK ERROR: Y\nReason: bad thing")) == "RuntimeError: Reason: bad thing"
