"""CheXpert (synthetic CSV with the real header) and PatchCamelyon (HDF5 layout) preparation."""

from __future__ import annotations

import csv
import gzip
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main as cli_main
from medical_diffusion.datasets import chexpert
from medical_diffusion.datasets.chexpert import ChexpertOptions, prepare_chexpert
from medical_diffusion.datasets.image_fit import crop_to_nonzero, fit_longest_edge_and_pad
from medical_diffusion.datasets.pcam import PcamOptions, prepare_pcam
from medical_diffusion.errors import MedDiffError

REAL_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
               "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,"
               "Pleural Other,Fracture,Support Devices").split(",")


def _row(path, view="Frontal", ap="AP", **labels):
    row = {k: "" for k in REAL_HEADER}
    row.update({"Path": path, "Sex": "Female", "Age": "68", "Frontal/Lateral": view, "AP/PA": ap if view == "Frontal" else ""})
    for k, v in labels.items():
        row[k.replace("_", " ")] = v
    return row


def make_chexpert(root: Path) -> Path:
    """CSV + JPEGs under root/train/...; CSV paths carry the CheXpert-v1.0-small/ prefix."""
    rows = [
        _row("p1", No_Finding="1.0"),  # 0 healthy
        _row("p2", Cardiomegaly="1.0", Edema="1.0"),  # 1 cardiomegaly (edema is not a chosen class)
        _row("p3", Cardiomegaly="1.0", Pneumonia="1.0"),  # 2 two chosen positives -> excluded
        _row("p4", view="Lateral", Cardiomegaly="1.0"),  # 3 lateral -> excluded
        _row("p5", ap="PA", Cardiomegaly="1.0"),  # 4 PA -> excluded
        _row("p6", Pleural_Effusion="1.0", Pneumonia="-1.0"),  # 5 uncertain pneumonia
        _row("p7", Pneumonia="1.0", Cardiomegaly="0.0"),  # 6 pneumonia
        _row("p8", No_Finding="1.0"),  # 7 healthy, image file missing on disk
        _row("p9", Cardiomegaly="1.0"),  # 8 cardiomegaly
        _row("p10", No_Finding="1.0"),  # 9 healthy
    ]
    for i, r in enumerate(rows):
        r["Path"] = f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg"
    csv_path = root / "train.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REAL_HEADER)
        w.writeheader()
        w.writerows(rows)
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        if i == 7:
            continue
        img = np.zeros((320, 390), np.uint8)  # non-zero content 200x300 with black borders
        img[60:260, 40:340] = rng.integers(20, 255, (200, 300), dtype=np.uint8)
        p = root / chexpert.strip_prefix(r["Path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, quality=95)
    return csv_path


def test_selection_rules_and_uncertain_policy(tmp_path):
    csv_path = make_chexpert(tmp_path)
    rows, bad = chexpert.select_rows(csv_path, chexpert.PAPER_CLASSES, "zeros")
    got = {r[0].split("/")[2]: r[1] for r in rows}
    assert got == {"patient00000": "No Finding", "patient00001": "Cardiomegaly", "patient00005": "Pleural Effusion",
                   "patient00006": "Pneumonia", "patient00007": "No Finding", "patient00008": "Cardiomegaly",
                   "patient00009": "No Finding"}
    assert not bad and rows[0][2] == "patient00000"
    ones = {r[0].split("/")[2] for r in chexpert.select_rows(csv_path, chexpert.PAPER_CLASSES, "ones")[0]}
    assert "patient00005" not in ones  # -1 as positive -> two positives
    excl = {r[0].split("/")[2] for r in chexpert.select_rows(csv_path, chexpert.PAPER_CLASSES, "exclude")[0]}
    assert "patient00005" not in excl and "patient00006" in excl
    assert chexpert.strip_prefix("CheXpert-v1.0/valid/x.jpg") == "valid/x.jpg"


def test_image_geometry_crop_fit_pad():
    img = np.zeros((100, 300), np.uint8)
    img[10:60, 20:220] = 255  # content 50 x 200
    cropped = crop_to_nonzero(img)
    assert cropped.shape == (50, 200)
    out = fit_longest_edge_and_pad(cropped, 512)
    assert out.shape == (512, 512)
    rows = np.flatnonzero(out.max(axis=1) > 0)
    assert out[:, 0].max() > 0 and out[:, 511].max() > 0  # longest edge fills the width
    assert rows[0] == 192 and rows[-1] == 319  # 128 px tall, centred: (512 - 128) // 2 = 192


def test_prepare_chexpert_with_failures_and_classes(tmp_path):
    csv_path = make_chexpert(tmp_path)
    result = prepare_chexpert(ChexpertOptions(csv=str(csv_path), root=str(tmp_path), out=str(tmp_path / "out")))
    labels = sorted(r.label for r in result.rows)
    assert labels == ["cardiomegaly", "cardiomegaly", "no_finding", "no_finding", "pleural_effusion", "pneumonia"]
    assert len(result.failures) == 1 and "patient00007" in result.failures[0].key
    assert "no such file" in result.failures[0].error
    img = Image.open(tmp_path / "out" / result.rows[0].output)
    assert img.size == (512, 512) and img.mode == "L"


def test_chexpert_two_class_splits_use_neg_pos(tmp_path):
    csv_path = make_chexpert(tmp_path)
    opts = ChexpertOptions(csv=str(csv_path), root=str(tmp_path), out=str(tmp_path / "out"),
                           classes=("No Finding", "Cardiomegaly"), n_per_class=1, splits=("train", "val"))
    result = prepare_chexpert(opts)
    assert not result.failures or all("patient00007" in f.key for f in result.failures)
    cls = sorted(r.output.rsplit("/", 1)[0] for r in result.rows if r.output.startswith("classifier"))
    assert cls == ["classifier/train/neg", "classifier/train/pos", "classifier/val/neg", "classifier/val/pos"]
    with pytest.raises(MedDiffError, match="unknown CheXpert classes"):
        prepare_chexpert(ChexpertOptions(csv=str(csv_path), root=str(tmp_path), out=str(tmp_path / "o"),
                                         classes=("Cardiomegally",)))


def test_chexpert_bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Sex\nx,F\n")
    with pytest.raises(MedDiffError, match="not a CheXpert CSV"):
        prepare_chexpert(ChexpertOptions(csv=str(bad), root=str(tmp_path), out=str(tmp_path / "o")))


def make_pcam(root: Path, n: int = 12) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 3 == 0).astype(np.uint8).reshape(n, 1, 1, 1)  # 4 positives
    xp, yp = root / "camelyonpatch_level_2_split_train_x.h5", root / "camelyonpatch_level_2_split_train_y.h5"
    with h5py.File(xp, "w") as fh:
        fh.create_dataset("x", data=x)
    with h5py.File(yp, "w") as fh:
        fh.create_dataset("y", data=y)
    return xp, yp


def test_pcam_sampling_and_upsampling(tmp_path):
    xp, yp = make_pcam(tmp_path)
    result = prepare_pcam(PcamOptions(x=str(xp), y=str(yp), out=str(tmp_path / "out"), n_per_class=3, seed=1))
    assert not result.failures
    assert sorted(r.label for r in result.rows) == ["neg"] * 3 + ["pos"] * 3
    for r in result.rows:
        idx = int(r.case_id.split("_")[1])
        assert (idx % 3 == 0) == (r.label == "pos")
    img = Image.open(tmp_path / "out" / result.rows[0].output)
    assert img.size == (512, 512) and img.mode == "RGB"
    with h5py.File(xp) as fh:
        patch = fh["x"][int(result.rows[0].case_id.split("_")[1])]
    small = np.asarray(img.resize((96, 96), Image.BOX)).astype(int)
    assert np.abs(small - patch.astype(int)).mean() < 20  # it is the right patch, upsampled
    other = prepare_pcam(PcamOptions(x=str(xp), y=str(yp), out=str(tmp_path / "o2"), n_per_class=3, seed=2))
    assert {r.case_id for r in other.rows} != {r.case_id for r in result.rows}
    with pytest.raises(MedDiffError, match="only 4"):
        prepare_pcam(PcamOptions(x=str(xp), y=str(yp), out=str(tmp_path / "o3"), n_per_class=5))


def test_pcam_gz_and_bad_files(tmp_path, capsys):
    xp, yp = make_pcam(tmp_path)
    gz = tmp_path / "x.h5.gz"
    with open(xp, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    rc = cli_main(["prepare", "pcam", "--x", str(gz), "--y", str(yp), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 1 and "gunzip it first" in capsys.readouterr().err
    notes = tmp_path / "notes.h5"
    notes.write_bytes(zlib.compress(b"not hdf5"))
    with pytest.raises(MedDiffError, match="not a readable HDF5"):
        prepare_pcam(PcamOptions(x=str(notes), y=str(yp), out=str(tmp_path / "o")))
    with pytest.raises(MedDiffError, match="no HDF5 dataset 'x'"):
        prepare_pcam(PcamOptions(x=str(yp), y=str(yp), out=str(tmp_path / "o")))


def test_cli_chexpert_and_pcam(tmp_path, capsys):
    csv_path = make_chexpert(tmp_path)
    rc = cli_main(["prepare", "chexpert", "--csv", str(csv_path), "--root", str(tmp_path), "--out",
                   str(tmp_path / "cx"), "--classes", "No Finding,Cardiomegaly", "--quiet", "--source-names"])
    out = capsys.readouterr().out
    assert rc == 3 and "5 made" in out and "patient00007" in out  # one listed image is missing on disk
    names = sorted(p.name for p in (tmp_path / "cx" / "embedding" / "cardiomegaly").iterdir())
    # patient00002 has Cardiomegaly + Pneumonia: exactly one positive among the two chosen classes
    assert names == [f"train_patient0000{i}_study1_view1_frontal_jpg.png" for i in (1, 2, 8)]
    xp, yp = make_pcam(tmp_path)
    rc = cli_main(["prepare", "pcam", "--x", str(xp), "--y", str(yp), "--out", str(tmp_path / "pc"),
                   "--per-class", "2", "--quiet"])
    assert rc == 0 and "4 made" in capsys.readouterr().out
    assert (tmp_path / "pc" / "contact_sheet.png").is_file()


def test_chexpert_paths_must_stay_inside_the_root(tmp_path):
    """A CSV row with an absolute path, a '..' escape or a symlink out of the root is a per-row failure."""
    root = tmp_path / "root"
    root.mkdir()
    csv_path = make_chexpert(root)
    secret = tmp_path / "secret" / "private.png"
    secret.parent.mkdir()
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(secret)
    link = root / "train" / "patient00099" / "study1" / "view1_frontal.jpg"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    with open(csv_path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=REAL_HEADER)
        w.writerow(_row(str(secret), No_Finding="1.0"))  # line 12: absolute
        w.writerow(_row("CheXpert-v1.0-small/../../secret/private.png", No_Finding="1.0"))  # line 13: escapes
        w.writerow(_row("CheXpert-v1.0-small/train/patient00099/study1/view1_frontal.jpg", No_Finding="1.0"))  # 14
    result = prepare_chexpert(ChexpertOptions(csv=str(csv_path), root=str(root), out=str(tmp_path / "out")))
    outside = {f.source: f.error for f in result.failures if "outside the image root" in f.error}
    assert sorted(outside) == [f"{csv_path}:12", f"{csv_path}:13", f"{csv_path}:14"]
    assert len(result.rows) == 6  # the other rows are still made
    assert all(str(secret) not in r.source for r in result.rows)


def test_pcam_refuses_non_binary_labels(tmp_path):
    xp, yp = make_pcam(tmp_path)
    with h5py.File(yp, "w") as fh:
        y = (np.arange(12) % 3 == 0).astype(np.float32).reshape(12, 1, 1, 1)
        y[5] = 0.9  # would have been truncated to 0
        fh.create_dataset("y", data=y)
    with pytest.raises(MedDiffError, match=r"_y\.h5: labels must be 0 or 1: index 5 holds 0\.9"):
        prepare_pcam(PcamOptions(x=str(xp), y=str(yp), out=str(tmp_path / "out"), n_per_class=1))
    assert not (tmp_path / "out" / "embedding").exists()
