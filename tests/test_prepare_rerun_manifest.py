"""Re-runs of ``prepare`` into the same output folder: the manifests (and the contact sheet) list what the
folder holds: earlier outputs still there unchanged keep their rows, new ones are added, nothing twice,
rows of files deleted or changed by hand go; a re-run with the same options changes nothing."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main
from medical_diffusion.file_digest import file_sha256
from medical_diffusion.datasets.contact_sheet import write_contact_sheet
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.datasets.manifest import read_manifest
from medical_diffusion.training.data_folder import training_images

ADC = ("dicom_series", "ProstateX-0000_adc")


def _outputs(manifest: Path) -> list[str]:
    return [row.output for row in read_manifest(manifest)]


def _files(out: Path) -> set[str]:
    """Every PNG under OUT's image folders, relative to OUT."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != "contact_sheet.png"}


def _sheet_of(out: Path, tmp: Path) -> np.ndarray:
    """The contact sheet of exactly the rows the manifest lists."""
    write_contact_sheet(out, read_manifest(out / "manifest.csv"), tmp / "expected_sheet.png", title="Imported images")
    return np.asarray(Image.open(tmp / "expected_sheet.png"))


NAMES = [f"embedding/adc/adc_0001_s{z:03d}.png" for z in (3, 6, 7, 8)]


@pytest.fixture
def two_choices(testdata, tmp_path, capsys):
    """The real ADC series prepared with ``--slice 6-8`` and then ``--slice 3`` into one folder; returns
    (OUT, the prepare command line without --slice, what the second run printed)."""
    out = tmp_path / "out"
    prep = ["prepare", "images", str(testdata.joinpath(*ADC)), "--out", str(out), "--label", "adc", "--quiet"]
    assert main([*prep, "--slice", "6-8"]) == 0
    capsys.readouterr()
    assert main([*prep, "--slice", "3"]) == 0
    return out, prep, capsys.readouterr().out


def test_two_slice_choices_into_one_folder_keep_every_row(two_choices, tmp_path):
    out, _prep, printed = two_choices
    folder = (out / "embedding" / "adc").resolve()
    # the CLI prints the class folder's real count, the one training on it uses
    assert f"adc: --data {shlex.quote(str(folder))}  (4 images)" in printed
    assert "1 made, 0 already done" in printed and "warning earlier runs: 3 image(s)" in printed
    assert [p.name for p in training_images(out, "adc").paths] == [Path(n).name for n in NAMES]

    shared = read_manifest(out / "manifest.csv")
    assert sorted(r.output for r in shared) == NAMES  # each once
    assert {r.output: r.slice for r in shared} == dict(zip(NAMES, ("3", "6", "7", "8")))
    for row in shared:
        assert (float(row.mm_per_px_x), float(row.mm_per_px_y)) == pytest.approx((0.5, 0.5))
        assert (row.pad_left, row.pad_top) == ("88", "0")
        assert file_sha256(out / row.output) == row.sha256
        assert row.case_id == "" and row.source == ""  # still shareable
    full = read_manifest(tmp_path / "out.provenance" / "manifest.csv")
    assert sorted(r.output for r in full) == NAMES
    assert all(r.source.endswith(f"slice {r.slice}") and r.case_id.endswith(f"#s{int(r.slice):03d}") for r in full)
    # the contact sheet shows the four
    assert np.array_equal(np.asarray(Image.open(out / "contact_sheet.png")), _sheet_of(out, tmp_path))

    # a mask in mm on an image of the earlier run still finds its spacing beside it
    target = tmp_path / "lesion.png"
    assert main(["mask", "--unit", "mm", "--image", str(out / NAMES[1]), "--circle", "128", "128", "5",
                 "--out", str(target)]) == 0
    assert json.loads(target.with_suffix(".json").read_text())["spec"]["spacing"] == pytest.approx([0.5, 0.5])
    ys, xs = np.nonzero(np.asarray(Image.open(target)) > 127)
    assert 4 * xs.std() * 0.5 == pytest.approx(10, rel=0.03)


def test_the_same_options_again_change_nothing(two_choices, tmp_path, capsys):
    out, prep, _printed = two_choices
    before = {p: p.read_bytes() for p in (out / "manifest.csv", tmp_path / "out.provenance" / "manifest.csv",
                                           out / "contact_sheet.png", *(out / n for n in NAMES))}
    assert main([*prep, "--slice", "3"]) == 0
    assert "0 made, 1 already done" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(_outputs(out / "manifest.csv")) == NAMES


def test_a_file_deleted_or_changed_by_hand_loses_its_row(two_choices, tmp_path, capsys):
    out, prep, _printed = two_choices
    (out / NAMES[2]).unlink()
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(out / NAMES[3])
    assert main([*prep, "--slice", "3"]) == 0
    assert f"({2 + 1} images)" in capsys.readouterr().out  # the changed file is still trained on
    assert sorted(_outputs(out / "manifest.csv")) == NAMES[:2]
    assert sorted(_outputs(tmp_path / "out.provenance" / "manifest.csv")) == NAMES[:2]
    assert np.array_equal(np.asarray(Image.open(out / "contact_sheet.png")), _sheet_of(out, tmp_path))


def _pngs(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((16, 16), 10 * (i + 1), np.uint8)).save(folder / f"img{i}.png")


def test_per_class_and_splits_rerun_is_exact_and_a_smaller_n_keeps_the_folder_listed(tmp_path):
    src = tmp_path / "in"
    _pngs(src / "neg", 6)
    _pngs(src / "pos", 6, start=6)
    out = tmp_path / "out"

    def run(n: int):
        return prepare_images(ImportOptions(inputs=(str(src),), out=str(out), class_from="folder", n_per_class=n,
                                            splits=("train", "val"), seed=1))

    first = run(2)
    listed = _outputs(out / "manifest.csv")
    assert len(listed) == 2 * 2 * 2 + 2 * 2  # 2 classes x 2 splits x 2, the train ones also under embedding/
    assert set(listed) == _files(out) and not first.warnings
    manifests = (out / "manifest.csv", tmp_path / "out.provenance" / "manifest.csv", out / "contact_sheet.png")
    before = [p.read_bytes() for p in manifests]
    again = run(2)  # the same options: every item skipped, nothing else changes
    assert (again.processed, again.skipped, len(again.rows), again.warnings) == (0, 8, 12, [])
    assert [p.read_bytes() for p in manifests] == before

    # exactly N per class and split made by this run; what an earlier run left in the folder stays listed
    fewer = run(1)
    listed = _outputs(out / "manifest.csv")
    assert len(listed) == len(set(listed)) and set(listed) == _files(out)
    assert len(fewer.rows) == 6 and len(fewer.kept_rows) == len(listed) - 6
    assert {r.output for r in fewer.rows}.isdisjoint(r.output for r in fewer.kept_rows)
    assert "patient-disjoint splits hold within one run only" in fewer.warnings[-1].error


def test_an_unreadable_or_escaping_earlier_manifest_is_not_trusted(tmp_path):
    _pngs(tmp_path / "a", 2)
    _pngs(tmp_path / "b", 1, start=5)
    out = tmp_path / "out"
    prepare_images(ImportOptions(inputs=(str(tmp_path / "a"),), out=str(out), label="x", neutral_names=False))
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    with open(out / "manifest.csv", "a", encoding="utf-8") as fh:  # a row pointing out of OUT
        fh.write(f"../outside.png,,x,,{file_sha256(outside)},,,,\n")
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "b"),), out=str(out), label="x",
                                          neutral_names=False))
    assert sorted(_outputs(out / "manifest.csv")) == sorted(_files(out))  # a/img0, a/img1 and b/img5; not ../
    assert len(result.kept_rows) == 2
    # a shareable manifest that is no CSV: the full one in the provenance folder still has the rows
    (out / "manifest.csv").write_bytes(b"\xff\xfe\x00garbage")
    result = prepare_images(ImportOptions(inputs=(str(tmp_path / "b"),), out=str(out), label="x",
                                          neutral_names=False))
    assert any(w.key == "manifest" and "not a readable CSV manifest" in w.error for w in result.warnings)
    assert sorted(_outputs(out / "manifest.csv")) == sorted(_files(out)) and len(_files(out)) == 3
