"""Run an existing AUTOMATIC1111 webui install with this extension, for tests and benchmarks.

Nothing here installs or builds the webui: point it at a v1.10 checkout (with its ``repositories/``)
and a Python that has the webui's requirements. Everything a run writes goes to a ``--data-dir``
of the caller's choosing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUTH = ("tester", "secret")
EXTENSION_NAME = "sd-webui-medical-diffusion"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(webui_dir: Path, python: str, out: Path) -> Path:
    """The tiny random-weight SD2-v checkpoint (+ its yaml) made by the webui's own ldm code."""
    subprocess.run([python, str(Path(__file__).with_name("make_checkpoint.py")), str(webui_dir), str(out)],
                   check=True, capture_output=True)
    return out


class Webui:
    """A running webui: its URL, data folder and API helpers."""

    def __init__(self, url: str, data: Path, log: Path, pid: int | None = None):
        self.url, self.data, self.log, self.pid = url, data, log, pid

    def api(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()
        request = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                         method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def txt2img(self, prompt: str, seed: int, **extra) -> tuple:
        """The webui's own txt2img (its API): (RGB array, infotext)."""
        import numpy as np
        from PIL import Image

        body = dict(prompt=prompt, seed=seed, steps=3, cfg_scale=2.0, width=64, height=64,
                    sampler_name="Euler a", **extra)
        status, result = self.api("POST", "/sdapi/v1/txt2img", body)
        assert status == 200, result
        image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB")
        return np.asarray(image), json.loads(result["info"])["infotexts"][0]

    def train(self, name: str, run_dir: Path, steps: int, data_dir: Path, replace_published: bool = False,
              expect: int = 200) -> dict:
        config = {"name": name, "data_dir": str(data_dir), "n_vectors": 4, "steps": steps, "resolution": 64,
                  "save_every": 0, "preview_every": 0}
        body = {"config": config, "run_dir": str(run_dir), "replace_published": replace_published}
        status, state = self.api("POST", "/medical-diffusion/v1/train", body)
        assert status == expect, state
        if expect != 200:
            return state
        deadline = time.monotonic() + 300
        while state["running"] and time.monotonic() < deadline:
            time.sleep(0.5)
            status, state = self.api("GET", "/medical-diffusion/v1/train/status")
        assert not state["running"] and state["error"] is None, state
        return state


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the webui exited:\n{content[-4000:]}")
        time.sleep(1)
    raise RuntimeError(f"no {text!r} in the webui log within {timeout}s:\n{log.read_text()[-4000:]}")


def run_extension_installer(webui_dir: Path, python: str, extension_dir: Path) -> subprocess.CompletedProcess:
    """The extension's ``install.py`` run by the webui's own launcher code (as at a normal start)."""
    code = f"from modules import launch_utils; launch_utils.run_extension_installer({str(extension_dir)!r})"
    return subprocess.run([python, "-c", code], cwd=webui_dir, capture_output=True, text=True, timeout=600)


class InstallerFailed(RuntimeError):
    """The extension's requirements could not be installed into the webui's Python (offline?)."""


@contextlib.contextmanager
def running_webui(webui_dir: Path, python: str, tmp: Path, data: Path, extra_args: list[str], ready: str):
    """The webui on a free port (offline, CPU, ``--api-auth``, roots = ``tmp``) until the block ends;
    the extension is linked into ``data/extensions`` and its installer is run first, since the webui is
    started with ``--skip-install`` (raises :class:`InstallerFailed` when that cannot add what is missing)."""
    (data / "extensions").mkdir(parents=True, exist_ok=True)
    link = data / "extensions" / EXTENSION_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    done = run_extension_installer(webui_dir, python, link)
    if done.returncode != 0 or "Error running install.py" in done.stdout + done.stderr:
        raise InstallerFailed(f"the extension's install.py failed in {python} (offline, or pip cannot reach "
                              f"an index?): {(done.stdout + done.stderr)[-2000:]}")
    port = free_port()
    log = tmp / "webui.log"
    args = [python, "launch.py", "--data-dir", str(data), "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-version-check", "--no-download-sd-model", "--use-cpu", "all",
            "--no-half", "--precision", "full", "--api", "--api-auth", ":".join(AUTH), "--port", str(port),
            "--medical-diffusion-roots", str(tmp), *extra_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=webui_dir, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_log(log, ready, proc, timeout=300)
        yield Webui(f"http://127.0.0.1:{port}", data, log, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


