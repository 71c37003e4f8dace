"""``prepare --workers 2``: killing the parent with SIGKILL takes its worker processes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

SLOW_JOB = "import time\n\ndef slow(job):\n    time.sleep(120)\n"
SCRIPT = r"""
import sys, threading
sys.path.insert(0, {tmp!r})
import slowjob
from medical_diffusion.datasets import generic_import as gi
gi.process_item = slowjob.slow  # every item takes two minutes
from medical_diffusion.cli import main
args = ["prepare", "images", {inputs!r}, "--out", {out!r}, "--workers", "2", "--quiet"]
if {in_thread!r}:  # as in a UI handler: the pool is made outside the main thread
    t = threading.Thread(target=main, args=(args,))
    t.start()
    t.join()
else:
    main(args)
"""


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (its new parent may not reap it at once)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, in_thread):
    (tmp_path / "slowjob.py").write_text(SLOW_JOB)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(inputs / f"{i}.png")
    code = SCRIPT.format(tmp=str(tmp_path), inputs=str(inputs), out=str(tmp_path / "out"), in_thread=in_thread)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "extension")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            assert proc.poll() is None, "prepare ended early"
            workers = [k for k in _children(proc.pid) if _alive(k)]
            time.sleep(0.1)
        assert len(workers) >= 2, f"workers never started: {workers}"
        time.sleep(0.5)  # the workers are inside the slow item
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        assert not left, f"worker processes {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
