"""Start ``meddiff ui`` on the tiny model and drive it with Playwright in Debian's Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
    port = free_port()
    # the app may only touch files under its work folder (the API tests check the refusal)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "extension"), MEDDIFF_ALLOWED_ROOTS=str(work_dir))
    log = open(work_dir / "ui.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medical_diffusion", "ui", "--model", "tiny", "--work-dir", str(work_dir),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
    )
    url = f"http://127.0.0.1:{port}/"
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
    proc.kill()
    raise RuntimeError(f"meddiff ui did not answer within {timeout}s: {(work_dir / 'ui.log').read_text()}")


def browser():
    """A Playwright Chromium browser, or skip when Playwright or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pw = sync_api.sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
