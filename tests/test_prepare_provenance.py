"""Case IDs and source paths stay out of the folder to share: they go to OUT.provenance (or --provenance)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main as cli_main
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.errors import MedDiffError

ID = "PATIENT4711"


def _inputs(root: Path) -> Path:
    for i in range(3):
        p = root / "in" / f"{ID}_case{i}" / "scan.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 30 * (i + 1), np.uint8)).save(p)
    (root / "in" / f"{ID}_bad.png").write_bytes(b"not a png")
    return root / "in"


def _shared_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() + str(p).encode() for p in out.rglob("*") if p.is_file())


def test_output_folder_holds_no_ids_and_resume_still_works(tmp_path, capsys):
    src = _inputs(tmp_path)
    out = tmp_path / "shared"
    rc = cli_main(["prepare", "images", str(src), "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 3  # the broken PNG
    assert f"provenance: {tmp_path / 'shared.provenance'}" in text and "keep it private" in text
    assert ID.encode() not in _shared_bytes(out) and str(src).encode() not in _shared_bytes(out)
    assert (out / "manifest.csv").read_text().splitlines()[0] == ("output,split,label,slice,sha256,"
                                                                   "mm_per_px_x,mm_per_px_y,pad_left,pad_top")
    prov = tmp_path / "shared.provenance"
    assert ID in (prov / "manifest.csv").read_text() and ID in (prov / "failures.csv").read_text()
    keys = [json.loads(line)["key"] for line in (prov / ".prepare_journal.jsonl").read_text().splitlines()]
    assert len(keys) == 3 and all(ID in k for k in keys)
    # resume: nothing redone
    again = prepare_images(ImportOptions(inputs=(str(src),), out=str(out)))
    assert again.processed == 0 and again.skipped == 3


def test_chosen_provenance_folder_and_refusal_inside_out(tmp_path, capsys):
    src = _inputs(tmp_path)
    out, prov = tmp_path / "o", tmp_path / "private" / "prov"
    rc = cli_main(["prepare", "images", str(src), "--out", str(out), "--provenance", str(prov), "--quiet"])
    assert rc == 3 and (prov / "manifest.csv").is_file() and not (tmp_path / "o.provenance").exists()
    assert prepare_images(ImportOptions(inputs=(str(src),), out=str(out), provenance=str(prov))).skipped == 3
    with pytest.raises(MedDiffError, match="must be outside the output folder"):
        prepare_images(ImportOptions(inputs=(str(src),), out=str(out), provenance=str(out / "p")))


def test_folder_made_before_the_split_is_migrated_and_resumed(tmp_path):
    src = _inputs(tmp_path)
    out = tmp_path / "old"
    prepare_images(ImportOptions(inputs=(str(src),), out=str(out)))
    # the old layout: journal and failures inside OUT
    shutil.move(str(tmp_path / "old.provenance" / ".prepare_journal.jsonl"), str(out / ".prepare_journal.jsonl"))
    shutil.copy(tmp_path / "old.provenance" / "failures.csv", out / "failures.csv")
    shutil.rmtree(tmp_path / "old.provenance")
    again = prepare_images(ImportOptions(inputs=(str(src),), out=str(out)))
    assert again.processed == 0 and again.skipped == 3
    assert not (out / ".prepare_journal.jsonl").exists() and not (out / "failures.csv").exists()
    assert ID.encode() not in _shared_bytes(out)
