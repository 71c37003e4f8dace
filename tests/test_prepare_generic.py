"""Generic import: synthetic DICOM (series order, rescale, windows, MONOCHROME1), NIfTI with masks,
PNG folders, privacy, error reporting; the real DICOM series and MONOCHROME1/2 pair."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medical_diffusion.datasets import generic_import as gi
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.cli import main as cli_main

SECRET = "SECRETPATIENT"


def write_dicom(path: Path, pixels: np.ndarray, series_uid: str, *, mono1=False, slope=None, intercept=None,
                window=None, z=None, instance=1) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = SECRET + "^X", SECRET
    ds.SeriesInstanceUID, ds.InstanceNumber, ds.Modality = series_uid, instance, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def voi(v, c, w):
    return np.clip(np.round(((v - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255)


def png_chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(data[pos + 4:pos + 8])
        pos += 12 + n
    return out


def test_dicom_series_sorted_by_position_with_rescale_and_window(tmp_path):
    uid = generate_uid()
    zs = [6.0, 0.0, 12.0, 3.0, 9.0]  # file order differs from position order
    for i, z in enumerate(zs):
        write_dicom(tmp_path / "s" / f"img{i}.dcm", np.full((16, 16), 100 + int(z) * 10), uid, slope=2.0,
                    intercept=-50.0, z=z, instance=len(zs) - i)
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "s"),), out=str(tmp_path / "out"), slice_index=1,
                                          window="300,400"))
    assert not result.failures and len(result.rows) == 1 and result.rows[0].slice == "1"
    got = np.asarray(Image.open(tmp_path / "out" / result.rows[0].output))
    assert got.shape == (512, 512)
    # slice 1 in position order is z = 3 -> stored 130 -> value 2 * 130 - 50 = 210
    assert np.unique(got).tolist() == [int(voi(210, 300, 400))]


def test_dicom_window_tags_minmax_and_monochrome1(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 125), (32, 1))  # 32 x 32, 0..3875
    write_dicom(tmp_path / "m2.dcm", ramp, generate_uid(), window=(2000, 1001))
    write_dicom(tmp_path / "m1.dcm", ramp, generate_uid(), window=(2000, 1001), mono1=True)
    m2, _ = gi.dicom_to_uint8([str(tmp_path / "m2.dcm")], "auto", None)
    m1, _ = gi.dicom_to_uint8([str(tmp_path / "m1.dcm")], "auto", None)
    np.testing.assert_array_equal(m2, voi(ramp, 2000, 1001).astype(np.uint8))
    np.testing.assert_array_equal(m1, 255 - m2)  # inverted exactly once
    mm, _ = gi.dicom_to_uint8([str(tmp_path / "m2.dcm")], "minmax", None)
    assert mm.min() == 0 and mm.max() == 255 and mm[0, 1] == round(125 / 3875 * 255)


def test_simpleitk_fallback_inverts_monochrome1_once(tmp_path, monkeypatch):
    ramp = np.tile(np.arange(0, 4000, 125), (32, 1))
    write_dicom(tmp_path / "m1.dcm", ramp, generate_uid(), mono1=True)
    direct, _ = gi.dicom_to_uint8([str(tmp_path / "m1.dcm")], "minmax", None)

    def no_decoder(self):
        raise RuntimeError("no pixel data handler")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    via_gdcm, _ = gi.dicom_to_uint8([str(tmp_path / "m1.dcm")], "minmax", None)
    np.testing.assert_array_equal(via_gdcm, direct)
    assert direct[0, 0] == 255  # stored 0 shows white in MONOCHROME1


def test_volume_slice_by_index_and_mask(tmp_path):
    vol = np.zeros((10, 20, 30), np.int16)
    for z in range(10):
        vol[z] = z * 100
    vol[:, 0, 0] = 2000
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nii.gz"))
    mask = np.zeros_like(vol, dtype=np.uint8)
    mask[6, 5:15, 5:15] = 1
    mask[2, 8:10, 8:10] = 1
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(img)
    sitk.WriteImage(m, str(tmp_path / "mask.nii.gz"))
    by_mask, info = gi.volume_to_uint8(str(tmp_path / "vol.nii.gz"), "minmax", None, str(tmp_path / "mask.nii.gz"))
    assert info["slice"] == 6 and by_mask[10, 10] == round(600 / 2000 * 255)
    by_index, info = gi.volume_to_uint8(str(tmp_path / "vol.nii.gz"), "minmax", 3, None)
    assert info["slice"] == 3 and by_index[10, 10] == round(300 / 2000 * 255)
    middle, info = gi.volume_to_uint8(str(tmp_path / "vol.nii.gz"), "minmax", None, None)
    assert info["slice"] == 5
    # the 20 x 30 slice becomes 512 x 512 with the aspect ratio kept
    out, _ = gi.process_item(gi.ImportJob("volume", [str(tmp_path / "vol.nii.gz")], "minmax", 3, None, "max",
                                          "auto", "pad", False, 512))
    assert out.shape == (512, 512) and out[:80].max() == 0 and out[256, 256] > 0


def test_png_folders_privacy_and_failures(tmp_path):
    for cls in ("healthy", "sick"):
        for i in range(2):
            p = tmp_path / "in" / cls / f"{SECRET}_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 60), 50 * (i + 1), np.uint8)).save(p)
    (tmp_path / "in" / "sick" / "broken.png").write_bytes(b"not a png")
    write_dicom(tmp_path / "in" / "sick" / "one.dcm", np.full((8, 8), 7), generate_uid())
    out = tmp_path / "out"
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "in"),), out=str(out), class_from="folder"))
    assert sorted(r.label for r in result.rows) == ["healthy", "healthy", "sick", "sick", "sick"]
    assert [f.source.endswith("broken.png") for f in result.failures] == [True]
    pngs = [p for p in (out / "embedding").rglob("*.png")]
    assert len(pngs) == 5 and all(SECRET not in p.name for p in pngs)
    for p in pngs:
        assert png_chunks(p) == [b"IHDR"] + [b"IDAT"] * (len(png_chunks(p)) - 2) + [b"IEND"]
        assert SECRET.encode() not in p.read_bytes()
    # the DICOM's PatientName/ID and the source file names appear nowhere in the output folder (manifest and
    # journal included); they are kept in the provenance folder beside it
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files if p.suffix != ".png") == ["manifest.csv"]
    for p in files:
        assert SECRET.encode() not in p.read_bytes() and str(tmp_path).encode() not in p.read_bytes()
    prov = tmp_path / "out.provenance"
    assert SECRET in (prov / "manifest.csv").read_text() and (prov / ".prepare_journal.jsonl").is_file()
    assert (SECRET + "^X").encode() not in (prov / "manifest.csv").read_bytes()


def test_cli_images(tmp_path, capsys):
    Image.fromarray(np.full((64, 64, 3), (200, 20, 20), np.uint8)).save(tmp_path / "red.png")
    rc = cli_main(["prepare", "images", str(tmp_path / "red.png"), "--out", str(tmp_path / "o"), "--quiet",
                   "--label", "Red Things"])
    assert rc == 0 and "1 made" in capsys.readouterr().out
    img = Image.open(tmp_path / "o" / "embedding" / "red_things" / "red_things_0001.png")
    assert img.mode == "RGB" and img.size == (512, 512)
    rc = cli_main(["prepare", "images", str(tmp_path / "red.png"), "--out", str(tmp_path / "o"), "--window", "x"])
    assert rc == 1 and "bad window" in capsys.readouterr().err


# --- real files -----------------------------------------------------------------------------------------

def test_real_dicom_series(testdata):
    folder = testdata / "dicom_series" / "ProstateX-0000_adc"
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    frames = gi.sort_series([gi.read_dicom(f) for f in files])
    positions = [f.position for f in frames]
    assert len(frames) == 19 and positions == sorted(positions) and len(set(positions)) == 19
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)
    ours = np.stack([f.pixels for f in frames]).astype(np.float64)
    if not np.array_equal(ours, ref):  # GDCM may sort the other way along the normal
        ref = ref[::-1]
    np.testing.assert_array_equal(ours, ref)
    out, info = gi.dicom_to_uint8(files, "auto", None)
    assert info["slice"] == 9 and out.shape == (128, 84)
    c, w = frames[9].window
    np.testing.assert_array_equal(out, voi(ours[9], c, w).astype(np.uint8))


def test_real_monochrome_pair(testdata, monkeypatch):
    cxr = testdata / "cxr"
    m2, _ = gi.dicom_to_uint8([str(cxr / "siim_cr_chest_pa_monochrome2.dcm")], "auto", None)
    m1, _ = gi.dicom_to_uint8([str(cxr / "siim_cr_chest_pa_fake_monochrome1.dcm")], "auto", None)
    assert m2.shape == (1024, 1024)
    np.testing.assert_array_equal(m1, 255 - m2)
    # SimpleITK (GDCM) already inverts MONOCHROME1: the fallback path must not invert a second time
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array",
                        property(lambda self: (_ for _ in ()).throw(RuntimeError("no handler"))))
    m1_gdcm, _ = gi.dicom_to_uint8([str(cxr / "siim_cr_chest_pa_fake_monochrome1.dcm")], "auto", None)
    np.testing.assert_array_equal(m1_gdcm, m1)
