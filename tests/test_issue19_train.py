"""Issue 19, training side: `train` on a `meddiff prepare` output, the contact sheet, the count line,
prepare's per-class `--data` lines, and publishing into the embeddings home."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.training.data_folder import resolve_data_folder, training_images


def _pngs(folder, n, value=60, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((size, size, 3), value + 10 * i, np.uint8)
        a[16:48, 16:48] = 200
        Image.fromarray(a).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture
def prepared(tmp_path):
    """What `meddiff prepare` writes: manifest, contact sheet, embedding/<class>/, classifier sets."""
    out = tmp_path / "OUT"
    _pngs(out / "embedding" / "neg", 3, 40)
    _pngs(out / "embedding" / "pos", 2, 120)
    _pngs(out / "classifier" / "val" / "neg", 1, 50)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(out / "contact_sheet.png")
    (out / "manifest.csv").write_text("output,split,label,slice,sha256\n", "utf-8")
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The embeddings home of the test (never ./embeddings of the repository)."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(folder))
    return folder


def test_prepare_output_is_refused_with_the_class_folders_to_pass(prepared):
    with pytest.raises(MedDiffError) as err:
        training_images(prepared)
    text = str(err.value)
    assert f"--data {prepared / 'embedding' / 'neg'}" in text and f"--data {prepared / 'embedding' / 'pos'}" in text
    assert "--class neg|pos" in text and "\n" not in text
    with pytest.raises(MedDiffError, match="--class neg"):  # its embedding/ folder holds classes, not images
        training_images(prepared / "embedding")


def test_class_picks_exactly_that_folder(prepared):
    chosen = training_images(prepared, "neg")
    assert chosen.folder == (prepared / "embedding" / "neg").resolve()
    assert [p.name for p in chosen.paths] == ["img_00.png", "img_01.png", "img_02.png"]
    assert chosen.describe() == f"3 images from {chosen.folder}"
    assert resolve_data_folder(prepared / "embedding", "pos") == (prepared / "embedding" / "pos").resolve()
    with pytest.raises(InputFileError, match="classes: neg, pos"):
        training_images(prepared, "sick")
    with pytest.raises(MedDiffError, match="not a `meddiff prepare` output"):
        training_images(prepared / "embedding" / "neg", "neg")
    with pytest.raises(MedDiffError, match="bad class name"):
        training_images(prepared, "../pos")


def test_plain_folder_never_trains_on_a_contact_sheet(tmp_path):
    from medical_diffusion.training.dataset import load_training_images

    folder = _pngs(tmp_path / "imgs", 2)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(folder / "contact_sheet.png")
    assert [p.name for p in training_images(folder).paths] == ["img_00.png", "img_01.png"]
    assert [im.path.name for im in load_training_images(folder, 64)] == ["img_00.png", "img_01.png"]
    only_sheet = tmp_path / "sheet"
    only_sheet.mkdir()
    (folder / "contact_sheet.png").rename(only_sheet / "contact_sheet.png")
    with pytest.raises(InputFileError) as err:
        training_images(only_sheet)
    assert str(only_sheet) in str(err.value) and "no training images" in str(err.value)


def test_cli_refuses_prepare_output_before_loading_a_model(prepared, tmp_path, capsys, monkeypatch, home):
    import medical_diffusion.training.loop as loop
    from medical_diffusion.cli import main

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("must not train"))
    assert main(["train", "--model", "tiny", "--data", str(prepared), "--name", "neg",
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"--data {prepared / 'embedding' / 'neg'}" in err and "--class" in err
    assert not (tmp_path / "run").exists()


def test_cli_class_trains_on_those_images_says_so_and_publishes(prepared, tmp_path, capsys, monkeypatch, home):
    pytest.importorskip("diffusers")
    import medical_diffusion.training.loop as loop
    from medical_diffusion.cli import main

    loaded = []
    real_load = loop.load_training_images
    monkeypatch.setattr(loop, "load_training_images", lambda folder, *a, **k: loaded.append(
        [im.path.name for im in real_load(folder, *a, **k)]) or real_load(folder, *a, **k))
    small = ["--model", "tiny", "--vectors", "1", "--steps", "1", "--resolution", "64", "--save-every", "0",
             "--preview-every", "0"]
    run = tmp_path / "runs" / "neg"
    assert main(["train", "--data", str(prepared), "--class", "neg", "--name", "neg", "--out", str(run),
                 "--val-data", "auto", "--val-every", "0", *small]) == 0
    out = capsys.readouterr().out
    neg = (prepared / "embedding" / "neg").resolve()
    assert f"training on 3 images from {neg}\n" in out
    assert out.index("training on") < out.index("done: 1/1 steps")
    assert loaded[0] == ["img_00.png", "img_01.png", "img_02.png"]  # the class's images, no contact sheet
    config = json.loads((run / "run_config.json").read_text())
    assert config["data_dir"] == str(neg)  # the run records the folder it trained on
    published = home / "neg.pt"
    assert published.read_bytes() == (run / "neg.pt").read_bytes()
    assert f"published {published}" in out and str(home) in out

    # resuming the same run replaces its own published file
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0
    assert published.read_bytes() == (run / "neg.pt").read_bytes()
    capsys.readouterr()

    # another run of the same name is refused before training: never a silent overwrite
    before = published.read_bytes()
    other = tmp_path / "other"
    args = ["train", "--data", str(prepared / "embedding" / "pos"), "--name", "neg", "--out", str(other), *small]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(published) in err and "--force-publish" in err and "--name" in err
    assert not other.exists() and published.read_bytes() == before
    assert main([*args, "--no-publish"]) == 0 and published.read_bytes() == before
    assert main([*args, "--force", "--force-publish"]) == 0
    assert published.read_bytes() == (other / "neg.pt").read_bytes() != before
    assert main(["train", "--data", str(prepared / "embedding" / "pos"), "--name", "pos", "--out",
                 str(tmp_path / "p"), "--embeddings-dir", str(tmp_path / "elsewhere"), *small]) == 0
    assert (tmp_path / "elsewhere" / "pos.pt").is_file() and not (home / "pos.pt").exists()


def test_publish_refuses_a_different_file_but_accepts_the_runs_own_bytes(tmp_path):
    from medical_diffusion.training.publish import check_publishable, publish_embedding

    run = tmp_path / "run"
    run.mkdir()
    (run / "blob.pt").write_bytes(b"trained")
    home = tmp_path / "home"
    home.mkdir()
    (home / "blob.pt").write_bytes(b"trained")  # copied by hand earlier: the same bytes
    check_publishable(home, "blob", run)
    (home / "blob.pt").write_bytes(b"somebody else's")
    with pytest.raises(MedDiffError, match="different embedding named 'blob'"):
        publish_embedding(run / "blob.pt", home, "blob", run)
    assert (home / "blob.pt").read_bytes() == b"somebody else's"
    (home / "blob.pt").unlink()
    (home / "blob.safetensors").write_bytes(b"an SDXL one")  # the other family's file of that name counts too
    with pytest.raises(MedDiffError, match="blob.safetensors"):
        check_publishable(home, "blob", run)
    target = publish_embedding(run / "blob.pt", home, "blob", run, force=True)
    assert target == home / "blob.pt" and not (home / "blob.safetensors").exists()
    (run / "blob.pt").write_bytes(b"trained more")  # later steps of the same run replace it
    assert publish_embedding(run / "blob.pt", home, "blob", run).read_bytes() == b"trained more"


def test_prepare_prints_each_class_data_path_and_a_train_line(tmp_path, capsys):
    from medical_diffusion.cli import main

    src = tmp_path / "in"
    _pngs(src / "neg", 2, size=16)
    _pngs(src / "pos", 3, size=16)
    out = tmp_path / "my out"
    assert main(["prepare", "images", str(src), "--class-from-folder", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "training folders:" not in text
    for label, n in (("neg", 2), ("pos", 3)):
        folder = shlex.quote(str((out / "embedding" / label).resolve()))
        assert f"{label}: --data {folder}  ({n} images)" in text
        assert f"meddiff train --model MODEL --data {folder} --name {label}\n" in text
    assert f"--data {shlex.quote(str(out))} " not in text


def _tab(ctx):
    gr = pytest.importorskip("gradio")
    from medical_diffusion.ui import tab_train

    with gr.Blocks() as demo:
        tab_train.build(ctx)
    values = {b.elem_id: getattr(b, "value", None) for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    start = next(f.fn for f in demo.fns if f.fn.__name__ == "start")
    return values, start


def test_tab_defaults_follow_the_model_without_loading_it(tmp_path):
    from medical_diffusion.ui.context import UIContext

    def no_model():
        raise AssertionError("building the tab must not load the model")

    tiny, _ = _tab(UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "e",
                             model_id="tiny-sdxl"))
    assert (tiny["md_train_steps"], tiny["md_train_resolution"], tiny["md_train_preview_every"]) == (200, 64, 50)
    assert tiny["md_train_val_every"] == 50
    webui, _ = _tab(UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "e",
                              model_id="webui", defaults={"steps": 40000}))
    assert (webui["md_train_steps"], webui["md_train_resolution"], webui["md_train_preview_every"]) == \
        (40000, 512, 500)
    real, _ = _tab(UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "e",
                             model_id=str(tmp_path / "sd2")))
    assert (real["md_train_steps"], real["md_train_resolution"]) == (50000, 512)  # the paper's


def test_tab_trains_a_class_of_a_prepare_output_and_publishes(prepared, tmp_path, monkeypatch, tiny_backend):
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.ui.context import UIContext

    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    home = tmp_path / "emb"
    ctx = UIContext(backend_factory=lambda: tiny_backend, work_dir=tmp_path, embeddings_dir=home, model_id="tiny")
    _, start = _tab(ctx)

    def run(data, cls, run_dir, replace=False):
        # name, data, run, vectors, init text, lr, steps, batch, accumulation, seed, resolution, save/preview
        # every, preview steps, latents, hflip, gradient checkpointing, resume, val data, val every, min-SNR,
        # EMA, log, bucketing, class, replace
        return list(start("neg", str(data), str(run_dir), 1, "", "0.01", 1, 1, 1, 0, 64, 0, 0, 2, "mean", False,
                          False, False, "", 0, 0, 0, "none", False, cls, replace))

    error = run(prepared, "", tmp_path / "r0")[-1][0].replace("\\", "")  # the status line, Markdown unescaped
    assert error.startswith("**Error:**")  # the prepare output itself: its class folders are named
    assert f"{prepared / 'embedding' / 'neg'}" in error and "--class neg|pos" in error
    message = run(prepared, "neg", tmp_path / "r1")[-1][0]
    neg = (prepared / "embedding" / "neg").resolve()
    assert f"Training on 3 images from {neg}." in message and message.startswith("finished at step 1")
    assert TrainConfig.load(tmp_path / "r1" / "run_config.json").data_dir == str(neg)
    assert (home / "neg.pt").read_bytes() == (tmp_path / "r1" / "neg.pt").read_bytes()
    assert ctx.trainer.state.data == f"3 images from {neg}"

    before = (home / "neg.pt").read_bytes()
    error = run(prepared / "embedding" / "pos", "", tmp_path / "r2")[-1][0]  # another run of that name
    assert error.startswith("**Error:**") and "Replace a different embedding" in error
    assert (home / "neg.pt").read_bytes() == before and not (tmp_path / "r2").exists()
    run(prepared / "embedding" / "pos", "", tmp_path / "r2", replace=True)
    assert (home / "neg.pt").read_bytes() == (tmp_path / "r2" / "neg.pt").read_bytes()


def test_context_and_runner_import_no_circle():
    import ast
    from pathlib import Path

    import medical_diffusion.ui.training_runner as runner

    tree = ast.parse(Path(runner.__file__).read_text("utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name.startswith("medical_diffusion.ui") for name in imported)


def test_cli_tiny_model_defaults_to_a_quick_run(tmp_path, monkeypatch, home):
    import medical_diffusion.training.loop as loop
    from medical_diffusion.cli import main

    seen = []

    def fake_run(config, run_dir, **kw):
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_training", fake_run)
    data = _pngs(tmp_path / "data", 2)
    base = ["train", "--model", "tiny", "--data", str(data), "--name", "blob", "--out", str(tmp_path / "run")]
    assert main(base) == 130
    assert (seen[0].steps, seen[0].resolution, seen[0].save_every, seen[0].preview_every) == (200, 64, 50, 50)
    assert main([*base, "--steps", "7", "--resolution", "32"]) == 130
    assert (seen[1].steps, seen[1].resolution) == (7, 32)


def test_real_scans_prepare_then_train_a_class(testdata, tmp_path, capsys, monkeypatch, home):
    """The researcher's path on real files: prepare chest X-rays and a DICOM series, then train their class."""
    pytest.importorskip("diffusers")
    from medical_diffusion.cli import main

    out = tmp_path / "OUT"
    inputs = [str(testdata / "cxr" / "00000001_000.png"), str(testdata / "cxr" / "00027426_000.png"),
              str(testdata / "dicom_series" / "ProstateX-0000_adc")]
    assert main(["prepare", "images", *inputs, "--label", "scan", "--out", str(out), "--quiet"]) == 0
    folder = (out / "embedding" / "scan").resolve()
    assert f"scan: --data {folder}  (3 images)" in capsys.readouterr().out
    assert (out / "contact_sheet.png").is_file()
    small = ["--model", "tiny", "--name", "scan", "--vectors", "1", "--steps", "1", "--resolution", "64"]
    assert main(["train", "--data", str(out), *small, "--out", str(tmp_path / "r0")]) == 1
    assert f"--data {folder}" in capsys.readouterr().err
    assert main(["train", "--data", str(out), "--class", "scan", *small, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert f"training on 3 images from {folder}\n" in printed and (home / "scan.pt").is_file()
