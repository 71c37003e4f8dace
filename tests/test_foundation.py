"""Shared foundation: atomic writes, allowed roots, PNG output, grids, the CLI dispatcher, webui hooks."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medical_diffusion import cli
from medical_diffusion.allowed_roots import ENV_VAR, check_allowed, parse_roots
from medical_diffusion.atomic_io import atomic_path, atomic_write_text, check_writable
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.image_grid import make_grid
from medical_diffusion.png_io import list_images, load_image, save_png

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


def test_atomic_write_replaces_and_check_writable_refuses(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    with pytest.raises(MedDiffError, match="already exists"):
        check_writable(target)
    assert check_writable(target, force=True) == target


def test_allowed_roots_refuse_outside_and_dotdot(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    roots = [root.resolve()]
    assert check_allowed(root / "a" / "x.png", roots) == (root / "a" / "x.png").resolve()
    with pytest.raises(MedDiffError, match="outside"):
        check_allowed(root / ".." / "secret.txt", roots)
    with pytest.raises(MedDiffError, match="outside"):
        check_allowed("/etc/passwd", roots)
    # a symlink inside the root that points outside is refused too
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(MedDiffError, match="outside"):
        check_allowed(root / "link" / "secret.txt", roots)
    # a sibling whose name starts with the root's name is not inside it
    with pytest.raises(MedDiffError):
        check_allowed(tmp_path / "data2" / "x", roots)
    # no roots configured: everything allowed
    assert check_allowed("/etc/passwd", []) == Path("/etc/passwd")


def test_parse_roots_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, f"{tmp_path}{os.pathsep}{tmp_path / 'b'}")
    assert parse_roots(os.environ[ENV_VAR]) == [tmp_path.resolve(), (tmp_path / "b").resolve()]
    with pytest.raises(MedDiffError):
        check_allowed("/")


def test_save_png_strips_metadata_and_hashes(tmp_path):
    src = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    src.info["comment"] = "PatientName=Doe"
    sha = save_png(src, tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    assert b"tEXt" not in data and b"iTXt" not in data and b"eXIf" not in data and b"iCCP" not in data
    import hashlib

    assert sha == hashlib.sha256(data).hexdigest()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(src))


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputFileError, match="broken.png"):
        load_image(bad)
    with pytest.raises(InputFileError, match="no such file"):
        load_image(tmp_path / "missing.png")
    Image.new("L", (8, 8)).save(tmp_path / "b.png")
    Image.new("L", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "broken.png"]


def test_make_grid_layout():
    images = [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(10)]
    grid = make_grid(images, labels=[str(i) for i in range(10)], cols=5, title="t")
    assert grid.width == 5 * 36 + 4
    # first tile's colour is where we expect it, below the title band
    assert grid.getpixel((10, grid.height - 20 - 32)) != (255, 255, 255)
    with pytest.raises(ValueError):
        make_grid(images, labels=["a"])


def test_grid_titles_with_arrows_draw_with_the_old_bitmap_font(monkeypatch):
    """The webui pins Pillow 9.5, whose default font is a Latin-1 bitmap font ('→' raised there)."""
    from PIL import ImageFont

    from medical_diffusion import image_grid

    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()  # Pillow < 10.1: the bitmap one
    monkeypatch.setattr(image_grid, "_font", lambda size: bitmap)
    with pytest.raises(UnicodeEncodeError):  # what Pillow 9.5 did with the title
        ImageDraw.Draw(Image.new("RGB", (64, 16))).text((0, 0), "neg \u2192 pos", font=bitmap)
    grid = make_grid([Image.new("RGB", (32, 32))] * 2, labels=["a", "b \u26a0"], title="neg \u2192 pos")
    assert grid.getbbox() is not None


def test_cli_has_a_subcommand_per_capability(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    expected = {"embedding", "prepare", "train", "generate", "interpolate", "compose", "mask", "inpaint",
                "fid", "classify", "convert-radimagenet", "ui", "demo"}
    assert expected <= set(sub.choices), sorted(expected - set(sub.choices))
    assert cli.main([]) == 2


def test_cli_error_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise InputFileError("/data/x.pt", "truncated file")

    parser = argparse.ArgumentParser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=boom, command="embedding")
    assert cli.main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "meddiff embedding: error: /data/x.pt: truncated file"


def _load_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preload_adds_roots_flag():
    preload = _load_file(ROOT / "preload.py", "md_preload")
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    args = parser.parse_args(["--medical-diffusion-roots", "/a", "/b"])
    assert args.medical_diffusion_roots == ["/a", "/b"]


def test_install_only_adds_missing_and_honours_skip(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        args=types.SimpleNamespace(skip_install=False),
        is_installed=lambda name: name != "SimpleITK",
        run_pip=lambda cmd, desc: calls.append(cmd),
    )
    monkeypatch.setitem(sys.modules, "launch", fake)
    _load_file(ROOT / "install.py", "md_install")
    assert calls == ["install SimpleITK>=2.3"]
    assert not any(word in c for c in calls for word in ("torch", "numpy", "gradio"))
    calls.clear()
    fake.args.skip_install = True
    _load_file(ROOT / "install.py", "md_install2")
    assert calls == []
