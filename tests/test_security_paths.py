"""Paths from the UI/API go through one resolver; resume keeps a run's identity; outputs follow the umask;
OS errors in the CLI are one line."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.errors import MedDiffError
from medical_diffusion.ui.context import UIContext


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def roots(tmp_path, monkeypatch):
    inside = tmp_path / "inside"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(inside))
    return inside, outside


def _runner(work):
    ctx = UIContext(backend_factory=lambda: None, work_dir=work, embeddings_dir=work / "emb")
    return ctx.trainer


def test_resolver_refuses_empty_outside_and_symlinks(roots):
    from medical_diffusion.allowed_roots import resolve_user_path

    inside, outside = roots
    for empty in ("", "   ", None):
        with pytest.raises(MedDiffError, match="no path given"):
            resolve_user_path(empty, label="training images folder")
    (inside / "link").symlink_to(outside)
    with pytest.raises(MedDiffError, match="outside"):
        resolve_user_path(inside / "link")
    with pytest.raises(MedDiffError, match="outside"):
        resolve_user_path("../outside", base=inside)
    with pytest.raises(MedDiffError, match="no such folder"):
        resolve_user_path(inside / "missing", must_exist=True, kind="folder")
    (inside / "f.txt").write_text("x")
    with pytest.raises(MedDiffError, match="not a folder"):
        resolve_user_path(inside / "f.txt", kind="folder")
    assert resolve_user_path("f.txt", base=inside, kind="file") == (inside / "f.txt").resolve()


@pytest.mark.parametrize("field,kind", [("template_file", "file"), ("mask", "folder")])
def test_template_and_mask_outside_the_roots_are_refused(roots, field, kind):
    inside, outside = roots
    data = _images(inside / "data")
    target = outside / "t.txt" if kind == "file" else _images(outside / "masks")
    if kind == "file":
        target.write_text("[name]\n")
    with pytest.raises(MedDiffError, match="outside"):
        _runner(inside).prepare({"name": "x", "data_dir": str(data), field: str(target)})


def test_symlinked_image_inside_an_allowed_folder_is_refused(roots):
    from medical_diffusion.training.dataset import load_training_images

    inside, outside = roots
    data = _images(inside / "data")
    _images(outside, 1)
    (data / "leak.png").symlink_to(outside / "0.png")
    with pytest.raises(MedDiffError, match="leak.png: training image leads outside"):
        load_training_images(data, 16)
    os.unlink(data / "leak.png")
    assert len(load_training_images(data, 16)) == 2


def test_symlinked_template_is_refused_by_the_loader(roots):
    from medical_diffusion.training.prompts import read_template

    inside, outside = roots
    (outside / "t.txt").write_text("[name]\n")
    (inside / "t.txt").symlink_to(outside / "t.txt")
    with pytest.raises(MedDiffError, match="outside"):
        read_template(inside / "t.txt")


def _saved_run(run_dir, data, **kw):
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.run_folder import RunFolder

    config = TrainConfig(name="blob", data_dir=str(data), n_vectors=4, steps=300, resolution=64, **kw)
    run = RunFolder(run_dir, "blob")
    run.create(config)
    for step in range(1, 301):
        run.append_loss(step, 0.5, 0.005, 0.1)
    run.close()
    return run


def test_resume_with_other_name_or_vectors_is_refused_and_keeps_the_run(roots):
    inside, _ = roots
    data = _images(inside / "data")
    run = _saved_run(inside / "run", data)
    before = run.config_path.read_text(), run.loss_csv.read_text()
    runner = _runner(inside)
    for change in ({"name": "other"}, {"n_vectors": 8}, {"resolution": 128}, {"data_dir": str(inside)}):
        with pytest.raises(MedDiffError, match="resuming keeps the run's own " + next(iter(change))):
            runner.prepare({"name": "blob", "data_dir": str(data), **change}, inside / "run", resume=True)
    assert (run.config_path.read_text(), run.loss_csv.read_text()) == before
    assert len(run.loss_csv.read_text().splitlines()) == 301


def test_resume_with_empty_data_dir_uses_the_runs_own(roots, monkeypatch):
    inside, _ = roots
    data = _images(inside / "data")
    _saved_run(inside / "run", data)
    monkeypatch.chdir(inside)
    config, folder = _runner(inside).prepare({"data_dir": "", "steps": 400}, inside / "run", resume=True)
    assert config.data_dir == str(data.resolve()) and config.steps == 400 and config.n_vectors == 4
    assert folder == (inside / "run").resolve()
    with pytest.raises(MedDiffError, match="no training run to resume"):
        _runner(inside).prepare({"name": "blob", "data_dir": ""}, inside / "empty_run", resume=True)
    with pytest.raises(MedDiffError, match="no path given"):  # a new run never trains on the working folder
        _runner(inside).prepare({"name": "blob", "data_dir": ""}, inside / "new_run")


def test_loop_refuses_a_resume_that_changes_the_run(roots, tiny_backend):
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    inside, _ = roots
    data = _images(inside / "data")
    run = _saved_run(inside / "run", data)
    with pytest.raises(MedDiffError, match="n_vectors"):
        train(TrainConfig(name="blob", data_dir=str(data), n_vectors=8, steps=301, resolution=64), tiny_backend,
              inside / "run", resume=True)
    assert len(run.loss_csv.read_text().splitlines()) == 301


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from medical_diffusion.atomic_io import atomic_path, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.png") as tmp:
            Image.new("RGB", (4, 4)).save(tmp, format="PNG")
    finally:
        os.umask(old)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_cli_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only output folder: one line naming the folder, exit code 1, no traceback. (Tests run as
    root, whom chmod does not stop, so the folder refuses the temporary file as a read-only one would.)"""
    import tempfile

    import torch

    from medical_diffusion.cli import main
    from medical_diffusion.embeddings import Embedding, save_embedding

    src = save_embedding(Embedding("blob", torch.zeros(2, 32)), tmp_path / "blob.pt")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, read_only):
            raise PermissionError(13, "Permission denied", os.path.join(dir, ".blob.safetensors.x.tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        code = main(["embedding", "convert", str(src), str(read_only / "blob.safetensors"), "--to", "safetensors",
                     "--expected-width", "32"])
    finally:
        read_only.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{read_only}: cannot write here (Permission denied)" in err
