"""Options shared by every preparation: images per class (0 = all, N = exactly N or a clear error) and
split/class names that cannot leave the output folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main as cli_main
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.datasets.layout import check_plain_name
from medical_diffusion.errors import MedDiffError


def _pngs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16), 20 * (i + 1), np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_per_class_zero_means_all_in_the_cli(tmp_path, capsys):
    src = _pngs(tmp_path / "in", 3)
    rc = cli_main(["prepare", "images", str(src), "--out", str(tmp_path / "o"), "--per-class", "0", "--quiet"])
    assert rc == 0 and "3 made" in capsys.readouterr().out
    assert len(list((tmp_path / "o" / "embedding" / "images").glob("*.png"))) == 3


def test_per_class_more_than_available_says_how_to_fix(tmp_path, capsys):
    src = _pngs(tmp_path / "in", 3)
    rc = cli_main(["prepare", "images", str(src), "--out", str(tmp_path / "o"), "--per-class", "100", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "only 3 eligible" in err and "3 or fewer" in err and "0 for all" in err
    assert "Traceback" not in err
    with pytest.raises(MedDiffError, match="0 = all"):
        prepare_images(ImportOptions(inputs=(str(src),), out=str(tmp_path / "p"), n_per_class=-2))
    two = prepare_images(ImportOptions(inputs=(str(src),), out=str(tmp_path / "q"), n_per_class=2))
    assert len(two.rows) == 2


def test_splits_need_a_number_per_class(tmp_path, capsys):
    src = _pngs(tmp_path / "in", 3)
    rc = cli_main(["prepare", "images", str(src), "--out", str(tmp_path / "o"), "--splits", "train,test", "--quiet"])
    assert rc == 1 and "splits need a number of images per class" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../../x", "..", ".", "a/b", "a\\b", "x y", "/abs"])
def test_split_names_must_be_plain(tmp_path, capsys, bad):
    src = _pngs(tmp_path / "in", 3)
    rc = cli_main(["prepare", "images", str(src), "--out", str(tmp_path / "out"), "--per-class", "1",
                   "--splits", f"train,{bad},test", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "bad split name" in err
    assert not (tmp_path / "x").exists() and not any(p.suffix == ".png" for p in tmp_path.rglob("*") if "in" not in p.parts)


def test_plain_names():
    assert check_plain_name("train_1.a-b", "split") == "train_1.a-b"
    for bad in ("..", ".", "a/b", "a\\b", "", "é/"):
        with pytest.raises(MedDiffError, match="bad class name"):
            check_plain_name(bad, "class")
