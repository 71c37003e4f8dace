"""Issue 19 in the Inpaint, Prepare, Train and Embeddings tabs: errors stay in the tab's status line
(item 3), Inpaint has a Stop button and stops within a sampler step (item 8), inpaintings are saved with
their parameters (item 9), the Prepare tab's contact sheet is shown at its size without a label (item 13)."""

from __future__ import annotations

import contextlib
import json

import gradio as gr
import numpy as np
from PIL import Image
from upload_support import gradio_upload

from medical_diffusion.errors import Cancelled
from ui_support import count_unet_calls, ui_context


def _inpaint_tab(ctx):
    from medical_diffusion.ui import tab_inpaint

    with gr.Blocks() as blocks:
        parts = tab_inpaint.build(ctx)
    return blocks, parts


def _picture(size=(96, 64)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = 90
    return Image.fromarray(a)


#: px geometry: unit, spacing x/y, centre x/y, radii x/y, angle, feather, invert
GEO = ["px", 0, 0, 48, 32, 8, 8, 0, 0, False]


def _lesion(tmp_path, backend):
    """An embedding ``lesion`` in the context's embeddings folder."""
    import torch

    from medical_diffusion.embeddings import Embedding, save_embedding

    save_embedding(Embedding("lesion", torch.zeros(2, backend.text_width)), tmp_path / "emb" / "lesion.pt")


def _inpaint_values(embedding="", prompt="lesion", steps=3, seed=7, negative="", width=64, height=64,
                    strength=0.75):
    # embedding, prompt, steps, cfg, seed, width, height, negative, strength, fill, blur, only masked, padding
    return [embedding, prompt, steps, 2.0, seed, width, height, negative, strength, "original", 2, True, 8]


def _by_id(blocks):
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}


# -- item 9: an inpainting made in the tab is saved with its parameters -------------------------------------
def test_an_inpainting_is_saved_with_its_parameters_input_and_mask(tmp_path, tiny_backend):
    import hashlib

    _lesion(tmp_path, tiny_backend)
    _, parts = _inpaint_tab(ui_context(tmp_path, backend_factory=lambda: tiny_backend))
    picture = _picture()
    src = {"size": list(picture.size)}
    result, status = parts["inpaint"](picture, src, [], *GEO, *_inpaint_values("lesion", "lesion", negative="noise"),
                                      progress=None)
    assert isinstance(result, Image.Image) and "Inpainted with lesion at seed 7" in status
    saved = sorted((tmp_path / "work" / "outputs" / "inpaint").glob("*/*"))
    assert [p.name for p in saved] == ["00001-input.png", "00001-mask.png", "00001.json", "00001.png"]
    folder = saved[0].parent
    assert f"Saved to {folder / '00001.png'}".replace("_", "\\_") in status
    with Image.open(folder / "00001.png") as im:
        text = im.text["parameters"]
        assert im.size == result.size
    assert text.splitlines() == ["lesion", "Negative prompt: noise",
                                 "Steps: 3, Sampler: Euler a, CFG scale: 2.0, Seed: 7, Size: 64x64, Model: tiny, "
                                 "Denoising strength: 0.75, TI hashes: \"lesion: "
                                 + hashlib.sha256((tmp_path / "emb" / "lesion.pt").read_bytes()).hexdigest()[:10]
                                 + '"']
    record = json.loads((folder / "00001.json").read_text())
    assert record["kind"] == "inpaint" and record["prompt"] == "lesion"
    params = record["params"]
    assert (params["seed"], params["steps"], params["cfg_scale"], params["denoising_strength"]) == (7, 3, 2.0, 0.75)
    assert params["embedding"] == "lesion" and params["fill"] == "original" and params["mask_blur"] == 2
    spec = params["mask_spec"]
    assert spec["shapes"] == [{"center": [48.0, 32.0], "radii": [8.0, 8.0], "angle": 0.0}]
    assert spec["unit"] == "px" and spec["source_size"] == [96, 64] and spec["target_size"] == [512, 512]
    assert set(record["embeddings"]) == {"lesion"}
    with Image.open(folder / "00001-mask.png") as im:
        mask = np.asarray(im)
    assert record["mask"] == {"file": "00001-mask.png",
                              "sha256": hashlib.sha256((folder / "00001-mask.png").read_bytes()).hexdigest()}
    assert record["input"]["file"] == "00001-input.png"
    ys, xs = np.nonzero(mask > 127)  # the disc of radius 8 source px at (48, 32), on the 512-px grid
    scale = 512 / 96
    assert abs(xs.mean() - 48 * scale) < 3 and abs(ys.mean() - (32 * scale + (512 - 64 * scale) / 2)) < 3
    parts["inpaint"](picture, src, [], *GEO, *_inpaint_values(), progress=None)
    assert (folder / "00002.png").is_file()


def test_the_webuis_inpainting_gets_the_stop_hook_and_its_result_is_saved(tmp_path, tiny_backend):
    """Inside the webui the tab calls its img2img (``ctx.inpaint``) with ``should_stop``/``progress``, and
    saves the picture with the seed really used (-1 resolved first) and the mask on the fitted grid."""
    calls = []

    def host_inpaint(image, mask, prompt, *, should_stop, progress, **settings):
        calls.append(dict(settings, image=image.size, mask=mask.size, prompt=prompt, stop=should_stop()))
        progress(1, 3)
        return Image.new("RGB", image.size, "white")

    seen = []

    def progress(fraction, desc=""):
        seen.append((fraction, desc))

    _lesion(tmp_path, tiny_backend)
    _, parts = _inpaint_tab(ui_context(tmp_path, backend_factory=lambda: tiny_backend, inpaint=host_inpaint))
    picture = _picture()
    result, status = parts["inpaint"](picture, {"size": [96, 64]}, [], *GEO, *_inpaint_values(seed=-1),
                                      progress=progress)
    (call,) = calls
    assert call["image"] == call["mask"] == (512, 512) and call["stop"] is False and call["seed"] >= 0
    assert seen == [(1 / 3, "1/3 steps")]
    record = json.loads(next((tmp_path / "work" / "outputs" / "inpaint").glob("*/00001.json")).read_text())
    assert record["params"]["seed"] == call["seed"] and f"at seed {call['seed']}" in status
    assert record["params"]["mask_spec"]["target_size"] == [512, 512]


# -- item 8: Stop ---------------------------------------------------------------------------------------------
def test_stop_ends_an_inpainting_within_one_sampler_step(tmp_path, tiny_backend, monkeypatch):
    calls = count_unet_calls(monkeypatch)
    _lesion(tmp_path, tiny_backend)
    _, parts = _inpaint_tab(ui_context(tmp_path, backend_factory=lambda: tiny_backend))

    def progress(fraction, desc=""):  # the user presses Stop while the first step is shown
        parts["stop"].stop()

    result, status = parts["inpaint"](_picture(), {"size": [96, 64]}, [], *GEO,
                                      *_inpaint_values(steps=20, strength=1.0), progress=progress)
    assert len(calls) == 1
    assert result is None and status.startswith("**Stopped:**")
    assert not (tmp_path / "work" / "outputs").exists()


def test_the_hosts_interrupt_stops_an_inpainting(tmp_path, tiny_backend):
    """``ctx.job_session`` (the webui's Interrupt) is asked too."""
    sessions = []

    @contextlib.contextmanager
    def job_session(job):
        sessions.append(job)
        yield lambda: True  # the webui's Interrupt was pressed

    def host_inpaint(image, mask, prompt, *, should_stop, progress, **settings):
        if should_stop():
            raise Cancelled("interrupted at step 1")
        raise AssertionError("not stopped")

    _lesion(tmp_path, tiny_backend)
    _, parts = _inpaint_tab(ui_context(tmp_path, backend_factory=lambda: tiny_backend, inpaint=host_inpaint,
                                 job_session=job_session))
    result, status = parts["inpaint"](_picture(), {"size": [96, 64]}, [], *GEO, *_inpaint_values(), progress=None)
    assert sessions == ["inpaint"] and result is None and status == "**Stopped:** interrupted at step 1"


def test_the_inpaint_tab_has_a_stop_button_that_cancels_the_run(tmp_path):
    blocks, _ = _inpaint_tab(ui_context(tmp_path))
    ids = _by_id(blocks)
    run = next(i for i, d in enumerate(blocks.dependencies) if ids["md_inp_run"]._id in d["targets"])
    stop = [d for d in blocks.dependencies if ids["md_inp_stop"]._id in d["targets"]]
    assert any(d["cancels"] == [run] for d in stop)
    assert any(d["outputs"] == [ids["md_inp_status"]._id] and d["queue"] is False for d in stop)


# -- item 3: errors in the status lines ----------------------------------------------------------------------
def test_a_failed_inpainting_says_why_in_the_status_line_and_clears_the_result(tmp_path, caplog):
    import logging

    _, parts = _inpaint_tab(ui_context(tmp_path))
    with caplog.at_level(logging.INFO):
        result, status = parts["inpaint"](None, None, [], *GEO, *_inpaint_values(), progress=None)
    assert result is None and status == "**Error:** load or upload an image first"
    assert [r.exc_info for r in caplog.records if "load or upload" in r.getMessage()] == [None]
    result, status = parts["inpaint"](_picture(), {"size": [96, 64]}, [], *GEO, *_inpaint_values("", " "),
                                      progress=None)
    assert status == "**Error:** choose an embedding or type a prompt"


def test_mask_errors_stay_beside_the_overlay_and_keep_the_picture(tmp_path):
    blocks, parts = _inpaint_tab(ui_context(tmp_path))
    *kept, status = parts["load"](None, -1)
    assert kept == [gr.update()] * 10
    assert status.startswith("**Error:** choose a DICOM or volume file")
    assert "from before" in status
    bad = tmp_path / "notes.txt"
    bad.write_text("not a scan")
    *kept, status = parts["load"](gradio_upload(bad, file_count="multiple"), -1)
    assert status.startswith("**Error:**") and "notes.txt" in status and kept[0] == gr.update()
    overlay, status = parts["on_geometry"](_picture(), {"size": [96, 64]}, [], "mm", 0, 0, 5, 5, 2, 2, 0, 0, False)
    assert overlay == gr.update() and status.startswith("**Error:**") and "spacing" in status
    shapes, status = parts["add"](None, [], *GEO)
    assert shapes == gr.update() and status.startswith("**Error:** load or upload an image first")
    ids = _by_id(blocks)
    assert "md-status" in ids["md_inp_info"].elem_classes and "md-status" in ids["md_inp_status"].elem_classes


def test_load_and_add_clear_the_mask_status_when_they_work(tmp_path):
    _, parts = _inpaint_tab(ui_context(tmp_path))
    src = {"size": [96, 64]}
    shapes, status = parts["add"](src, [], *GEO)
    assert status == "" and shapes == [{"center": [48.0, 32.0], "radii": [8.0, 8.0], "angle": 0.0}]
    _picture().save(tmp_path / "p.png")
    *values, status = parts["load"](gradio_upload(tmp_path / "p.png", file_count="multiple"), -1)
    assert status == "" and values[0].size == (96, 64) and values[1] == src


def _prepare_tab(tmp_path):
    from medical_diffusion.ui import tab_prepare

    with gr.Blocks() as blocks:
        parts = tab_prepare.build(ui_context(tmp_path))
    return blocks, parts


def test_a_failed_prepare_run_says_why_and_clears_the_old_table_and_sheet(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    _, parts = _prepare_tab(tmp_path)
    shared = [str(tmp_path / "out"), 0, False, 0, 1]
    status, failures, sheet = parts["generic"]("", "x", "auto", "middle", "", *shared, progress=None)
    assert (status, failures, sheet) == ("**Error:** give at least one file or folder", None, None)
    status, failures, sheet = parts["generic"]("/etc", "x", "auto", "middle", "", *shared, progress=None)
    assert status.startswith("**Error:**") and "outside" in status and failures is None


def test_the_contact_sheet_is_shown_at_its_size_without_a_label_over_its_title(tmp_path):
    """A one-image sheet was blown up to the page's width and its title hidden under the label."""
    blocks, _ = _prepare_tab(tmp_path)
    ids = _by_id(blocks)
    sheet = ids["md_prep_sheet"]
    assert sheet.show_label is False and sheet.height and sheet.height <= 512
    assert "md-natural-size" in sheet.elem_classes  # style.css: no larger than the picture itself
    from medical_diffusion.ui.app import STYLE_CSS

    css = STYLE_CSS.read_text()
    assert "object-fit: scale-down" in css[css.index(".md-natural-size img"):]
    assert "md-status" in ids["md_prep_status"].elem_classes


def test_a_training_run_that_cannot_start_says_why_in_the_status_line(tmp_path):
    from medical_diffusion.ui import tab_train

    with gr.Blocks() as blocks:
        parts = tab_train.build(ui_context(tmp_path))
    values = ["case", "", "", 4, "*", "0.005", 5, 1, 1, 0, 64, 0, 0, 2, "mean", False, False, False,
              "", 0, 0, 0, "none"]
    *updates, (status, plot, preview) = list(parts["start"](*values))
    assert status == "**Error:** give the training images folder"
    assert plot == gr.update() and preview == gr.update()  # the plot shown is this attempt's (emptied)
    assert updates and updates[0][1]["loss"].isna().all() and updates[0][2] is None
    assert "md-status" in _by_id(blocks)["md_train_status"].elem_classes


def test_embeddings_tab_errors_go_to_its_status_line(tmp_path):
    from medical_diffusion.ui import tab_embeddings

    (tmp_path / "emb").mkdir()
    with gr.Blocks() as blocks:
        parts = tab_embeddings.build(ui_context(tmp_path))
    text, report, status = parts["inspect"](None, None)
    assert text is None and report is None
    assert status == "**Error:** embedding A: choose an embedding from the list or upload a file"
    *outputs, status = parts["blend"](None, "missing.pt", None, None, 0.5, "linear", "mix")
    assert status.startswith("**Error:**") and "missing.pt" in status
    assert "md-status" in _by_id(blocks)["md_emb_status"].elem_classes
