"""Issue 19, loose ends of items 4 and 9: the generate tab and the API refuse every unknown embedding
name of a job before sampling (plain prompts only on request), ``POST /train`` can replace a published
embedding, and the CLI's interpolate/compose/generate PNGs carry A1111's ``parameters`` text."""

from __future__ import annotations

import hashlib
import json

import gradio as gr
import pytest
import torch
from PIL import Image

from medical_diffusion.embeddings import Embedding, save_embedding

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

SMALL = ["--steps", "1", "--width", "64", "--height", "64"]


def _embeddings(folder, names=("healthy", "sick"), width=32):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in names:
        save_embedding(Embedding(name, torch.randn(2, width, generator=g) * 0.3), folder / f"{name}.pt")
    return folder


def _unet_calls(monkeypatch):
    from medical_diffusion.generation import sampling

    calls, real = [], sampling.run_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "run_model", counting)
    return calls


@pytest.fixture
def tab(tmp_path, tiny_backend):
    from medical_diffusion.ui import tab_generate
    from medical_diffusion.ui.context import UIContext

    ctx = UIContext(backend_factory=lambda: tiny_backend, work_dir=tmp_path / "work",
                    embeddings_dir=_embeddings(tmp_path / "emb"), model_id="tiny")
    with gr.Blocks() as blocks:
        parts = tab_generate.build(ctx)
    return blocks, parts


PARAMS = (1, 2.0, 0, 64, 64, "")  # steps, CFG, seed, width, height, negative prompt


# -- item 4a: the tab ------------------------------------------------------------------------------
def test_the_grid_refuses_a_misspelt_diseased_name_before_sampling(tab, monkeypatch):
    _, parts = tab
    calls = _unet_calls(monkeypatch)
    picture, _, status = parts["grid"]("healthy", "sickk", 2, *PARAMS)
    assert picture == gr.update() and calls == []
    plain = status.replace("\\", "")
    assert "unknown embedding name(s) sickk (did you mean sick?)" in plain
    assert "Allow a prompt without embeddings" in plain and "--allow-plain-prompt" not in plain


def test_the_strip_refuses_a_misspelt_added_embedding_before_sampling(tab, monkeypatch, tmp_path):
    from medical_diffusion.ui.tab_generate import SLOTS

    _, parts = tab
    calls = _unet_calls(monkeypatch)
    names = ["sick", "effusionn"] + [None] * (SLOTS - 2)
    picture, _, status = parts["compose"]("healthy", *names, *[0.5] * SLOTS, *PARAMS)
    assert picture == gr.update() and calls == []
    assert "unknown embedding name(s) effusionn" in status.replace("\\", "")
    assert not (tmp_path / "work" / "outputs").exists()


def test_a_plain_prompt_runs_only_when_the_box_is_ticked(tab, monkeypatch):
    blocks, parts = tab
    box = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "md_gen_allow_plain")
    assert box.label == "Allow a prompt without embeddings" and box.value is False
    for button in ("md_gen_generate", "md_gen_grid"):  # the box is an input of the runs
        target = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == button)
        event = next(d for d in blocks.dependencies if target._id in d["targets"])
        assert box._id in event["inputs"]
    calls = _unet_calls(monkeypatch)
    _, _, status = parts["generate"]("a chest x-ray", *PARAMS)
    assert status.startswith("**Error:** unknown embedding name(s) a chest x-ray") and calls == []
    picture, cells, status = parts["generate"]("a chest x-ray", *PARAMS, True)
    assert isinstance(picture, Image.Image) and len(calls) == 1  # one sampler step
    assert "sampled as plain text" in status and "Saved to" in status


# -- item 4b: the API ------------------------------------------------------------------------------
def _client(tmp_path, monkeypatch):
    from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity
    from medical_diffusion.ui.api_routes import make_router
    from medical_diffusion.ui.context import UIContext

    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path / "work",
                    embeddings_dir=_embeddings(tmp_path / "emb"))
    ctx.txt2img = lambda prompt, seed=0, **kwargs: [Image.new("RGB", (8, 8))]
    app = FastAPI(middleware=[ServerSecurity(ApiCredentials(), None).middleware()])
    app.include_router(make_router(ctx))
    return TestClient(app), ctx


def test_the_interpolate_route_refuses_unknown_names_unless_asked(tmp_path, monkeypatch):
    from medical_diffusion.ui.api_routes import PREFIX

    client, _ = _client(tmp_path, monkeypatch)
    resp = client.post(PREFIX + "/interpolate", json={"healthy": "healthy", "diseased": "sickk", "k": 2})
    assert resp.status_code == 400, resp.text
    detail = resp.json()["detail"]
    assert "unknown embedding name(s) sickk (did you mean sick?)" in detail
    assert str(tmp_path / "emb") in detail and '"allow_plain_prompt": true' in detail
    resp = client.post(PREFIX + "/interpolate", json={"healthy": "healthy", "diseased": "sickk", "k": 2,
                                                      "allow_plain_prompt": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompts"] == ["healthy :1 AND sickk :0", "healthy :0 AND sickk :1"]
    resp = client.post(PREFIX + "/interpolate", json={"healthy": "healthy", "diseased": "sick", "k": 2})
    assert resp.status_code == 200, resp.text


def test_the_train_route_can_replace_a_published_embedding(tmp_path, monkeypatch):
    from medical_diffusion.ui.api_routes import PREFIX

    client, ctx = _client(tmp_path, monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(data / f"{i}.png")
    body = {"config": {"name": "sick", "data_dir": str(data), "steps": 1, "resolution": 64}}
    resp = client.post(PREFIX + "/train", json=body)
    assert resp.status_code == 400, resp.text  # emb/sick.pt is another run's
    assert str(tmp_path / "emb" / "sick.pt") in resp.json()["detail"]
    assert '"replace_published": true' in resp.json()["detail"]
    resp = client.post(PREFIX + "/train", json={**body, "replace_published": True})
    assert resp.status_code == 200, resp.text
    ctx.trainer.wait(60)  # no model here: the run itself ends with that error, after starting


# -- item 9 follow-up: the CLI's PNGs --------------------------------------------------------------
@pytest.fixture
def cli(tiny_backend, monkeypatch):
    import medical_diffusion.generation.loading as loading
    from medical_diffusion.cli import main

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny_backend)
    return main


def _parameters(path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


def _ti(folder, *names) -> str:
    return ", ".join(f"{n}: {hashlib.sha256((folder / f'{n}.pt').read_bytes()).hexdigest()[:10]}" for n in names)


def test_interpolate_and_compose_pngs_carry_the_parameters(tmp_path, cli):
    emb = _embeddings(tmp_path / "emb", names=("healthy", "sick", "effusion"))
    base = ["--model", "tiny", "--embeddings-dir", str(emb), "--seed", "7", "--negative-prompt", "noise", *SMALL]
    assert cli(["interpolate", "--healthy", "healthy", "--diseased", "sick", "-k", "3", "--out",
                str(tmp_path / "i"), *base]) == 0
    settings = "Steps: 1, Sampler: Euler a, CFG scale: 2.0, Seed: 7, Size: 64x64, Model: tiny"
    hashes = f'TI hashes: "{_ti(emb, "healthy", "sick")}"'
    assert _parameters(tmp_path / "i" / "interpolation_01.png").splitlines() == [
        "healthy :0.5 AND sick :0.5", "Negative prompt: noise", f"{settings}, {hashes}"]
    assert _parameters(tmp_path / "i" / "interpolation_grid.png").startswith("healthy :1 AND sick :0\n")
    record = json.loads((tmp_path / "i" / "interpolation.json").read_text())
    assert set(record["embeddings"]) == {"healthy", "sick"}
    assert cli(["interpolate", "--healthy", "healthy", "--diseased", "sick", "-k", "2", "--mode", "embedding",
                "--out", str(tmp_path / "e"), *base]) == 0
    assert _parameters(tmp_path / "e" / "interpolation_00.png").endswith(hashes)  # the two blended files

    assert cli(["compose", "--base", "healthy", "--add", "effusion:0.5", "--stage-cfg", "2,3", "--out",
                str(tmp_path / "c"), *base]) == 0
    text = _parameters(tmp_path / "c" / "composition_01.png").splitlines()
    assert text[0] == "healthy :1 AND effusion :0.5"
    assert "CFG scale: 3.0, Seed: 7" in text[2] and f'TI hashes: "{_ti(emb, "effusion", "healthy")}"' in text[2]


def test_generate_pngs_carry_the_parameters_and_the_set_still_resumes(tmp_path, cli, capsys):
    folder = _embeddings(tmp_path / "one")
    out = tmp_path / "set"
    args = ["generate", "--model", "tiny", "--embedding", str(folder / "healthy.pt"), "--embedding",
            str(folder / "sick.pt"), "--prompt", "neg=healthy", "--prompt", "pos=sick", "-n", "2",
            "--out", str(out), "--seed", "3", *SMALL]
    assert cli(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["pos/00001.png"]["seed"] == 6
    text = _parameters(out / "pos" / "00001.png")
    assert text.splitlines()[0] == "sick" and "Seed: 6, Size: 64x64, Model: tiny" in text
    assert text.endswith(f'TI hashes: "{_ti(folder, "sick")}"')  # the --embedding file this prompt uses
    assert _parameters(out / "neg" / "00000.png").endswith(f'TI hashes: "{_ti(folder, "healthy")}"')
    assert cli(args) == 0
    assert "0 generated, 4 already present" in capsys.readouterr().out


def test_embedding_hashes_cover_single_files_too(tmp_path):
    from medical_diffusion.generation.outputs import embedding_hashes

    folder = _embeddings(tmp_path / "emb", names=("healthy",))
    extra = _embeddings(tmp_path / "x", names=("sick",)) / "sick.pt"
    found = embedding_hashes(folder, ["healthy :0.5 AND sick :0.5"], [extra])
    assert found["sick"] == {"file": str(extra), "sha256": hashlib.sha256(extra.read_bytes()).hexdigest()}
    assert set(found) == {"healthy", "sick"}


def test_generation_tab_sampling_defaults_follow_the_model_without_loading_it(tmp_path):
    """Issue 19 item 14: the tiny demo model offers a quick look, a real model the paper's 100 steps at 512 px."""
    gr = pytest.importorskip("gradio")
    from medical_diffusion.ui import tab_generate
    from medical_diffusion.ui.context import UIContext

    def no_model():
        raise AssertionError("building the tab must not load the model")

    def offered(model_id):
        ctx = UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "e",
                        model_id=model_id, loaded_text_width=lambda: None)
        with gr.Blocks() as demo:
            tab_generate.build(ctx)
        return {b.label: b.value for b in demo.blocks.values()
                if getattr(b, "label", None) in ("Sampling steps (paper: 100)", "Width", "Height")}

    assert offered("tiny") == {"Sampling steps (paper: 100)": 20, "Width": 128, "Height": 128}
    assert offered(str(tmp_path / "sd2.safetensors")) == {"Sampling steps (paper: 100)": 100, "Width": 512,
                                                          "Height": 512}
    assert offered("webui")["Width"] == 512
