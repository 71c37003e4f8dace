"""PI-CAI preparation: synthetic SimpleITK phantoms (geometry, slice choice, label policy, errors,
resumability, splits) and the real sample case through paper mode against a literal re-statement of
the authors' steps."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medical_diffusion.cli import main as cli_main
from medical_diffusion.datasets import picai
from medical_diffusion.datasets.manifest import read_manifest
from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai

DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.98, -0.19899748742132398, 0.0, 0.19899748742132398, 0.98)
PAD_Z = (30 - 12) // 2  # phantom has 12 slices of 3 mm -> padded to 30


def _write(arr: np.ndarray, path: Path, spacing, origin, pixel=None) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def make_case(root: Path, pid: str, sid: str, positive: bool, human: bool = True, ai: bool = True,
              marksheet_rows: list | None = None, seed: int = 0) -> None:
    """T2W 64x64x12 @1x1x3 mm, ADC/HBV 32x32x12 @2x2x3 mm (uint16); gland and lesion on the T2W grid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:12, 0:64, 0:64]
    t2w = (200 + 50 * np.sin(x / 5.0) + 30 * z + rng.integers(0, 40, (12, 64, 64))).astype(np.uint16)
    low = (100 + 20 * np.cos(np.mgrid[0:12, 0:32, 0:32][1] / 4.0) + rng.integers(0, 30, (12, 32, 32))).astype(np.uint16)
    origin = (-32.0, -32.0, -18.0)
    img_dir = root / "images" / pid
    _write(t2w, img_dir / f"{pid}_{sid}_t2w.mha", (1.0, 1.0, 3.0), origin)
    _write(low, img_dir / f"{pid}_{sid}_adc.mha", (2.0, 2.0, 3.0), origin)
    _write((low // 2).astype(np.uint16), img_dir / f"{pid}_{sid}_hbv.mha", (2.0, 2.0, 3.0), origin)
    gland = np.zeros((12, 64, 64), np.uint8)
    gland[3:9, 28:36, 28:36] = 1
    gland[5, 16:48, 16:48] = 1  # most gland voxels on slice 5 -> median slice 5
    lesion = np.zeros((12, 64, 64), np.uint8)
    if positive:
        lesion[7, 30:32, 30:32] = 3  # sum 12
        lesion[4, 20:30, 20:30] = 2  # sum 200 -> argmax slice 4
    lab = root / "labels"
    name = f"{pid}_{sid}.nii.gz"
    _write(gland, lab / picai.GLAND / name, (1.0, 1.0, 3.0), origin)
    if human:
        _write(lesion, lab / picai.HUMAN_LESIONS / name, (1.0, 1.0, 3.0), origin)
    if ai:
        ai_lesion = lesion if human else (np.roll(lesion, 3, axis=0) if positive else lesion)
        _write(ai_lesion, lab / picai.AI_LESIONS / name, (1.0, 1.0, 3.0), origin)
    if marksheet_rows is not None:
        marksheet_rows.append({"patient_id": pid, "study_id": sid, "case_csPCa": "YES" if positive else "NO"})


def write_marksheet(root: Path, rows: list) -> None:
    path = root / "labels" / picai.MARKSHEET
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient_id", "study_id", "mri_date", "case_csPCa", "center"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "mri_date": "2020-01-01", "center": "RUMC"})


def options(root: Path, out: Path, **kw) -> PicaiOptions:
    return PicaiOptions(images=str(root / "images"), labels=str(root / "labels"), out=str(out), **kw)


def test_paper_mode_geometry_and_slice_choice(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=False)
    make_case(tmp_path, "1002", "2002", positive=True)
    result = prepare_picai(options(tmp_path, tmp_path / "out", neutral_names=False))
    assert not result.failures
    rows = {r.case_id: r for r in result.rows}
    assert rows["1001_2001"].label == "neg" and rows["1001_2001"].slice == str(PAD_Z + 5)
    assert rows["1002_2002"].label == "pos" and rows["1002_2002"].slice == str(PAD_Z + 4)
    img = Image.open(tmp_path / "out" / rows["1002_2002"].output)
    assert img.size == (512, 512) and img.mode == "RGB"
    assert rows["1002_2002"].output == "embedding/pos/1002_2002.png"
    # the 300 x 300 crop of 0.5 mm voxels fills the 512 px image: 150 mm / 512 px on both axes, no padding
    shared = read_manifest(tmp_path / "out" / "manifest.csv")[0]
    assert (float(shared.mm_per_px_x), float(shared.mm_per_px_y)) == pytest.approx((150 / 512, 150 / 512))
    assert (shared.pad_left, shared.pad_top) == ("0", "0")
    # manifest beside, not inside, the class folders; contact sheet written
    assert (tmp_path / "out" / "manifest.csv").is_file() and (tmp_path / "out" / "contact_sheet.png").is_file()
    assert not list((tmp_path / "out" / "embedding").rglob("*.csv"))
    assert read_manifest(tmp_path / "out" / "manifest.csv")[0].sha256 == result.rows[0].sha256
    full = read_manifest(tmp_path / "out.provenance" / "manifest.csv")
    assert [r.case_id for r in full] == [r.case_id for r in result.rows]


def test_negative_slice_is_the_median_of_distinct_gland_slices(tmp_path):
    """The authors: int(median(unique(z))) over the gland's slices; "voxels" weights slices by area."""
    label = np.zeros((12, 8, 8), np.uint8)
    label[2:10, 3:5, 3:5] = 1  # gland on slices 2..9 -> distinct-slice median 5.5 -> 5
    label[8] = 1  # most voxels on slice 8 -> voxel-weighted median 8
    assert picai.choose_slice(label, False) == 5
    assert picai.choose_slice(label, False, "voxels") == 8
    # the same through a whole preparation (phantom gland replaced)
    make_case(tmp_path, "1001", "2001", positive=False)
    gland_path = tmp_path / "labels" / picai.GLAND / "1001_2001.nii.gz"
    ref = sitk.ReadImage(str(gland_path))
    gland = np.zeros((12, 64, 64), np.uint8)
    gland[2:10, 30:34, 30:34] = 1
    gland[8, 10:54, 10:54] = 1
    img = sitk.GetImageFromArray(gland)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(gland_path))
    authors = prepare_picai(options(tmp_path, tmp_path / "a", contact_sheet=False))
    weighted = prepare_picai(options(tmp_path, tmp_path / "w", contact_sheet=False, negative_slice="voxels"))
    assert authors.rows[0].slice == str(PAD_Z + 5) and weighted.rows[0].slice == str(PAD_Z + 8)


def test_volume_steps_match_the_spec(tmp_path):
    """Slices after resample/min-max/crop: T2W content equals the literal computation; both resamplers agree."""
    make_case(tmp_path, "1001", "2001", positive=False)
    case = picai.discover_cases(tmp_path / "images", tmp_path / "labels")[0]
    out = {}
    for resampler in ("sitk", "fast"):
        job = picai.CaseJob(case, False, "", "paper", ("t2w", "adc", "hbv"), (3.0, 0.5, 0.5), (30, 300, 300), 512,
                            resampler)
        out[resampler] = picai.paper_slices(job)
    (slices, z), (fast, z_fast) = out["sitk"], out["fast"]
    assert z == z_fast == PAD_Z + 5
    for mod in slices:
        assert slices[mod].shape == (300, 300)
        np.testing.assert_array_equal(slices[mod], fast[mod])
    # T2W 64x64 @ 1 mm -> 128x128: padded by 86 in-plane; min-max over the whole resampled volume
    t2w = slices["t2w"]
    assert t2w[:86].max() == 0 and t2w[86 + 128:].max() == 0
    raw = sitk.GetArrayFromImage(picai.vo.resample_sitk(sitk.ReadImage(case.scans["t2w"]), (3.0, 0.5, 0.5)))
    expect = (raw.astype(np.float64) - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_array_equal(t2w[86:214, 86:214], expect[5])
    assert picai.vo.to_uint8_truncating([np.array([[0.999, 0.5]])]).tolist() == [[254, 127]]


def test_grey_t2w_only(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=True)
    result = prepare_picai(options(tmp_path, tmp_path / "out", channels="t2w"))
    assert Image.open(tmp_path / "out" / result.rows[0].output).mode == "L"


def test_label_sources_and_missing_label_is_a_per_case_error(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=True, human=False, ai=True)  # AI fallback only
    make_case(tmp_path, "1002", "2002", positive=False, human=False, ai=False)  # no lesion file at all
    make_case(tmp_path, "1003", "2003", positive=True)
    combined = prepare_picai(options(tmp_path, tmp_path / "c", neutral_names=False))
    assert {r.case_id: r.label for r in combined.rows} == {"1001_2001": "pos", "1003_2003": "pos"}
    ai_row = next(r for r in combined.rows if r.case_id == "1001_2001")
    assert picai.AI_LESIONS in ai_row.source and ai_row.slice == str(PAD_Z + 7)  # AI map rolled by 3 slices
    assert [f.key for f in combined.failures] == ["1002_2002"]
    assert "no lesion delineation" in combined.failures[0].error
    assert "1002_2002" in (tmp_path / "c.provenance" / "failures.csv").read_text()

    human = prepare_picai(options(tmp_path, tmp_path / "h", label_source="human"))
    assert sorted(f.key for f in human.failures) == ["1001_2001", "1002_2002"]
    assert len(human.rows) == 1


def test_marksheet_label_source(tmp_path):
    rows: list = []
    make_case(tmp_path, "1001", "2001", positive=True, marksheet_rows=rows)
    make_case(tmp_path, "1002", "2002", positive=False, marksheet_rows=rows)
    rows[1]["case_csPCa"] = "YES"  # marksheet says positive, but no lesion voxels -> per-case error
    make_case(tmp_path, "1003", "2003", positive=False)  # not in the marksheet
    write_marksheet(tmp_path, rows)
    result = prepare_picai(options(tmp_path, tmp_path / "out", label_source="marksheet"))
    assert [r.case_id for r in result.rows] == ["1001_2001"]
    errors = {f.key: f.error for f in result.failures}
    assert "no lesion voxels" in errors["1002_2002"] and "marksheet" in errors["1003_2003"]


def test_resumable_and_options_change_redoes(tmp_path):
    for i in range(3):
        make_case(tmp_path, f"10{i}", f"20{i}", positive=bool(i % 2), seed=i)
    out = tmp_path / "out"
    first = prepare_picai(options(tmp_path, out))
    assert first.processed == 3 and first.skipped == 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.name != "contact_sheet.png"}
    again = prepare_picai(options(tmp_path, out))
    assert again.processed == 0 and again.skipped == 3
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    assert [r.sha256 for r in again.rows] == [r.sha256 for r in first.rows]
    # a damaged output is redone; other items are still skipped
    victim = out / first.rows[0].output
    victim.write_bytes(b"broken")
    third = prepare_picai(options(tmp_path, out))
    assert third.processed == 1 and third.skipped == 2
    same_pixels = prepare_picai(options(tmp_path, out, resampler="sitk", workers=2))  # same pixels: skipped
    assert same_pixels.processed == 0 and same_pixels.skipped == 3
    changed = prepare_picai(options(tmp_path, out, channels="t2w"))
    assert changed.processed == 3


def test_sources_are_never_modified(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    prepare_picai(options(tmp_path, tmp_path / "out"))
    assert before == {p: p.read_bytes() for p in before}


def test_aligned_mode_uses_the_t2w_grid(tmp_path):
    make_case(tmp_path, "1001", "2001", positive=True)
    case = picai.discover_cases(tmp_path / "images", tmp_path / "labels")[0]
    job = picai.CaseJob(case, True, case.human_lesion, "aligned", ("t2w", "adc", "hbv"), (3.0, 0.5, 0.5),
                        (30, 300, 300), 512, "fast")
    vols, label = picai.aligned_volumes(job)
    assert all(v.shape == (30, 300, 300) for v in vols.values())
    assert picai.choose_slice(label, True) == PAD_Z + 4
    # ADC only covers the T2W field of view: outside it (padding) is 0 after normalisation
    assert vols["adc"][:PAD_Z].max() == 0 and vols["adc"][PAD_Z + 4].max() > 0
    image, info = picai.process_case(job)
    assert image.shape == (512, 512, 3) and info["slice"] == PAD_Z + 4


def test_balanced_patient_disjoint_splits(tmp_path):
    for i in range(8):
        make_case(tmp_path, f"1{i // 2}", f"20{i}", positive=bool(i % 2), seed=i)  # 2 studies per patient
    result = prepare_picai(options(tmp_path, tmp_path / "out", n_per_class=1, splits=("train", "val", "test"),
                                   workers=2, contact_sheet=False))
    assert not result.failures
    cls = [r for r in result.rows if r.output.startswith("classifier/")]
    assert sorted((r.split, r.label) for r in cls) == sorted(
        (s, lab) for s in ("train", "val", "test") for lab in ("neg", "pos"))
    patients = {s: {r.case_id.split("_")[0] for r in cls if r.split == s} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    emb = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "embedding").rglob("*.png"))
    assert emb == ["embedding/neg/neg_0001.png", "embedding/pos/pos_0001.png"]


def test_bad_options_and_empty_input(tmp_path):
    from medical_diffusion.errors import MedDiffError

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(MedDiffError, match="no PI-CAI cases"):
        prepare_picai(options(tmp_path, tmp_path / "out"))
    with pytest.raises(MedDiffError, match="label source"):
        prepare_picai(options(tmp_path, tmp_path / "out", label_source="guess"))


def test_cli_picai(tmp_path, capsys):
    make_case(tmp_path, "1001", "2001", positive=False)
    make_case(tmp_path, "1002", "2002", positive=False, human=False, ai=False)
    rc = cli_main(["prepare", "picai", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                   "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 3 and "1 made" in out and "failed 1002_2002" in out
    rc = cli_main(["prepare", "picai", "--images", str(tmp_path / "nope"), "--labels", str(tmp_path / "labels"),
                   "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 1 and "nope" in capsys.readouterr().err


# --- the real case -------------------------------------------------------------------------------------

def literal_paper_slice(scans: dict, gland_path: str, positive: bool, lesion_path: str | None = None) -> tuple:
    """The issue's paper-mode steps written out with SimpleITK/numpy/PIL only (independent of the library)."""
    def resample(img, is_label):
        out_sp = (0.5, 0.5, 3.0)
        size = [int(np.round(n * s / o)) for n, s, o in zip(img.GetSize(), img.GetSpacing(), out_sp)]
        return sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline,
                             img.GetOrigin(), out_sp, img.GetDirection(), 0, img.GetPixelID())

    def crop(a, size=(30, 300, 300)):
        for ax, s in enumerate(size):
            n = a.shape[ax]
            if n < s:
                d = s - n
                pad = [(0, 0)] * 3
                pad[ax] = (d // 2, d - d // 2)
                a = np.pad(a, pad)
            else:
                st = int(np.floor((n - s) / 2))
                a = np.take(a, range(st, st + s), axis=ax)
        return a

    chans = []
    for mod in ("t2w", "adc", "hbv"):
        a = sitk.GetArrayFromImage(resample(sitk.ReadImage(scans[mod]), False))
        a = (a - a.min()) / (a.max() - a.min())
        chans.append(crop(a))
    lab = crop(sitk.GetArrayFromImage(resample(sitk.ReadImage(lesion_path if positive else gland_path), True)))
    z = int(np.argmax(lab.sum(axis=(1, 2)))) if positive else int(np.median(np.unique(np.where(lab == 1)[0])))
    rgb = (np.stack([c[z] for c in chans], -1) * 255).astype(np.uint8)
    return z, np.asarray(Image.fromarray(rgb).resize((512, 512), Image.LANCZOS))


@pytest.mark.slow
def test_real_picai_case_paper_mode(testdata, tmp_path):
    root = testdata / "picai_sample"
    out = tmp_path / "out"
    result = prepare_picai(PicaiOptions(images=str(root / "images"), labels=str(root / "labels"), out=str(out)))
    assert not result.failures and len(result.rows) == 1
    row = result.rows[0]
    assert row.case_id == "10795_1000811" and row.label == "neg"  # human map all zero: csPCa-negative
    case = picai.discover_cases(root / "images", root / "labels")[0]
    z, expected = literal_paper_slice(case.scans, case.gland, False)
    assert row.slice == str(z) == "14"  # the authors' slice (the voxel-weighted median would be 15)
    got = np.asarray(Image.open(out / row.output)).astype(int)
    assert got.shape == (512, 512, 3)
    np.testing.assert_array_equal(got, expected)  # bit-identical to the literal SimpleITK computation
