"""The standalone app's API: auth, JSON-only bodies, Host/Origin checks, bind refusal, bounds, cancelling."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from medical_diffusion.errors import Cancelled, MedDiffError  # noqa: E402
from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity  # noqa: E402
from medical_diffusion.ui.api_routes import PREFIX, make_router, run_while_connected  # noqa: E402
from medical_diffusion.ui.context import UIContext  # noqa: E402

JSON = {"Content-Type": "application/json"}


def fake_txt2img(prompt, seed=0, **kwargs):
    return [Image.new("RGB", (8, 8), (seed % 256, 0, 0))]


def make_ctx(tmp_path) -> UIContext:
    """A context whose embeddings folder holds two tiny embeddings, ``a`` and ``b`` (the names the bodies use)."""
    import torch

    from medical_diffusion.embeddings import Embedding, save_embedding

    (tmp_path / "emb").mkdir(exist_ok=True)
    for name in ("a", "b"):
        save_embedding(Embedding(name=name, vectors=torch.zeros(1, 8)), tmp_path / "emb" / f"{name}.pt", force=True)
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    ctx.txt2img = fake_txt2img
    return ctx


def app_for(ctx, security: ServerSecurity) -> FastAPI:
    """What ``launch`` serves, minus gradio: the guard middleware and the router behind its auth."""
    app = FastAPI(middleware=[security.middleware()])
    app.include_router(make_router(ctx, dependencies=security.router_dependencies()))
    return app


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def secured(tmp_path):
    creds = ApiCredentials.from_options("alice:secret,bob:pw", ["tok-123"], use_env=False)
    security = ServerSecurity(creds, frozenset({"testserver", "127.0.0.1", "localhost"}))
    return TestClient(app_for(make_ctx(tmp_path), security))


def test_auth_basic_pairs_and_bearer_token(secured):
    url = f"{PREFIX}/train/status"
    assert secured.get(url).status_code == 401
    assert "Basic" in secured.get(url).headers["www-authenticate"]
    assert secured.get(url, headers=basic("alice", "nope")).status_code == 401
    assert secured.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert secured.get(url, headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    assert secured.get(url, headers=basic("alice", "secret")).status_code == 200
    assert secured.get(url, headers=basic("bob", "pw")).status_code == 200
    assert secured.get(url, headers={"Authorization": "Bearer tok-123"}).status_code == 200
    # POST routes too, before their body is looked at
    assert secured.post(f"{PREFIX}/train/stop").status_code == 401
    assert secured.post(f"{PREFIX}/train/stop", headers=basic("alice", "secret")).status_code == 200


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("MEDDIFF_API_TOKEN", "from-env")
    creds = ApiCredentials.from_options(None, None)
    assert creds.enabled and creds.accepts("Bearer from-env") and not creds.accepts("Bearer other")


def test_malformed_api_auth_is_refused():
    with pytest.raises(MedDiffError, match="USER:PASSWORD"):
        ApiCredentials.from_options("alice", use_env=False)


def test_post_bodies_must_be_json(secured):
    auth = basic("alice", "secret")
    body = '{"healthy": "a", "diseased": "b", "k": 2}'
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        resp = secured.post(f"{PREFIX}/interpolate", content=body, headers={**auth, **headers})
        assert resp.status_code == 415, resp.text
        assert "application/json" in resp.json()["detail"]
    resp = secured.post(f"{PREFIX}/interpolate", content=body, headers={**auth, **JSON})
    assert resp.status_code == 200, resp.text
    resp = secured.post(f"{PREFIX}/interpolate", content="{not json", headers={**auth, **JSON})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["detail"]


def test_foreign_origin_and_rebinding_host_are_refused(secured):
    auth = basic("alice", "secret")
    url = f"{PREFIX}/train/status"
    assert secured.get(url, headers={**auth, "Origin": "http://testserver"}).status_code == 200
    for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
        resp = secured.get(url, headers={**auth, "Origin": origin})
        assert resp.status_code == 403 and "cross-site" in resp.json()["detail"], origin
    resp = secured.get(url, headers={**auth, "Host": "attacker.example:7861"})
    assert resp.status_code == 403 and "DNS rebinding" in resp.json()["detail"]
    assert secured.get(url, headers={**auth, "Host": "127.0.0.1:7861"}).status_code == 200
    assert secured.get(url, headers={**auth, "Host": "localhost"}).status_code == 200


def test_non_loopback_bind_needs_auth(tmp_path, capsys):
    from medical_diffusion.cli import main
    from medical_diffusion.ui import standalone

    with pytest.raises(MedDiffError, match="--api-auth"):
        ServerSecurity.for_bind("0.0.0.0", ApiCredentials())
    with pytest.raises(MedDiffError, match="--api-auth"):  # a token alone does not protect the page
        ServerSecurity.for_bind("192.168.1.5", ApiCredentials(tokens=("t",)))
    assert ServerSecurity.for_bind("0.0.0.0", ApiCredentials(), insecure=True).allowed_hosts is None
    assert ServerSecurity.for_bind("127.0.0.1", ApiCredentials()).gradio_auth() is None
    with_auth = ServerSecurity.for_bind("0.0.0.0", ApiCredentials.from_options("u:p", use_env=False))
    assert with_auth.gradio_auth() == [("u", "p")]
    # the CLI refuses before building anything
    with pytest.raises(MedDiffError, match="--api-auth"):
        standalone.launch(make_ctx(tmp_path), host="0.0.0.0", block=False)
    assert main(["ui", "--host", "0.0.0.0", "--work-dir", str(tmp_path / "w")]) == 1
    assert "--api-auth" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_allowed_roots_flag_sets_the_policy(tmp_path, monkeypatch):
    from medical_diffusion.cli import build_parser
    from medical_diffusion.cli import ui as cli_ui
    from medical_diffusion.ui import standalone

    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", "")  # restored after the test (run() sets it)
    monkeypatch.chdir(tmp_path)  # the default embeddings home ./embeddings lies inside the roots
    monkeypatch.delenv("MEDDIFF_EMBEDDINGS_DIR", raising=False)
    seen = {}
    monkeypatch.setattr(standalone, "launch", lambda ctx, **kw: seen.update(kw))
    monkeypatch.setattr(standalone, "make_context", lambda *a: None)
    args = build_parser().parse_args(["ui", "--allowed-roots", str(tmp_path), "--api-token", "t"])
    assert cli_ui.run(args) == 0
    import os

    assert os.environ["MEDDIFF_ALLOWED_ROOTS"] == str(tmp_path)
    assert seen["security"].credentials.tokens == ("t",)


def test_bounds_answer_422_naming_the_limit(tmp_path):
    client = TestClient(app_for(make_ctx(tmp_path), ServerSecurity(ApiCredentials(), None)))
    cases = [
        ("/interpolate", {"healthy": "a", "diseased": "b", "k": 100000}, "k: ensure this value is less than or equal to 32"),
        ("/interpolate", {"healthy": "a", "diseased": "b", "width": 100000}, "less than or equal to 2048"),
        ("/interpolate", {"healthy": "a", "diseased": "b", "steps": 10**9}, "steps"),
        ("/fid", {"real": "a", "generated": "b", "bootstrap_reps": 10**9}, "bootstrap_reps"),
        ("/train", {"config": {"name": "x", "data_dir": str(tmp_path), "preview_steps": 10**6}},
         "preview_steps must be between 1 and 150"),
        ("/train", {"config": {"name": "x", "data_dir": str(tmp_path), "n_vectors": 76}}, "between 1 and 75"),
        ("/train", {"config": {"name": "x", "data_dir": str(tmp_path), "resolution": 100000}}, "resolution"),
    ]
    for route, body, message in cases:
        resp = client.post(PREFIX + route, json=body)
        assert resp.status_code == 422, (route, resp.text)
        assert message in resp.json()["detail"], resp.json()
    resp = client.post(PREFIX + "/interpolate", json={"healthy": "a"})
    assert resp.status_code == 400 and "diseased" in resp.json()["detail"]


def test_user_error_logs_one_line_without_traceback(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    client = TestClient(app_for(make_ctx(tmp_path), ServerSecurity(ApiCredentials(), None)))
    with caplog.at_level(logging.WARNING):
        resp = client.post(PREFIX + "/train", json={"config": {"name": "x", "data_dir": "/etc"}})
    assert resp.status_code == 400 and "outside" in resp.json()["detail"]
    records = [r for r in caplog.records if "outside" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()


def test_disconnected_client_stops_the_job():
    class GoneRequest:
        url = type("U", (), {"path": "/x"})()

        async def is_disconnected(self):
            return True

    steps = []

    def work(stop: threading.Event):
        for i in range(1000):  # a sampler: looks at stop between steps
            if stop.is_set():
                raise Cancelled("stopped")
            steps.append(i)
            time.sleep(0.01)
        return "finished"

    with pytest.raises(Cancelled):
        asyncio.run(run_while_connected(GoneRequest(), work, poll=0.02))
    assert 0 < len(steps) < 100  # stopped early, and the thread had ended when it returned
    n = len(steps)
    time.sleep(0.05)
    assert len(steps) == n


def test_sampler_stops_between_steps(tiny_backend):
    from medical_diffusion.generation.sampling import sample_images

    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        sample_images(tiny_backend, "x", steps=50, width=64, height=64, should_stop=should_stop)
    assert len(calls) == 3


@pytest.mark.slow
def test_real_standalone_server_guards_gradio_and_api(tmp_path, tiny_backend):
    """``launch`` on 127.0.0.1: the guard covers gradio's own routes, the API asks for credentials."""
    import json as _json
    import urllib.error
    import urllib.request

    pytest.importorskip("gradio")
    from browser_support import free_port

    from medical_diffusion.ui import standalone

    ctx = UIContext(backend_factory=lambda: tiny_backend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    model_id="tiny")
    creds = ApiCredentials.from_options(None, ["tok"], use_env=False)
    port = free_port()
    blocks = standalone.launch(ctx, port=port, block=False, security=ServerSecurity.for_bind("127.0.0.1", creds))
    base = f"http://127.0.0.1:{port}"

    def status(path, headers=None, data=None):
        request = urllib.request.Request(base + path, headers=headers or {}, data=data)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert status("/config") == 200
        assert status("/config", {"Origin": "http://evil.example"}) == 403  # gradio's routes too
        assert status("/config", {"Host": "rebind.example"}) == 403
        assert status(PREFIX + "/train/status") == 401
        assert status(PREFIX + "/train/status", {"Authorization": "Bearer tok"}) == 200
        body = _json.dumps({"healthy": "a"}).encode()
        assert status(PREFIX + "/interpolate", {"Authorization": "Bearer tok", "Content-Type": "text/plain"}, body) == 415
    finally:
        blocks.close()


def test_fid_missing_weights_says_how_to_send_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # nothing cached there
    for name in ("real", "generated"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / name / "a.png")
    client = TestClient(app_for(make_ctx(tmp_path), ServerSecurity(ApiCredentials(), None)))
    answer = client.post(f"{PREFIX}/fid", json={"real": str(tmp_path / "real"), "generated": str(tmp_path / "generated"),
                                                "extractor": "radimagenet"})
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    assert "weights file not found" in detail and "send its path as 'weights'" in detail and "--" not in detail


def test_fid_route_runs_on_the_hosts_evaluation_device(tmp_path, monkeypatch):
    import torch

    from medical_diffusion.evaluation import fid as fid_module

    seen = {}

    class Result:
        def to_dict(self):
            return {"fid": 1.0}

    def fake_fid(*args, device=None, **kwargs):
        seen["device"] = device
        return Result()

    monkeypatch.setattr(fid_module, "compute_fid", fake_fid)
    for name in ("real", "generated"):
        (tmp_path / name).mkdir()
    ctx = make_ctx(tmp_path)
    ctx.evaluation_device = lambda: "cpu"  # the webui gives modules.devices.device here
    client = TestClient(app_for(ctx, ServerSecurity(ApiCredentials(), None)))
    answer = client.post(f"{PREFIX}/fid", json={"real": str(tmp_path / "real"), "generated": str(tmp_path / "generated")})
    assert answer.status_code == 200 and seen["device"] == torch.device("cpu")
