"""Start ``meddiff ui`` on the tiny model and drive it with Playwright in Debian's Chromium.

Fixtures call :func:`require_browser` before they start a server, and hold servers and browsers in
``with`` blocks (:func:`running_ui`, :func:`open_browser`), so a skip or a failure leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MEDDIFF_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
#: flags for a closed network and root (see the machine notes)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(work_dir: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A ``meddiff ui --model tiny`` server on a free port, once it answers; stopped again if it does not."""
    port = free_port()
    # the app may only touch files under its work folder (the API tests check the refusal)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "extension"), MEDDIFF_ALLOWED_ROOTS=str(work_dir))
    with open(work_dir / "ui.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medical_diffusion", "ui", "--model", "tiny", "--work-dir", str(work_dir),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"meddiff ui exited: {(work_dir / 'ui.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return proc, url
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"meddiff ui did not answer within {timeout}s: {(work_dir / 'ui.log').read_text()}")
    except BaseException:  # also Ctrl-C while waiting: no server outlives the test run
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate ``proc`` and wait for it (killed if it does not exit within ``timeout`` seconds)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_ui(work_dir: Path, timeout: float = 120) -> Iterator[str]:
    """The URL of a ``meddiff ui`` server (:func:`start_ui`) that is stopped when the block ends."""
    proc, url = start_ui(work_dir, timeout)
    try:
        yield url
    finally:
        stop_process(proc)


def require_browser():
    """Playwright's sync API, or skip when Playwright or Chromium is missing (call it before starting servers)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    return sync_api


def browser():
    """A Playwright Chromium browser, or skip when Playwright or Chromium is missing."""
    pw = require_browser().sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except BaseException:
        pw.stop()
        raise


@contextlib.contextmanager
def open_browser():
    """:func:`browser`'s Chromium, closed (with Playwright) when the block ends."""
    pw, br = browser()
    try:
        yield br
    finally:
        try:
            br.close()
        finally:
            pw.stop()


# -- actions on the Medical Diffusion tabs (gradio 3.41 markup) ----------------------------------------------
def choose(page, dropdown_id: str, option: str) -> None:
    page.click(f"#{dropdown_id} input")
    page.click(f"ul.options li:has-text('{option}')")


def set_number(page, tab: str, label: str, value: str) -> None:
    """Type into the number box of the widget labelled ``label`` in tab ``md_tab_<tab>``."""
    box = page.locator(f"#md_tab_{tab} div.block:has(span:has-text('{label}')) input[type=number]").first
    box.fill(value)
    box.press("Enter")


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")


def wait_for(page, condition: str, timeout: float) -> None:
    """Wait for a JS condition, failing at once (with its text) if gradio shows an error instead."""
    page.wait_for_function(f"({condition}) || document.querySelector('.toast-body.error')", timeout=timeout)
    errors = page.locator(".toast-body.error")
    assert errors.count() == 0, errors.first.inner_text()


def prepare_pngs_with_a_bad_file(page, work: Path) -> None:
    """On the open Prepare data tab: import 3 PNGs and a broken file from ``work/raw_pngs`` into
    ``work/prepared``; the broken file is reported and the batch goes on."""
    from PIL import Image

    src = work / "raw_pngs"
    src.mkdir()
    for i in range(3):
        Image.radial_gradient("L").resize((300, 200)).save(src / f"scan_{i}.png")
    (src / "broken.png").write_bytes(b"not an image")
    page.click("#md_tab_prepare button:has-text('DICOM / NIfTI / PNG')")
    fill(page, "md_prep_out", str(work / "prepared"))
    fill(page, "md_prep_n", "0")
    fill(page, "md_prep_gen_inputs", str(src))
    fill(page, "md_prep_gen_label", "phantom")
    page.click("#md_prep_gen_run")
    wait_for(page, "document.querySelector('#md_prep_status').innerText.includes('Made')", timeout=120_000)
    status = page.inner_text("#md_prep_status")
    assert "Made 3" in status and "failed 1" in status
    assert "broken.png" in page.inner_text("#md_tab_prepare")
    assert len(list((work / "prepared").rglob("*.png"))) >= 3


def upload_and_click_overlay(page, picture: Path, x: float, y: float) -> None:
    """On the open Inpaint tab: upload ``picture`` and click the 512-px mask overlay at ``(x, y)``."""
    page.set_input_files("#md_inp_image input[type=file]", str(picture))
    page.wait_for_selector("#md_inp_overlay img", timeout=60_000)
    box = page.locator("#md_inp_overlay img").bounding_box()
    page.mouse.click(box["x"] + x * box["width"] / 512, box["y"] + y * box["height"] / 512)
