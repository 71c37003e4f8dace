"""The browser tests' helpers leave no ``meddiff ui`` server running: not on a skip, not on a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import browser_support

ROOT = Path(__file__).resolve().parents[1]


def _processes_mentioning(text: str) -> list[int]:
    """Ids of this machine's processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="needs /proc")
def test_browser_tests_without_chromium_skip_before_starting_a_server(tmp_path):
    pytest.importorskip("playwright")  # without it the browser tests skip for that reason instead
    base = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "extension"), "MEDDIFF_CHROMIUM": str(tmp_path / "no-chromium")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}",
           "tests/test_ui_browser.py::test_model_label_says_demo"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout + done.stderr
        assert "Chromium not found" in done.stdout
        assert not list(base.rglob("ui.log")), "a meddiff ui server was started for a skipped test"
        assert _processes_mentioning(str(base)) == [], "a meddiff ui server outlived the test run"
    finally:
        for pid in _processes_mentioning(str(base)):  # what the old fixtures left behind
            os.kill(pid, signal.SIGKILL)


def test_running_ui_stops_the_server_when_the_block_fails(tmp_path, monkeypatch):
    started = []

    def fake_start(work_dir, timeout=120):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(proc)
        return proc, "http://127.0.0.1:1/"

    monkeypatch.setattr(browser_support, "start_ui", fake_start)
    with pytest.raises(RuntimeError, match="a test failed"):
        with browser_support.running_ui(tmp_path) as url:
            assert url.startswith("http://") and started[0].poll() is None
            raise RuntimeError("a test failed")
    assert started[0].poll() is not None


def test_start_ui_stops_a_server_that_never_answers(tmp_path, monkeypatch):
    seen = []
    real_popen = subprocess.Popen

    def slow_server(cmd, **kw):  # a process that runs but serves nothing
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=kw.get("stdout"))
        seen.append(proc)
        return proc

    monkeypatch.setattr(browser_support.subprocess, "Popen", slow_server)
    with pytest.raises(RuntimeError, match="did not answer within"):
        browser_support.start_ui(tmp_path, timeout=1)
    assert seen[0].poll() is not None
