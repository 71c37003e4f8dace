"""Issue 19 security review: file inputs take only this server's uploads (S1), the tabs' saved results go
through the path resolver (S2), the API's flags are strict booleans (S3), the tabs' numbers are bounded on
the server by the one limits table (S4)."""

from __future__ import annotations

import base64
import io
import os

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from upload_support import gradio_upload

from medical_diffusion.embeddings import Embedding, save_embedding
from medical_diffusion.errors import InputFileError, MedDiffError, OutOfRangeError

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

REFUSED = "not a file uploaded to this server"


def _plain(status: str) -> str:
    """A status line's Markdown without its escapes (``cfg\\_scale`` -> ``cfg_scale``)."""
    return status.replace("\\", "")


@pytest.fixture(autouse=True)
def gradio_temp(tmp_path, monkeypatch):
    """gradio's upload/temp folder of this test (``GRADIO_TEMP_DIR``, as gradio reads it)."""
    folder = tmp_path / "gradio_tmp"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def _png(path, size=(96, 64)) -> str:
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = 90
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return str(path)


def _private_embedding(tmp_path) -> str:
    """A server file no upload made: an embedding outside gradio's folders."""
    path = tmp_path / "private" / "secret.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_embedding(Embedding("secret", torch.zeros(1, 8)), path)
    return str(path)


def _embeddings_tab(tmp_path):
    from medical_diffusion.ui import tab_embeddings
    from medical_diffusion.ui.context import UIContext

    (tmp_path / "emb").mkdir(exist_ok=True)
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    loaded_text_width=lambda: None)
    with gr.Blocks() as blocks:
        parts = tab_embeddings.build(ctx)
    return blocks, parts


def _inpaint_tab(ctx):
    from medical_diffusion.ui import tab_inpaint

    with gr.Blocks():
        return tab_inpaint.build(ctx)


def _inpaint_ctx(tmp_path, backend, **kwargs):
    from medical_diffusion.ui.context import UIContext

    (tmp_path / "emb").mkdir(exist_ok=True)
    return UIContext(backend_factory=lambda: backend, work_dir=tmp_path / "work", embeddings_dir=tmp_path / "emb",
                     loaded_text_width=lambda: None, model_id="tiny", **kwargs)


# -- S1: uploads ---------------------------------------------------------------------------------------
def test_uploaded_path_takes_only_this_servers_uploads(tmp_path, monkeypatch):
    from medical_diffusion.ui.feedback import uploaded_path

    secret = _private_embedding(tmp_path)
    assert uploaded_path(None) is None
    good = uploaded_path(gradio_upload(secret))  # what the page's upload gives: a copy in gradio's folder
    assert open(good, "rb").read() == open(secret, "rb").read() and good != secret
    for value in (secret, {"name": secret}, {"is_file": True, "name": secret}):  # never a bare path or dict
        with pytest.raises(InputFileError, match=REFUSED):
            uploaded_path(value)
    # a request naming a server file: gradio copies it into its folder, the name it gave tells
    for named in ("/etc/passwd", secret, str(tmp_path / "private" / ".." / "private" / "secret.pt")):
        if not os.path.exists(named):
            continue
        copied = gr.File().preprocess({"is_file": True, "name": named, "data": None})
        with pytest.raises(InputFileError, match=REFUSED) as exc:
            uploaded_path(copied)
        assert named in str(exc.value)
    # ... also a bare name, which gradio opens in the server's working folder
    monkeypatch.chdir(tmp_path / "private")
    with pytest.raises(InputFileError, match=REFUSED):
        uploaded_path(gr.File().preprocess({"is_file": True, "name": "secret.pt", "data": None}))
    # ... and a symlink inside gradio's folder pointing out of it
    link = tmp_path / "gradio_tmp" / "link" / "secret.pt"
    link.parent.mkdir(parents=True)
    os.symlink(secret, link)
    with pytest.raises(InputFileError, match=REFUSED):
        uploaded_path(gr.File().preprocess({"is_file": True, "name": str(link), "data": None}))
    # the page's fallback when /upload fails sends the bytes with the file's bare name: accepted
    data = "data:application/octet-stream;base64," + base64.b64encode(b"client bytes").decode()
    sent = uploaded_path(gr.File().preprocess({"is_file": False, "name": "mine.pt", "data": data}))
    assert open(sent, "rb").read() == b"client bytes"


def test_embeddings_tab_refuses_a_crafted_server_path_through_the_api(tmp_path):
    """``POST /api/predict`` with ``{"is_file": true, "name": <server file>}``, as any client can send it."""
    from gradio.routes import App

    secret = _private_embedding(tmp_path)
    blocks, parts = _embeddings_tab(tmp_path)
    index = next(i for i, fn in enumerate(blocks.fns) if getattr(fn.fn, "__name__", "") == "do_inspect")
    client = TestClient(App.create_app(blocks))

    def inspect(upload):
        resp = client.post("/api/predict", json={"fn_index": index, "data": [upload, None]})
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]

    text, report, status = inspect({"is_file": True, "name": secret, "data": None})
    assert report is None and REFUSED in status and "secret.pt" in status
    text, report, status = inspect({"is_file": True, "name": "/etc/passwd", "data": None})
    assert report is None and REFUSED in status
    # the same file uploaded as the page uploads it (gradio's /upload route, then its path) is read
    with open(secret, "rb") as handle:
        (stored,) = client.post("/upload", files={"files": ("secret.pt", handle)}).json()
    text, report, status = inspect({"is_file": True, "name": stored, "orig_name": "secret.pt", "data": None})
    assert report["name"] == "secret" and status == ""


def test_inpaint_file_input_refuses_server_paths_and_loads_uploads(tmp_path):
    parts = _inpaint_tab(_inpaint_ctx(tmp_path, None))
    picture = _png(tmp_path / "private" / "scan.png")
    crafted = gr.File(file_count="multiple").preprocess([{"is_file": True, "name": picture, "data": None}])
    *kept, status = parts["load"](crafted, -1)
    assert status.startswith("**Error:**") and REFUSED in status and kept[0] == gr.update()
    *kept, status = parts["load"]([picture], -1)  # a plain string is no upload either
    assert REFUSED in status
    *values, status = parts["load"](gradio_upload(picture, file_count="multiple"), -1)
    assert status == "" and values[0].size == (96, 64)


def test_every_file_input_goes_through_uploaded_path():
    """Each module that builds a ``gr.File``/``UploadButton`` input reads it with ``uploaded_path``."""
    import ast
    import pathlib

    import medical_diffusion.ui as ui

    checked = []

    def is_file_input(node) -> bool:
        name = getattr(node.func, "attr", "") if isinstance(node, ast.Call) else ""
        read_only = any(k.arg == "interactive" and getattr(k.value, "value", None) is False for k in node.keywords) \
            if name else True
        return name in ("File", "UploadButton") and not read_only

    for path in pathlib.Path(ui.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if any(is_file_input(node) for node in ast.walk(ast.parse(text))):
            assert "uploaded_path(" in text, path.name
            checked.append(path.name)
    assert {"tab_inpaint.py", "tab_embeddings.py"} <= set(checked)


# -- S2: saved results go through the resolver ---------------------------------------------------------
def _generate_tab(tmp_path, backend, work):
    from medical_diffusion.ui import tab_generate
    from medical_diffusion.ui.context import UIContext

    calls = []

    def txt2img(prompt, seed=0, **kwargs):
        calls.append(kwargs)
        return [Image.new("RGB", (kwargs.get("width", 64), kwargs.get("height", 64)), (seed % 256, 0, 0))]

    (tmp_path / "root" / "emb").mkdir(parents=True, exist_ok=True)
    ctx = UIContext(backend_factory=lambda: backend, work_dir=work, embeddings_dir=tmp_path / "root" / "emb",
                    model_id="tiny")
    ctx.txt2img = txt2img
    with gr.Blocks():
        parts = tab_generate.build(ctx)
    return parts, calls


@pytest.fixture
def roots(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path / "root"))
    return tmp_path / "root"


def test_generate_does_not_save_outside_the_allowed_roots(tmp_path, tiny_backend, roots):
    parts, _ = _generate_tab(tmp_path, tiny_backend, tmp_path / "outside" / "work")
    picture, cells, status = parts["generate"]("a scan", 2, 2.0, 0, 64, 64, "", True, progress=None)
    assert picture is not None and cells["cells"] == [picture]  # still shown
    assert "**Not saved:**" in status and "outside the folders this extension may use" in status
    assert not (tmp_path / "outside" / "work").exists()
    # a work folder inside the roots whose outputs folder is a symlink out of them
    (roots / "work").mkdir()
    os.symlink(tmp_path / "outside", roots / "work" / "outputs")
    parts, _ = _generate_tab(tmp_path, tiny_backend, roots / "work")
    picture, _, status = parts["generate"]("a scan", 2, 2.0, 0, 64, 64, "", True, progress=None)
    assert picture is not None and "**Not saved:**" in status and "outside the folders" in status
    assert list((tmp_path / "outside").iterdir()) == []
    # inside the roots: saved
    os.unlink(roots / "work" / "outputs")
    _, _, status = parts["generate"]("a scan", 2, 2.0, 0, 64, 64, "", True, progress=None)
    assert "Saved to" in status and len(list((roots / "work" / "outputs" / "image").glob("*/00001.png"))) == 1


def test_save_inpainting_refuses_a_folder_outside_the_roots(tmp_path, roots):
    from medical_diffusion.generation.masks import MaskShape, MaskSpec
    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.ui.tab_inpaint import save_inpainting

    spec = MaskSpec((64, 64), (64, 64), [MaskShape((32, 32), (8, 8))])
    picture, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    params = {"seed": 1, "steps": 2}
    outside = UIContext(backend_factory=lambda: None, work_dir=tmp_path / "outside", embeddings_dir=roots)
    with pytest.raises(MedDiffError, match="outside the folders"):
        save_inpainting(outside, picture, picture, mask, spec, params, "x")
    assert list((tmp_path / "outside").iterdir()) == []
    inside = UIContext(backend_factory=lambda: None, work_dir=roots / "work", embeddings_dir=roots)
    done = save_inpainting(inside, picture, picture, mask, spec, params, "x")
    assert done.picture.parent.parent.parent == (roots / "work" / "outputs").resolve()
    assert done.picture.with_name("00001-mask.png").is_file()


# -- S3: strict flags in the API -----------------------------------------------------------------------
def test_api_flags_are_strict_booleans(tmp_path):
    from medical_diffusion.ui.api_routes import PREFIX, make_router
    from medical_diffusion.ui.context import UIContext

    (tmp_path / "emb").mkdir()
    save_embedding(Embedding("a", torch.zeros(1, 8)), tmp_path / "emb" / "a.pt")
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    sampled = []
    ctx.txt2img = lambda prompt, seed=0, **kw: sampled.append(prompt) or [Image.new("RGB", (8, 8))]
    app = FastAPI()
    app.include_router(make_router(ctx))
    client = TestClient(app)
    config = {"name": "x", "data_dir": str(tmp_path)}
    for flag in ("replace_published", "resume"):
        for loose in ("yes", 1, "true", 0):
            resp = client.post(PREFIX + "/train", json={"config": config, flag: loose})
            assert resp.status_code == 422 and flag in resp.json()["detail"], (flag, loose, resp.text)
    for loose in ("yes", 1, "true"):
        resp = client.post(PREFIX + "/interpolate", json={"healthy": "a", "diseased": "plain text", "k": 2,
                                                          "allow_plain_prompt": loose})
        assert resp.status_code == 422 and "allow_plain_prompt" in resp.json()["detail"], resp.text
    assert sampled == []
    resp = client.post(PREFIX + "/interpolate", json={"healthy": "a", "diseased": "plain text", "k": 2,
                                                      "allow_plain_prompt": True})
    assert resp.status_code == 200 and len(sampled) == 2


# -- S4: the tabs' numbers are bounded on the server ---------------------------------------------------
def test_check_sampling_uses_the_limits_table():
    from medical_diffusion import limits

    assert limits.check_sampling(steps=20.0, cfg_scale=2, width=64, height=128, seed=-1, negative_prompt="n") == \
        {"steps": 20, "cfg_scale": 2.0, "width": 64, "height": 128, "seed": -1, "negative_prompt": "n"}
    for key, (low, high, _) in limits.SAMPLING_BOUNDS.items():
        with pytest.raises(OutOfRangeError, match=f"{key} must be between {low} and {high}"):
            limits.check_sampling(**{key: high * 2 + 8})
    assert limits.SAMPLING_BOUNDS["steps"][1] == limits.MAX_SAMPLER_STEPS  # the API's bounds, one table
    assert limits.SAMPLING_BOUNDS["width"][:2] == (limits.MIN_IMAGE_SIZE, limits.MAX_IMAGE_SIZE)
    for bad, message in [({"steps": float("inf")}, "between"), ({"cfg_scale": float("nan")}, "between"),
                         ({"steps": "20"}, "must be a number"), ({"steps": 2.5}, "whole number"),
                         ({"width": 100}, "multiple of 8"), ({"steps": True}, "must be a number")]:
        with pytest.raises(MedDiffError, match=message):
            limits.check_sampling(**bad)


@pytest.mark.parametrize("values, message", [
    ((10**9, 2.0, 0, 64, 64), "steps must be between 1 and 500"),
    ((2, 2.0, 0, 10**6, 64), "width must be between 64 and 2048"),
    ((2, 2.0, 0, 64, 80_000), "height must be between 64 and 2048"),
    ((2, 1e9, 0, 64, 64), "cfg_scale must be between"),
    ((2, 2.0, 10**30, 64, 64), "seed must be between"),
])
def test_generate_tab_bounds_numbers_before_sampling(tmp_path, tiny_backend, values, message):
    parts, calls = _generate_tab(tmp_path, tiny_backend, tmp_path / "work")
    picture, _, status = parts["generate"]("a scan", *values, "", True, progress=None)
    assert status.startswith("**Error:**") and message in _plain(status)
    picture, _, status = parts["grid"]("a", "b", 3, *values, "", True, progress=None)
    assert status.startswith("**Error:**") and message in _plain(status)
    assert calls == []


def test_grid_bounds_k_and_render_prompts_bounds_every_caller(tmp_path, tiny_backend):
    from medical_diffusion.ui.rendering import render_prompts

    parts, calls = _generate_tab(tmp_path, tiny_backend, tmp_path / "work")
    _, _, status = parts["grid"]("a", "b", 10**6, 2, 2.0, 0, 64, 64, "", True, progress=None)
    assert "interpolation steps K must be between 2 and 32" in status and calls == []
    ctx = _inpaint_ctx(tmp_path, tiny_backend)
    ctx.txt2img = lambda *a, **k: calls.append(k) or [Image.new("RGB", (8, 8))]
    with pytest.raises(OutOfRangeError, match="width"):
        render_prompts(ctx, [("x", None)], seed=0, width=1 << 20, height=64, steps=2)
    with pytest.raises(OutOfRangeError, match="cfg_scale"):  # a composition stage's own CFG
        render_prompts(ctx, [("x", 2.0), ("y", 1e6)], seed=0, width=64, height=64, steps=2)
    assert calls == []


@pytest.mark.parametrize("index, value, message", [
    (2, 10**9, "steps must be between"), (8, 7.5, "denoising_strength must be between 0.0 and 1.0"),
    (12, 10**9, "padding must be between 0 and"), (10, 10**6, "mask_blur must be between 0 and"),
    (5, 10**6, "width must be between"),
])
def test_inpaint_tab_bounds_numbers_before_sampling(tmp_path, tiny_backend, index, value, message):
    painted = []
    ctx = _inpaint_ctx(tmp_path, tiny_backend,
                       inpaint=lambda img, mask, prompt, **kw: painted.append(kw) or img)
    parts = _inpaint_tab(ctx)
    # embedding, prompt, steps, cfg, seed, width, height, negative, strength, fill, blur, only masked, padding
    values = ["", "lesion", 2, 2.0, 7, 64, 64, "", 0.75, "original", 2, True, 8]
    values[index] = value
    geo = ["px", 0, 0, 48, 32, 8, 8, 0, 0, False]
    picture = Image.open(io.BytesIO(open(_png(tmp_path / "p.png"), "rb").read()))
    result, status = parts["inpaint"](picture, {"size": [96, 64]}, [], *geo, *values, progress=None)
    assert result is None and status.startswith("**Error:**") and message in _plain(status)
    assert painted == []
