"""The README's "Your own scans" walkthrough, run as written on the real sample series.

Only what a CPU test cannot afford changes: the SD2 checkpoint becomes the tiny model and the sampling
commands take fewer steps and images. No file is copied by hand between the steps, and the mask is
measured on the prepared image.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = "models/512-base-ema.ckpt"
#: the only changes to each command: appended options that keep the run short on a CPU
SHORTER = {
    "train": ["--steps", "4"],
    "generate": ["--steps", "2", "--width", "64", "--height", "64"],
    "inpaint": ["--steps", "2"],
}


def walkthrough_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Your own scans"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def test_walkthrough_uses_the_paper_model_and_every_step():
    commands = walkthrough_commands()
    steps = [c[1] for c in commands]
    assert steps == ["prepare", "train", "generate", "mask", "inpaint", "fid"]
    assert all(REAL_MODEL in c for c in commands if c[1] in ("train", "generate", "inpaint"))


@pytest.mark.slow
def test_walkthrough_runs_as_written_and_the_mask_measures_10_mm(testdata, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")  # the tiny model stands in for SD2 through the standalone backend
    # the README's relative path ../shared/testdata, from a work folder beside it
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "testdata").symlink_to(testdata, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MEDDIFF_EMBEDDINGS_DIR"}
    env["PYTHONPATH"] = str(ROOT / "extension") + os.pathsep + env.get("PYTHONPATH", "")
    for command in walkthrough_commands():
        args = ["tiny" if a == REAL_MODEL else a for a in command[1:]]
        if command[1] == "generate":
            args[args.index("-n") + 1] = "2"
        args += SHORTER.get(command[1], [])
        run = subprocess.run([sys.executable, "-m", "medical_diffusion", *args], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
        if command[1] == "prepare":
            assert f"--data {work / 'data' / 'embedding' / 'adc'}" in run.stdout
        if command[1] == "train":
            assert "training on 7 images from" in run.stdout + run.stderr

    assert (work / "embeddings" / "adc_scan.pt").is_file()  # published into the home, read by generate
    assert len(list((work / "synthetic" / "adc").glob("*.png"))) == 2
    assert list((work / "inpainted").glob("inpaint_00_*.png"))

    # the 10 mm circle measures 10 mm on both axes of the prepared image (its spacing from the manifest)
    mask = np.array(Image.open(work / "masks" / "lesion.png").convert("L")) > 127
    ys, xs = np.nonzero(mask)
    rows = (work / "data" / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    row = next(r.split(",") for r in rows[1:] if r.startswith("embedding/adc/adc_0001_s009.png"))
    mm_x, mm_y = float(row[header.index("mm_per_px_x")]), float(row[header.index("mm_per_px_y")])
    # a filled disc of radius r has a standard deviation of r/2 along each axis
    width_mm = 4 * xs.std() * mm_x
    height_mm = 4 * ys.std() * mm_y
    assert width_mm == pytest.approx(10, rel=0.03) and height_mm == pytest.approx(10, rel=0.03)
