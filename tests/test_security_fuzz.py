"""Fuzz the standalone app's API with random and malformed bodies: never a 5xx.

The model is a fake (txt2img draws an 8x8 square, FID is a stub, training fails fast in its thread),
so only the request handling runs. Bounded: ~150 examples per route, a few seconds in all.
"""

from __future__ import annotations

import json
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from medical_diffusion.errors import MedDiffError  # noqa: E402
from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity  # noqa: E402
from medical_diffusion.ui.api_routes import PREFIX, make_router  # noqa: E402
from medical_diffusion.ui.context import UIContext  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

ROUTE_FIELDS = {
    "/train": ["config", "run_dir", "resume", "replace_published"],
    "/interpolate": ["healthy", "diseased", "k", "seed", "steps", "cfg_scale", "width", "height", "negative_prompt",
                     "allow_plain_prompt"],
    "/fid": ["real", "generated", "extractor", "weights", "mode", "bootstrap_reps", "resample", "seed"],
}
CONFIG_FIELDS = ["name", "data_dir", "model", "n_vectors", "steps", "batch_size", "grad_accumulation", "resolution",
                 "learning_rate", "preview_steps", "preview_every", "save_every", "mask", "template_file", "seed",
                 "init", "latents", "hflip", "autocast", "clip_grad_norm", "extra"]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 2, 8, 64, 75, 76, 100000, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
)
paths = st.sampled_from(["", ".", "..", "/", "/etc", "/etc/passwd", "~", "runs/x", "a\x00b", "x" * 5000, "data",
                         "../../outside", "alpha"])
leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40), paths)
json_values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def body_for(fields):
    """Objects with the route's own keys (often) plus odd extra keys, values of any type."""
    known = st.dictionaries(st.sampled_from(fields), json_values, max_size=len(fields))
    extra = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.one_of(known, st.builds(lambda a, b: {**a, **b}, known, extra), json_values)


train_bodies = st.builds(lambda cfg, other: {"config": cfg, **other},
                         st.one_of(st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, max_size=8), json_values),
                         st.dictionaries(st.sampled_from(["run_dir", "resume", "replace_published"]), json_values,
                                         max_size=3))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import os

    from medical_diffusion.evaluation import fid as fid_module

    work = tmp_path_factory.mktemp("fuzz_work")
    (work / "data").mkdir()
    Image.new("RGB", (16, 16)).save(work / "data" / "a.png")
    ctx = UIContext(backend_factory=lambda: (_ for _ in ()).throw(MedDiffError("no model in the fuzz test")),
                    work_dir=work, embeddings_dir=work / "emb")
    ctx.txt2img = lambda prompt, seed=0, **kw: [Image.new("RGB", (8, 8))]
    app = FastAPI(middleware=[ServerSecurity(ApiCredentials(), None).middleware()])
    app.include_router(make_router(ctx))
    old_roots, old_fid = os.environ.get("MEDDIFF_ALLOWED_ROOTS"), fid_module.compute_fid

    def fake_fid(real, generated, **kwargs):
        raise MedDiffError(f"{real}: no images (fuzz stub)")

    os.environ["MEDDIFF_ALLOWED_ROOTS"] = str(work)
    fid_module.compute_fid = fake_fid
    try:
        yield TestClient(app, raise_server_exceptions=False), ctx
    finally:
        fid_module.compute_fid = old_fid
        if old_roots is None:
            os.environ.pop("MEDDIFF_ALLOWED_ROOTS", None)
        else:
            os.environ["MEDDIFF_ALLOWED_ROOTS"] = old_roots


def _check(resp):
    """No 5xx; a refusal says why in one string (FastAPI's own list for query parameters)."""
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        detail = resp.json()["detail"]
        if isinstance(detail, list):
            assert detail and all(item.get("msg") for item in detail), resp.text
        else:
            assert isinstance(detail, str) and detail.strip(), resp.text


def _wait_idle(ctx):
    deadline = time.monotonic() + 30
    while ctx.trainer.running and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("route", ["/interpolate", "/fid"])
def test_json_bodies_never_5xx(client, route):
    http, _ = client

    @FUZZ
    @given(body_for(ROUTE_FIELDS[route]))
    def run(body):
        _check(http.post(PREFIX + route, content=json.dumps(body), headers={"Content-Type": "application/json"}))

    run()


def test_train_bodies_never_5xx(client):
    http, ctx = client

    @FUZZ
    @given(st.one_of(train_bodies, body_for(ROUTE_FIELDS["/train"])))
    def run(body):
        _wait_idle(ctx)  # a body that starts a run ends fast (no model): later bodies get 400, not 409
        _check(http.post(PREFIX + "/train", content=json.dumps(body), headers={"Content-Type": "application/json"}))

    run()
    _wait_idle(ctx)
    assert not ctx.trainer.running


def test_raw_bodies_and_content_types_never_5xx(client):
    http, _ = client

    @FUZZ
    @given(st.sampled_from(["/train", "/interpolate", "/fid", "/train/stop"]), st.binary(max_size=200),
           st.sampled_from(["application/json", "text/plain", "", "application/json; charset=utf-8",
                            "multipart/form-data", "application/x-www-form-urlencoded"]))
    def run(route, raw, content_type):
        headers = {"Content-Type": content_type} if content_type else {}
        _check(http.post(PREFIX + route, content=raw, headers=headers))

    run()


def test_status_query_never_5xx(client):
    http, _ = client

    @settings(max_examples=50, deadline=None)
    @given(st.text(max_size=20))
    def run(value):
        _check(http.get(PREFIX + "/train/status", params={"losses": value}))

    run()
