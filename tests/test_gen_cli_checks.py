"""The CLI checks paths and embedding names before it loads a model (which takes 12-25 s on SD2)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medical_diffusion.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load (or a training run, which loads one) fails the test."""
    from medical_diffusion.backend import diffusers_backend, tiny
    from medical_diffusion.generation import loading
    from medical_diffusion.training import loop

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", fail)
    monkeypatch.setattr(diffusers_backend, "load_backend", fail)
    monkeypatch.setattr(tiny, "build_tiny_backend", fail)
    monkeypatch.setattr(loop, "run_training", fail)


@pytest.fixture
def emb_dir(tmp_path):
    from medical_diffusion.embeddings import Embedding, save_embedding

    for name in ("healthy", "sick"):
        save_embedding(Embedding(name, torch.zeros(2, 32) + 0.1), tmp_path / "emb" / f"{name}.pt")
    return tmp_path / "emb"


def _error(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "interpolate", "compose"])
def test_sampling_commands_check_folders_first(tmp_path, capsys, no_model_load, emb_dir, command):
    tail = {"generate": ["--prompt", "neg=healthy", "-n", "1"],
            "interpolate": ["--healthy", "healthy", "--diseased", "sick"],
            "compose": ["--base", "healthy", "--add", "sick"]}[command]
    base = [command, *tail, "--out", str(tmp_path / "out")]
    assert main([*base, "--model", "tiny", "--embeddings-dir", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}: not a folder" in _error(capsys)
    assert main([*base, "--model", str(tmp_path / "no_model"), "--embeddings-dir", str(emb_dir)]) == 1
    assert f"{tmp_path / 'no_model'}: model not found" in _error(capsys)
    assert main([*base, "--model", "tiny", "--embedding", str(tmp_path / "gone.pt")]) == 1
    assert f"{tmp_path / 'gone.pt'}: no such embedding file" in _error(capsys)
    (tmp_path / "file").write_text("x")
    out_is_file = [command, *tail, "--out", str(tmp_path / "file"), "--model", "tiny"]
    assert main(out_is_file) == 1
    assert f"{tmp_path / 'file'}: not a folder" in _error(capsys)


def test_inpaint_checks_first(tmp_path, capsys, no_model_load):
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    args = ["inpaint", "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
            "--prompt", "x", "--out", str(tmp_path / "out")]
    assert main([*args, "--model", "tiny", "--embeddings-dir", str(tmp_path / "nope")]) == 1
    assert "not a folder" in _error(capsys)


def test_train_checks_data_and_model_first(tmp_path, capsys, no_model_load):
    assert main(["train", "--model", "tiny", "--data", str(tmp_path / "nope"), "--name", "x"]) == 1
    assert f"{tmp_path / 'nope'}: not a folder" in _error(capsys)
    (tmp_path / "data").mkdir()
    assert main(["train", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "data"),
                 "--name", "x"]) == 1
    assert "model not found" in _error(capsys)


def test_interpolate_with_unknown_names_fails_naming_them_and_where(tmp_path, capsys, no_model_load, emb_dir,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDDIFF_EMBEDDINGS_DIR", raising=False)
    args = ["interpolate", "--model", "tiny", "--embeddings-dir", str(emb_dir), "--out", str(tmp_path / "o")]
    assert main([*args, "--healthy", "healthy", "--diseased", "sickk"]) == 1
    err = _error(capsys)
    assert "unknown embedding name(s) sickk" in err and f"--embeddings-dir {emb_dir}" in err
    assert "found: healthy, sick" in err
    assert main(["interpolate", "--model", "tiny", "--healthy", "a", "--diseased", "b",
                 "--out", str(tmp_path / "o")]) == 1
    err = _error(capsys)
    assert "unknown embedding name(s) a, b" in err and f"the embeddings home {tmp_path / 'embeddings'}" in err
    assert "which does not exist" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, option, value, name", [
    ("generate", "--width", "100000", "width"),
    ("interpolate", "--steps", "1000000", "steps"),
    ("compose", "--cfg", "nan", "cfg_scale"),
    ("inpaint", "--padding", "99999", "padding"),
])
def test_sampling_numbers_have_the_tabs_and_apis_bounds_in_the_cli(tmp_path, capsys, command, option, value, name):
    """Issue 19 review: the CLI had no bounds on sampling numbers (a --width 100000 allocates before failing)."""
    from medical_diffusion.cli import main

    required = {"generate": ["--prompt", "a=b", "-n", "1"], "interpolate": ["--healthy", "a", "--diseased", "b"],
                "compose": ["--base", "a", "--add", "b"],
                "inpaint": ["--image", "x.png", "--mask", "m.png", "--prompt", "a"]}[command]
    code = main([command, "--model", "tiny", "--out", str(tmp_path / "o"), *required, option, value])
    assert code == 1
    assert name in capsys.readouterr().err
