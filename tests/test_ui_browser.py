"""A real browser against ``meddiff ui --model tiny``: every tab, real clicks, screenshots.

Screenshots go to ``$MEDDIFF_SCREENSHOTS`` (default: the test's tmp folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from browser_support import (choose, fill, open_browser, prepare_pngs_with_a_bad_file, require_browser,
                             running_ui, set_number, upload_and_click_overlay, wait_for)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from medical_diffusion.embeddings import Embedding, save_embedding

    require_browser()  # skip before a server starts
    work = tmp_path_factory.mktemp("ui_work")
    shots = Path(os.environ.get("MEDDIFF_SCREENSHOTS", work / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(["prostate_neg", "prostate_pos"]):
        vectors = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed)) * 0.3
        save_embedding(Embedding(name, vectors), work / "embeddings" / f"{name}.pt")
    with running_ui(work) as url, open_browser() as br:
        page = br.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        page.wait_for_selector("#md_tabs")
        page.api_url = url.rstrip("/") + "/medical-diffusion/v1"
        yield page, work, shots


def _open_tab(page, title: str) -> None:
    page.click(f"#md_tabs button:has-text('{title}')")


def test_model_label_says_demo(ui):
    page, _, shots = ui
    assert "workflow demo" in page.inner_text("#md_model_label")


def test_prepare_generic_import_with_a_bad_file(ui):
    page, work, shots = ui
    _open_tab(page, "Prepare data")
    prepare_pngs_with_a_bad_file(page, work)
    page.screenshot(path=str(shots / "prepare.png"), full_page=True)


def test_prepare_a_one_image_contact_sheet_is_not_blown_up(ui):
    from PIL import Image

    page, work, shots = ui
    _open_tab(page, "Prepare data")
    src = work / "one_png"
    src.mkdir()
    Image.radial_gradient("L").resize((200, 300)).save(src / "single.png")
    page.click("#md_tab_prepare button:has-text('DICOM / NIfTI / PNG')")
    fill(page, "md_prep_out", str(work / "prepared_one"))
    fill(page, "md_prep_n", "0")
    fill(page, "md_prep_gen_inputs", str(src))
    page.click("#md_prep_gen_run")
    wait_for(page, "document.querySelector('#md_prep_status').innerText.includes('Made 1,')", timeout=120_000)
    page.wait_for_selector("#md_prep_sheet img", timeout=60_000)
    page.locator("#md_prep_sheet").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "prepare_one_image_sheet.png"), full_page=True)
    box = page.locator("#md_prep_sheet img").bounding_box()
    fit = page.evaluate("getComputedStyle(document.querySelector('#md_prep_sheet img')).objectFit")
    assert box["height"] <= 512 + 1 and fit == "scale-down"  # drawn at its own size, not blown up
    assert page.locator("#md_prep_sheet label:visible").count() == 0  # no label over the sheet's title


def test_train_five_steps_with_live_loss_plot(ui):
    from PIL import Image

    page, work, shots = ui
    data = work / "train_images"
    data.mkdir()
    for i in range(3):
        Image.radial_gradient("L").resize((64, 64)).rotate(30 * i).convert("RGB").save(data / f"img_{i}.png")
    _open_tab(page, "Train embedding")
    fill(page, "md_train_name", "phantom_ui")
    fill(page, "md_train_data", str(data))
    for elem_id, value in [("md_train_steps", "5"), ("md_train_resolution", "64"),
                           ("md_train_preview_every", "5"), ("md_train_preview_steps", "2")]:
        fill(page, elem_id, value)
    set_number(page, "train", "Vectors", "4")
    page.click("#md_train_start")
    page.wait_for_function("document.querySelector('#md_train_status').innerText.includes('step ')",
                           timeout=120_000)
    wait_for(page, "document.querySelector('#md_train_status').innerText.includes('finished at step 5')",
                           timeout=240_000)
    assert page.locator("#md_train_loss canvas, #md_train_loss svg").count() > 0  # the plot was drawn
    page.wait_for_selector("#md_train_preview img", timeout=60_000)
    assert (work / "embeddings" / "phantom_ui.pt").is_file()
    page.screenshot(path=str(shots / "train.png"), full_page=True)


def test_embeddings_tab_inspect_and_blend(ui):
    page, work, shots = ui
    _open_tab(page, "Embeddings")
    choose(page, "md_emb_a", "prostate_neg.pt")
    page.click("#md_emb_inspect")
    page.wait_for_function("document.querySelector('#md_emb_report textarea').value.includes('4 x 32')",
                           timeout=60_000)
    report = page.input_value("#md_emb_report textarea")
    assert "prostate_neg" in report and "< 1 MB" in report
    page.screenshot(path=str(shots / "embeddings_inspect.png"), full_page=True)

    choose(page, "md_emb_b", "prostate_pos.pt")
    page.click("#md_emb_compare")
    page.wait_for_function("document.querySelector('#md_emb_report textarea').value.includes('cosine')",
                           timeout=60_000)


def test_interpolation_grid(ui):
    page, work, shots = ui
    _open_tab(page, "Interpolate & compose")
    choose(page, "md_gen_healthy", "prostate_neg")
    choose(page, "md_gen_diseased", "prostate_pos")
    page.click("#md_gen_build_t")
    page.wait_for_function("document.querySelector('#md_gen_prompt textarea').value.includes(' AND ')",
                           timeout=60_000)
    assert page.input_value("#md_gen_prompt textarea") == "prostate_neg :0.5 AND prostate_pos :0.5"
    for label, value in [("Sampling steps", "3"), ("Width", "128"), ("Height", "128"),
                         ("Interpolation steps K", "3")]:
        set_number(page, "generate", label, value)
    page.click("#md_gen_grid")
    page.wait_for_selector("#md_gen_result img", timeout=240_000)
    assert "3 frames" in page.inner_text("#md_gen_status")
    page.screenshot(path=str(shots / "interpolation_grid.png"), full_page=True)


def test_a_generated_image_goes_to_the_inpaint_tab(ui):
    page, work, shots = ui
    _open_tab(page, "Interpolate & compose")
    fill(page, "md_gen_cell", "99")
    page.click("#md_gen_to_inpaint")  # no such cell (after the grid test) or nothing yet: a clear message
    page.wait_for_selector(".toast-body.error:has-text('choose 1..3'), "
                           ".toast-body.error:has-text('generate an image first')", timeout=30_000)
    page.click(".toast-body.error .toast-close")
    page.wait_for_selector(".toast-body.error", state="detached", timeout=10_000)
    fill(page, "md_gen_prompt", "prostate_neg")
    for label, value in [("Sampling steps", "2"), ("Width", "64"), ("Height", "64")]:
        set_number(page, "generate", label, value)
    page.click("#md_gen_generate")
    wait_for(page, "document.querySelector('#md_gen_status').innerText.includes('Generated')", timeout=120_000)
    fill(page, "md_gen_prompt", "")  # a failed generate keeps the picture shown, marked as an earlier run's
    page.click("#md_gen_generate")
    wait_for(page, "document.querySelector('#md_gen_status').innerText.includes('the prompt is empty')",
             timeout=30_000)
    assert "from an earlier run" in page.inner_text("#md_gen_status")
    assert page.locator("#md_gen_result img").is_visible()
    page.click("#md_gen_to_inpaint")
    page.wait_for_selector("#md_inp_overlay img", state="visible", timeout=60_000)
    assert page.locator("#md_tab_inpaint").is_visible()
    page.wait_for_function("document.querySelector('#md_inp_info').innerText.includes('px')", timeout=30_000)


def test_an_inpaint_error_stays_in_the_status_line(ui):
    """gradio's popup closes by itself after a few seconds; the message stays in the tab."""
    import time

    page, work, shots = ui
    _open_tab(page, "Inpaint")
    fill(page, "md_inp_prompt", "")
    page.click("#md_inp_run")  # no embedding chosen and no prompt typed
    wait_for(page, "document.querySelector('#md_inp_status').innerText.includes('choose an embedding or type a "
                   "prompt')", timeout=30_000)
    time.sleep(12)
    assert "Error: choose an embedding or type a prompt" in page.inner_text("#md_inp_status")
    assert page.locator(".toast-body").count() == 0  # the popup has gone; the status line stays
    page.screenshot(path=str(shots / "inpaint_error.png"), full_page=True)


def test_inpaint_click_to_place_keyboard_nudge_and_run(ui):
    from PIL import Image

    page, work, shots = ui
    picture = work / "phantom.png"
    Image.radial_gradient("L").resize((256, 256)).convert("RGB").save(picture)
    _open_tab(page, "Inpaint")
    upload_and_click_overlay(page, picture, 128, 384)  # (63.75, 191.75) in the 256-px source
    page.wait_for_function("Math.abs(parseFloat(document.querySelector('#md_inp_cx input').value) - 63.75) < 1",
                           timeout=30_000)
    x0 = float(page.input_value("#md_inp_cx input"))
    y0 = float(page.input_value("#md_inp_cy input"))
    assert abs(y0 - 191.75) < 1
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+ArrowDown")
    assert float(page.input_value("#md_inp_cx input")) == x0 + 1
    assert float(page.input_value("#md_inp_cy input")) == y0 + 10
    page.wait_for_function("document.querySelector('#md_inp_info').innerText.includes('px')", timeout=30_000)
    page.screenshot(path=str(shots / "inpaint_mask.png"), full_page=True)

    choose(page, "md_inp_embedding", "prostate_pos")
    for label, value in [("Sampling steps", "3"), ("Width", "128"), ("Height", "128")]:
        set_number(page, "inpaint", label, value)
    page.click("#md_inp_run")
    page.wait_for_selector("#md_inp_result img", timeout=240_000)
    status = page.inner_text("#md_inp_status")
    assert "Inpainted with prostate_pos" in status and "Saved to" in status
    saved = sorted((work / "outputs" / "inpaint").glob("*/*.png"))
    assert [p.name for p in saved] == ["00001-input.png", "00001-mask.png", "00001.png"]
    assert str(saved[2]) in status
    page.screenshot(path=str(shots / "inpaint_result.png"), full_page=True)


def test_evaluate_fid_and_classifier(ui):
    import numpy as np
    from PIL import Image
    from torchvision.models import resnet18

    from medical_diffusion.errors import MedDiffError
    from medical_diffusion.evaluation.weights import find_inception_weights

    page, work, shots = ui
    rng = np.random.default_rng(0)

    def picture(positive: bool) -> Image.Image:
        a = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        if positive:
            a[20:40, 20:40] = 230
        return Image.fromarray(a)

    for split in ("train", "val", "test"):
        for label in ("neg", "pos"):
            folder = work / "eval_real" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                picture(label == "pos").save(folder / f"{i}.png")
    for label in ("neg", "pos"):
        (work / "eval_gen" / label).mkdir(parents=True)
        for i in range(3):
            picture(label == "pos").save(work / "eval_gen" / label / f"{i}.png")
    weights = work / "resnet18-random-init.pth"
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), weights)

    _open_tab(page, "Evaluate")
    fill(page, "md_eval_real", str(work / "eval_real" / "train" / "pos"))
    fill(page, "md_eval_generated", str(work / "eval_gen" / "pos"))
    fill(page, "md_eval_reps", "20")
    page.click("#md_eval_fid_run")
    try:
        find_inception_weights(None)
    except MedDiffError:  # no weights on this machine: the error names the file expected
        page.wait_for_selector("text=pt_inception", timeout=120_000)
    else:
        wait_for(page, "document.querySelector('#md_eval_fid_result').innerText.includes('FID =')",
                  timeout=240_000)
        assert "20 bootstrap reps" in page.inner_text("#md_eval_fid_result")
    page.screenshot(path=str(shots / "evaluate_fid.png"), full_page=True)

    page.click("#md_tab_evaluate button:has-text('Classifier experiments')")
    fill(page, "md_eval_cls_real", str(work / "eval_real"))
    fill(page, "md_eval_cls_syn", str(work / "eval_gen"))
    fill(page, "md_eval_cls_out", str(work / "eval_cls"))
    fill(page, "md_eval_cls_mixes", "real=all:0\nmixed=all:6")
    fill(page, "md_eval_cls_weights", str(weights))
    for elem_id, value in [("md_eval_cls_steps", "4"), ("md_eval_cls_batch", "4"), ("md_eval_cls_size", "64"),
                           ("md_eval_cls_runs", "1")]:
        fill(page, elem_id, value)
    page.click("#md_eval_cls_run")
    wait_for(page, "document.querySelector('#md_eval_cls_roc img')", timeout=300_000)
    table = page.inner_text("#md_eval_cls_table")
    assert "real" in table and "mixed" in table
    assert (work / "eval_cls" / "report.json").is_file()
    page.screenshot(path=str(shots / "evaluate_classifier.png"), full_page=True)


def _api(page, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(page.api_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_train_status_interpolate_and_path_policy(ui):
    import base64
    import io
    import time

    from PIL import Image

    page, work, shots = ui
    data = work / "api_images"
    data.mkdir()
    for i in range(2):
        Image.radial_gradient("L").resize((64, 64)).rotate(45 * i).convert("RGB").save(data / f"{i}.png")
    config = {"name": "api_phantom", "data_dir": str(data), "n_vectors": 4, "steps": 3, "resolution": 64,
              "save_every": 0, "preview_every": 0}
    status, state = _api(page, "POST", "/train", {"config": config})
    assert status == 200, state
    deadline = time.monotonic() + 240
    while state["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
        status, state = _api(page, "GET", "/train/status?losses=true")
    assert not state["running"] and state["error"] is None, state
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert state["started_at"] <= state["finished_at"] <= time.time()
    assert (work / "embeddings" / "api_phantom.pt").is_file()

    status, body = _api(page, "POST", "/interpolate", {"healthy": "prostate_neg", "diseased": "api_phantom",
                                                       "k": 2, "steps": 2, "width": 64, "height": 64})
    assert status == 200, body
    assert body["prompts"] == ["prostate_neg :1 AND api_phantom :0", "prostate_neg :0 AND api_phantom :1"]
    assert Image.open(io.BytesIO(base64.b64decode(body["grid_png_base64"]))).width > 64

    # paths outside the allowed roots (here: the work folder) are refused, ".." tricks included
    for bad in ("/etc", str(work / ".." / "elsewhere")):
        status, body = _api(page, "POST", "/train", {"config": {**config, "data_dir": bad}})
        assert status == 400 and "outside" in body["detail"], body
    status, body = _api(page, "POST", "/fid", {"real": "/etc", "generated": str(data)})
    assert status == 400 and "outside" in body["detail"]
    status, body = _api(page, "POST", "/interpolate", {"healthy": "prostate_neg"})
    assert status == 400 and "diseased" in body["detail"]
