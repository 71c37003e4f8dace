"""Issue 19, the tabs' side: errors stay in the status line, Stop and disconnect stop a job within a
step, results are saved with their parameters, labels draw their arrows, the Mixes box is named."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import gradio as gr
import numpy as np
import pytest
from fastapi import Request
from PIL import Image, ImageDraw

from medical_diffusion.errors import Cancelled, InputFileError, MedDiffError
from ui_support import count_unet_calls, ui_context


# -- item 3: the status line ---------------------------------------------------------------------
def test_a_user_error_goes_to_the_status_line_clears_the_rest_and_logs_one_line(caplog):
    from medical_diffusion.ui.feedback import reports_in_status

    @reports_in_status(3, keep=[1])
    def handler():
        raise InputFileError("/data/ProstateX_0000/x.dcm", "not a DICOM file <class 'bytes'>")

    with caplog.at_level(logging.INFO):
        picture, kept, status = handler()
    assert picture is None and kept == gr.update()
    assert status == ("**Error:** /data/ProstateX\\_0000/x.dcm: not a DICOM file &lt;class 'bytes'&gt;")
    records = [r for r in caplog.records if "not a DICOM file" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None


def test_a_generator_handler_reports_its_error_after_its_updates():
    from medical_diffusion.ui.feedback import reports_in_status

    @reports_in_status(2)
    def handler():
        yield "log line", "Running..."
        raise Cancelled("stopped during real run 1 (3/10)")

    assert list(handler()) == [("log line", "Running..."), (None, "**Stopped:** stopped during real run 1 (3/10)")]


def test_an_unexpected_error_is_shown_too_and_keeps_its_traceback_in_the_log(caplog):
    from medical_diffusion.ui.feedback import reports_in_status

    @reports_in_status(1)
    def handler():
        raise KeyError("bug")

    with caplog.at_level(logging.INFO):
        status = handler()
    assert status.startswith("**Error** (unexpected") and "KeyError" in status
    assert any(r.exc_info for r in caplog.records if "bug" in r.getMessage())


def test_the_standalone_app_silences_httpx_request_lines(tmp_path):
    from medical_diffusion.ui.app import build_blocks

    logging.getLogger("httpx").setLevel(logging.INFO)
    build_blocks(ui_context(tmp_path))
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)


def test_a_failed_fid_run_clears_the_old_value(tmp_path):
    from medical_diffusion.ui import tab_evaluate

    with gr.Blocks():
        parts = tab_evaluate.build(ui_context(tmp_path))
    text, json_value = parts["fid"](str(tmp_path / "missing"), str(tmp_path), "radimagenet", "", "paper", 0,
                                    "both", 0)
    assert json_value is None
    assert text.startswith("**Error:**") and "missing" in text


# -- item 14: the Mixes box ------------------------------------------------------------------------
def _class_folders(root, per_class):
    from medical_diffusion.png_io import save_png

    for label in ("neg", "pos"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            save_png(np.full((8, 8), i, np.uint8), root / label / f"{i}.png")


def test_too_many_synthetic_images_name_the_mixes_box_and_what_is_there(tmp_path):
    from medical_diffusion.ui import tab_evaluate

    for split in ("train", "val", "test"):
        _class_folders(tmp_path / "data" / split, 3)
    _class_folders(tmp_path / "syn", 6)
    with gr.Blocks():
        parts = tab_evaluate.build(ui_context(tmp_path))
    values = [str(tmp_path / "data"), str(tmp_path / "syn"), str(tmp_path / "out"),
              "real=all:0\nreal_plus_synthetic=all:2000", "", 2, 4, 32, 1, False]
    *_, (_log, rows, roc, status) = list(parts["classify"](*values))
    assert rows is None and roc is None
    assert "Mixes box, line 2 (real\\_plus\\_synthetic): asks for 2000 synthetic images" in status
    assert "has 6 neg and 6 pos" in status and "at most 12 synthetic images" in status
    estimate_log, status = parts["estimate"](*values[:3], "real=all:0\n\nx=2:13", *values[4:])
    assert "Mixes box, line 3 (x): asks for 2 real images" not in status  # 2 real of 3 + 3 is fine
    assert "line 3 (x): asks for 13 synthetic images" in status and "at most 12" in status


def test_most_balanced_count():
    from medical_diffusion.ui.tab_evaluate import most_balanced

    assert most_balanced(6, 6) == 12 and most_balanced(3, 1) == 3 and most_balanced(0, 5) == 0


def test_the_classifier_table_has_a_row_of_its_own(tmp_path):
    """Beside the ROC picture its last column (sd) was cut off."""
    from medical_diffusion.ui import tab_evaluate

    with gr.Blocks() as blocks:
        tab_evaluate.build(ui_context(tmp_path))
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    table = by_id["md_eval_cls_table"]
    assert not isinstance(table.parent, gr.Row)


# -- item 8: Stop and disconnect -------------------------------------------------------------------
def _tinyui_context(tmp_path, tiny_backend):
    return ui_context(tmp_path, backend_factory=lambda: tiny_backend)


def test_stop_ends_a_generation_within_one_sampler_step(tmp_path, tiny_backend, monkeypatch):
    from medical_diffusion.ui import tab_generate

    (tmp_path / "emb").mkdir()
    with gr.Blocks():
        parts = tab_generate.build(_tinyui_context(tmp_path, tiny_backend))
    calls = count_unet_calls(monkeypatch)

    def progress(fraction, desc=""):  # the user presses Stop while the first step is shown
        parts["stop"].stop()

    picture, cells, status = parts["generate"]("a scan", 20, 2.0, 0, 64, 64, "", True, progress=progress)
    assert len(calls) == 1
    assert status.startswith("**Stopped:**") and "from an earlier run" in status
    assert picture == gr.update() and cells == gr.update()  # the earlier picture stays, marked stale
    assert not (tmp_path / "work" / "outputs").exists()


def test_a_stop_pressed_before_a_run_does_not_stop_the_next_one():
    from medical_diffusion.ui.stopping import StopFlag

    flag = StopFlag()
    flag.stop()
    with flag.running() as should_stop:
        assert not should_stop()
        flag.stop()
        assert should_stop()


def test_a_closed_browser_websocket_stops_the_job():
    """gradio 3.41 runs a queued handler in an anyio worker thread whose ``thread_data`` names the
    queue's event; when that event's websocket closes, ``should_stop()`` turns True."""
    from gradio.context import thread_data

    from medical_diffusion.ui.stopping import StopFlag

    class Socket:
        def __init__(self):
            self.closed = asyncio.Event()

        async def receive(self):
            await self.closed.wait()
            return {"type": "websocket.disconnect", "code": 1001}

    class Event:
        _id = "session_7"

        def __init__(self):
            self.websocket = Socket()

    async def main():
        import anyio

        loop = asyncio.get_running_loop()
        event = Event()
        blocks = type("Blocks", (), {"_queue": type("Queue", (), {"active_jobs": [None, [event]]})()})()
        seen = {}

        def handler():
            thread_data.blocks, thread_data.event_id = blocks, event._id
            try:
                with StopFlag().running() as should_stop:
                    seen["before"] = should_stop()
                    loop.call_soon_threadsafe(event.websocket.closed.set)  # the browser tab is closed
                    deadline = time.monotonic() + 5
                    while not should_stop() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    seen["after"] = should_stop()
            finally:
                del thread_data.blocks, thread_data.event_id

        await anyio.to_thread.run_sync(handler)
        return seen

    assert asyncio.run(main()) == {"before": False, "after": True}


def test_outside_the_queue_there_is_no_browser_to_watch():
    from medical_diffusion.ui.stopping import watch_browser

    with watch_browser() as gone:
        assert gone is None


def test_the_classifier_and_fid_stop_at_their_next_batch():
    from medical_diffusion.ui.stopping import stopping_progress

    seen, stop = [], threading.Event()
    progress = stopping_progress(lambda *a: seen.append(a), stop.is_set)
    progress("real run 1", 1, 10)
    stop.set()
    with pytest.raises(Cancelled, match="real run 1"):
        progress("real run 1", 2, 10)
    assert seen == [("real run 1", 1, 10)]


class _WebuiState:
    """What A1111's ``shared.state`` offers the adapter."""

    def __init__(self):
        self.interrupted, self.sampling_step, self.sampling_steps, self.calls = False, 0, 0, []

    def begin(self, job=""):
        self.interrupted = False
        self.calls.append("begin")

    def end(self):
        self.calls.append("end")

    def interrupt(self):
        self.interrupted = True


def _webui_sampler(state, steps=200, step_s=0.02):
    """A1111's sampler loop: it looks at ``state.interrupted`` at every step."""
    state.sampling_steps = steps
    for i in range(steps):
        if state.interrupted:
            return i
        state.sampling_step = i
        time.sleep(step_s)
    return steps


def test_our_stop_interrupts_the_webuis_sampler_within_a_step():
    from medical_diffusion.webui.generation import interruptible

    state, stop, reported = _WebuiState(), threading.Event(), []
    threading.Timer(0.1, stop.set).start()
    ran = {}
    with pytest.raises(Cancelled):
        with interruptible(stop.is_set, lambda i, n: reported.append((i, n)), state=state):
            ran["steps"] = _webui_sampler(state)
    assert ran["steps"] < 40  # stopped ~0.1 s (a few steps) after the flag, not after 200 steps
    assert state.calls == ["begin", "end"] and reported and reported[-1][1] == 200


def test_the_webuis_interrupt_stops_our_job():
    from medical_diffusion.webui.generation import interruptible

    state = _WebuiState()
    state.interrupted = True  # an Interrupt pressed before our job began does not count
    with pytest.raises(Cancelled):
        with interruptible(None, None, state=state):
            assert not state.interrupted
            threading.Timer(0.05, state.interrupt).start()
            _webui_sampler(state)


def test_the_api_notices_a_disconnect_that_is_disconnected_does_not_report():
    """Behind the webui's BaseHTTPMiddleware (starlette 0.26), ``request.is_disconnected()`` stays
    False; the client's going shows as ``http.disconnect`` from ``receive()``."""
    from medical_diffusion.ui.api_routes import run_while_connected

    class SilentRequest:
        url = type("U", (), {"path": "/medical-diffusion/v1/interpolate"})()

        async def is_disconnected(self):
            return False

        async def receive(self):
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

    steps = []

    def work(stop: threading.Event):
        for i in range(300):
            if stop.is_set():
                raise Cancelled("stopped")
            steps.append(i)
            time.sleep(0.01)
        return "finished"

    with pytest.raises(Cancelled):
        asyncio.run(run_while_connected(SilentRequest(), work, poll=0.02))
    assert 0 < len(steps) < 100


def test_the_api_stops_on_disconnect_behind_a_base_http_middleware(tmp_path):
    """A real uvicorn server with an ``@app.middleware("http")`` (what the webui adds) in front."""
    import socket

    import uvicorn
    from fastapi import FastAPI

    from medical_diffusion.ui.api_routes import run_while_connected

    app = FastAPI()

    @app.middleware("http")
    async def passthrough(request, call_next):
        return await call_next(request)

    steps, ended = [], threading.Event()

    def work(stop: threading.Event):
        try:
            for i in range(500):
                if stop.is_set():
                    raise Cancelled("stopped")
                steps.append(i)
                time.sleep(0.01)
            return {}
        finally:
            ended.set()

    @app.post("/job")
    async def job(request: Request):
        await request.body()
        return await run_while_connected(request, work, poll=0.05)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /job HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 2\r\n\r\n{}")
        while len(steps) < 5:
            time.sleep(0.01)
        client.close()
        assert ended.wait(3)
        assert len(steps) < 200
    finally:
        server.should_exit = True
        thread.join(5)


# -- item 9: results saved with their parameters ---------------------------------------------------
def test_a_generated_image_is_saved_with_its_parameters(tmp_path, tiny_backend):
    from medical_diffusion.ui import tab_generate

    (tmp_path / "emb").mkdir()
    with gr.Blocks():
        parts = tab_generate.build(_tinyui_context(tmp_path, tiny_backend))
    picture, cells, status = parts["generate"]("a scan", 2, 3.0, 5, 64, 64, "noise", True, progress=None)
    assert picture is not None and "Saved to" in status
    saved = sorted((tmp_path / "work" / "outputs" / "image").glob("*/*.png"))
    assert [p.name for p in saved] == ["00001.png"] and str(saved[0]).replace("_", "\\_") in status
    with Image.open(saved[0]) as im:
        text = im.text["parameters"]
    assert text.splitlines() == ["a scan", "Negative prompt: noise",
                                 "Steps: 2, Sampler: Euler a, CFG scale: 3.0, Seed: 5, Size: 64x64, Model: tiny"]
    sidecar = json.loads(saved[0].with_suffix(".json").read_text())
    assert sidecar["params"]["seed"] == 5 and sidecar["prompt"] == "a scan"
    parts["generate"]("a scan", 2, 3.0, 5, 64, 64, "", True, progress=None)
    assert (saved[0].parent / "00002.png").is_file()


def test_a_grid_is_saved_with_each_frame_and_the_embedding_hashes(tmp_path):
    import hashlib

    from medical_diffusion.generation.outputs import Picture, save_result

    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "prostate_neg.pt").write_bytes(b"neg vectors")
    (emb / "prostate_pos.pt").write_bytes(b"pos vectors")
    (emb / "unused.pt").write_bytes(b"other")
    frames = [Picture(Image.new("RGB", (8, 8), (i, 0, 0)), f"prostate_neg :{1 - t} AND prostate_pos :{t}", f"t={t}")
              for i, t in enumerate((0.0, 1.0))]
    params = {"seed": 1, "steps": 2, "cfg_scale": 2.0, "width": 64, "height": 64, "negative_prompt": ""}
    done = save_result(tmp_path / "work", "interpolation", Image.new("RGB", (16, 8)), params, cells=frames,
                       embeddings_dir=emb)
    assert [p.name for p in done.cells] == ["00001-01.png", "00001-02.png"]
    record = json.loads(done.sidecar.read_text())
    neg = hashlib.sha256(b"neg vectors").hexdigest()
    assert set(record["embeddings"]) == {"prostate_neg", "prostate_pos"}
    assert record["embeddings"]["prostate_neg"]["sha256"] == neg
    with Image.open(done.cells[1]) as im:
        text = im.text["parameters"]
    assert text.startswith("prostate_neg :0.0 AND prostate_pos :1.0\n")
    assert f'TI hashes: "prostate_neg: {neg[:10]}, prostate_pos: ' in text


def test_two_saves_never_share_a_number(tmp_path):
    from medical_diffusion.generation.outputs import save_result

    paths = []

    def save():
        paths.append(save_result(tmp_path, "image", Image.new("RGB", (4, 4)), {"seed": 0}).picture)

    threads = [threading.Thread(target=save) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 6


# -- item 13: labels and sheets --------------------------------------------------------------------
def _drawn(font, text):
    im = Image.new("L", (48, 48), 255)
    ImageDraw.Draw(im).text((4, 4), text, font=font, fill=0)
    return np.asarray(im)


def test_the_title_arrow_is_a_glyph_not_a_missing_glyph_box():
    from medical_diffusion.image_grid import _font

    font = _font(24)
    missing = _drawn(font, "\U000e0fff")  # an unassigned code point: the font's missing-glyph box
    assert (_drawn(font, "\u2192") != missing).any()


def test_a_one_image_sheet_shows_its_whole_title():
    from medical_diffusion.image_grid import _font, make_grid

    title = "prostate_neg \u2192 prostate_pos, seed 0"
    sheet = make_grid([Image.new("RGB", (64, 64), "gray")], ["t=0"], cell=64, title=title)
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=_font(10))
    assert sheet.width >= width


def test_status_text_shows_angle_brackets_and_no_markdown():
    from medical_diffusion.ui.feedback import escape_markdown, status_error

    assert escape_markdown("<class 'int'> *a* [b](c)") == "&lt;class 'int'&gt; \\*a\\* \\[b\\](c)"
    assert status_error(MedDiffError("x")) == "**Error:** x"


@pytest.mark.slow
def test_closing_the_browser_stops_a_job_in_the_real_standalone_app(tmp_path, tiny_backend, monkeypatch):
    """``meddiff ui``'s gradio queue: the page's websocket closes mid-run, the sampler stops."""
    import websockets.sync.client as ws_client
    from browser_support import free_port

    from medical_diffusion.ui import standalone

    calls = count_unet_calls(monkeypatch)
    from medical_diffusion.generation import sampling

    counting = sampling.run_model

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return counting(*args, **kwargs)

    monkeypatch.setattr(sampling, "run_model", slow)
    (tmp_path / "emb").mkdir()
    port = free_port()
    blocks = standalone.launch(_tinyui_context(tmp_path, tiny_backend), port=port, block=False)
    try:
        by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
        fn_index = next(i for i, d in enumerate(blocks.dependencies)
                        if by_id["md_gen_generate"]._id in d["targets"])
        socket = ws_client.connect(f"ws://127.0.0.1:{port}/queue/join", open_timeout=10)
        assert json.loads(socket.recv(10))["msg"] == "send_hash"
        socket.send(json.dumps({"session_hash": "s19", "fn_index": fn_index}))
        while json.loads(socket.recv(10))["msg"] != "send_data":
            pass
        socket.send(json.dumps({"session_hash": "s19", "fn_index": fn_index, "event_data": None,
                                "data": ["a scan", 150, 2.0, 0, 64, 64, "", True]}))
        deadline = time.monotonic() + 30
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) >= 5
        socket.close()  # the browser tab is closed
        time.sleep(1.0)
        stopped_at = len(calls)
        time.sleep(1.0)
        assert len(calls) == stopped_at < 150
        assert not (tmp_path / "work" / "outputs").exists()
    finally:
        blocks.close()


def test_inpainting_stops_within_one_sampler_step(tiny_backend, monkeypatch):
    """The Inpaint tab's Stop hook: the core inpainting asks ``should_stop`` before every step."""
    from medical_diffusion.generation.inpainting import inpaint

    calls = count_unet_calls(monkeypatch)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        inpaint(tiny_backend, Image.new("RGB", (64, 64), "gray"), mask, "x", steps=20, width=64, height=64,
                denoising_strength=1.0, should_stop=should_stop)
    assert len(calls) == 2


def test_the_fid_route_stops_at_the_next_batch_once_its_client_has_gone(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from medical_diffusion.evaluation import fid as fid_module
    from medical_diffusion.ui import api_routes

    stops, batches = [], []

    async def runner(request, work, poll=0.25):  # the client goes away after the third batch
        stops.append(threading.Event())
        return work(stops[-1])

    def fake_fid(*args, progress=None, **kwargs):
        for i in range(100):
            progress("features: real", i, 100)
            batches.append(i)
            if i == 2:
                stops[-1].set()
        raise AssertionError("not stopped")

    monkeypatch.setattr(api_routes, "run_while_connected", runner)
    monkeypatch.setattr(fid_module, "compute_fid", fake_fid)
    for name in ("real", "generated"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(api_routes.make_router(ui_context(tmp_path)))
    answer = TestClient(app).post(f"{api_routes.PREFIX}/fid",
                                  json={"real": str(tmp_path / "real"), "generated": str(tmp_path / "generated")})
    assert batches == [0, 1, 2] and "stopped during features: real" in answer.json()["detail"]


def test_the_hosts_interrupt_stops_an_fid_run(tmp_path, monkeypatch):
    """Inside the webui ``ctx.job_session`` begins the webui's job and hands over its Interrupt flag."""
    import contextlib

    from medical_diffusion.evaluation import fid as fid_module
    from medical_diffusion.ui import tab_evaluate

    interrupted, sessions, batches = [False], [], []

    @contextlib.contextmanager
    def job_session(job):
        sessions.append(job)
        try:
            yield lambda: interrupted[0]
        finally:
            sessions.append("end")

    def fake_fid(*args, progress=None, **kwargs):
        for i in range(100):
            progress("bootstrap", i, 100)
            batches.append(i)
            interrupted[0] = i >= 1  # the webui's Interrupt button
        raise AssertionError("not stopped")

    monkeypatch.setattr(fid_module, "compute_fid", fake_fid)
    for name in ("real", "generated"):
        (tmp_path / name).mkdir()
    with gr.Blocks():
        parts = tab_evaluate.build(ui_context(tmp_path, job_session=job_session))
    text, json_value = parts["fid"](str(tmp_path / "real"), str(tmp_path / "generated"), "inception",
                                    str(tmp_path / "real"), "paper", 0, "both", 0)
    assert batches == [0, 1] and sessions == ["FID", "end"]
    assert text.startswith("**Stopped:**") and json_value is None


def test_the_webui_job_session_reads_the_webuis_interrupt_without_touching_its_state(monkeypatch):
    import sys
    import types

    from medical_diffusion.webui.tabs import job_session

    state = _WebuiState()
    shared = types.SimpleNamespace(state=state)
    modules = types.ModuleType("modules")
    modules.shared = shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    with job_session("FID") as interrupted:
        assert not interrupted()
        state.interrupt()
        assert interrupted()
    state.interrupted = True  # pressed before the next job: does not count until a webui job clears it
    with job_session("FID") as interrupted:
        assert not interrupted()
        state.begin()  # the webui's txt2img starts and ends meanwhile
        assert not interrupted()
        state.interrupt()
        assert interrupted()
    assert state.calls == ["begin"]  # only the webui's own job began; ours never touches its state
