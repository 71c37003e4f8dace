"""WebuiBackend logic against a small fake ``modules`` package (the real proof is a webui run)."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch


class _Posterior:
    def __init__(self, mean):
        self.mean = mean
        self.std = torch.ones_like(mean) * 0.5


class _FakeDB:
    def __init__(self):
        self.word_embeddings = {}

    def register_embedding_by_name(self, embedding, model, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding


class _FakeCond:
    """Splices registered embeddings in where their name is a word of the prompt."""

    def __init__(self, db, width=8):
        self.db, self.width = db, width
        self.wrapped = types.SimpleNamespace(model=types.SimpleNamespace(token_embedding=torch.nn.Embedding(10, width)))

    def encode_embedding_init_text(self, text, nvpt):
        return torch.ones(len(text.split()) or 1, self.width)

    def __call__(self, prompts):
        rows = [self.db.word_embeddings[w].vec if w in self.db.word_embeddings else torch.zeros(1, self.width)
                for w in prompts[0].split()]
        return torch.cat(rows)[None]


class _FakeModel:
    parameterization = "v"
    scale_factor = 0.18215

    def __init__(self, db):
        self.cond_stage_model = _FakeCond(db)
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def encode_first_stage(self, x):
        return _Posterior(x[:, :1].repeat(1, 4, 1, 1)[:, :, ::8, ::8])

    def decode_first_stage(self, z):
        return z * 10

    def apply_model(self, x, t, c):
        return x * 0 + c.mean()


@pytest.fixture
def fake_modules(monkeypatch):
    db = _FakeDB()
    model = _FakeModel(db)

    class Embedding:
        def __init__(self, vec, name, step=None):
            self.vec, self.name, self.step = vec, name, step

    pkgs = {
        "modules": types.ModuleType("modules"),
        "modules.devices": types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                                                 autocast=contextlib.nullcontext),
        "modules.shared": types.SimpleNamespace(sd_model=model),
        "modules.sd_hijack": types.SimpleNamespace(model_hijack=types.SimpleNamespace(embedding_db=db)),
        "modules.textual_inversion": types.ModuleType("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": types.SimpleNamespace(Embedding=Embedding),
    }
    for name, mod in pkgs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("devices", "shared", "sd_hijack", "textual_inversion"):
        setattr(pkgs["modules"], name, pkgs[f"modules.{name}"])
    return types.SimpleNamespace(db=db, model=model, Embedding=Embedding)


def test_encode_prompt_splices_trainable_vectors_and_restores_db(fake_modules):
    from medical_diffusion.webui.backend import WebuiBackend

    old = fake_modules.Embedding(torch.full((1, 8), 7.0), "prostate_neg")
    fake_modules.db.word_embeddings["prostate_neg"] = old
    backend = WebuiBackend()
    assert backend.text_width == 8 and backend.prediction_type == "v_prediction"

    vec = torch.randn(3, 8, requires_grad=True)
    cond = backend.encode_prompt("prostate_neg", {"prostate_neg": vec})
    assert torch.equal(cond[0], vec.detach())
    cond.sum().backward()
    assert vec.grad is not None and torch.equal(vec.grad, torch.ones_like(vec))
    assert fake_modules.db.word_embeddings["prostate_neg"] is old  # the user's embedding is back

    backend.encode_prompt("new_name", {"new_name": vec})
    assert "new_name" not in fake_modules.db.word_embeddings  # temporary registration removed


def test_latents_are_scaled_and_sampling_uses_generator(fake_modules):
    from medical_diffusion.webui.backend import WebuiBackend

    backend = WebuiBackend()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    mean = backend.encode_images(pixels)
    assert mean.shape == (1, 4, 8, 8)
    assert torch.allclose(mean, 0.18215 * pixels[:, :1, ::8, ::8].repeat(1, 4, 1, 1))
    a = backend.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    b = backend.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_name_only_template_for_a1111_train_tab(tmp_path):
    from medical_diffusion.webui.callbacks import NAME_ONLY_TEMPLATE, install_name_only_template

    path = install_name_only_template(tmp_path)
    assert path == tmp_path / NAME_ONLY_TEMPLATE and path.read_text() == "[name]\n"
    path.write_text("[name], edited by the user\n")
    install_name_only_template(tmp_path)
    assert path.read_text() == "[name], edited by the user\n"  # never overwritten
    assert install_name_only_template(tmp_path / "missing") is None


def test_api_registers_once_and_honours_webui_api_auth(monkeypatch, tmp_path):
    import base64

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.webui import api, tabs

    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    monkeypatch.setattr(tabs, "shared_context", lambda: ctx)
    cmd_opts = types.SimpleNamespace(api_auth="alice:secret,bob:pw")
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.shared", types.SimpleNamespace(cmd_opts=cmd_opts))
    sys.modules["modules"].shared = sys.modules["modules.shared"]

    app = FastAPI()
    api.on_app_started(None, app)
    api.on_app_started(None, app)  # a UI reload calls it again
    paths = [r.path for r in app.routes if r.path.startswith("/medical-diffusion/v1")]
    assert len(paths) == len(set(paths)) == 5

    client = TestClient(app)
    assert client.get("/medical-diffusion/v1/train/status").status_code == 401
    wrong = base64.b64encode(b"alice:nope").decode()
    assert client.get("/medical-diffusion/v1/train/status", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    good = base64.b64encode(b"bob:pw").decode()
    resp = client.get("/medical-diffusion/v1/train/status", headers={"Authorization": f"Basic {good}"})
    assert resp.status_code == 200 and resp.json()["running"] is False


def test_api_open_without_webui_api_auth(monkeypatch, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.webui import api, tabs

    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    monkeypatch.setattr(tabs, "shared_context", lambda: ctx)
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.shared", types.SimpleNamespace(cmd_opts=types.SimpleNamespace(api_auth=None)))
    sys.modules["modules"].shared = sys.modules["modules.shared"]
    app = FastAPI()
    api.on_app_started(None, app)
    assert TestClient(app).post("/medical-diffusion/v1/train/stop").json()["running"] is False


def test_settings_reach_the_tabs_defaults(monkeypatch, tmp_path):
    from medical_diffusion.webui import callbacks, tabs

    added = {}

    class Opts:
        def add_option(self, key, info):
            added[key] = info
            setattr(self, key, info.default)

    opts = Opts()
    shared = types.SimpleNamespace(
        opts=opts, data_path=str(tmp_path), cmd_opts=types.SimpleNamespace(embeddings_dir=str(tmp_path / "emb")),
        OptionInfo=lambda default, label, section: types.SimpleNamespace(default=default, label=label, section=section))
    modules = types.ModuleType("modules")
    modules.shared = shared
    modules.call_queue = types.SimpleNamespace(queue_lock=contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(sys.modules, "modules.call_queue", modules.call_queue)
    monkeypatch.setitem(sys.modules, "modules.devices", types.SimpleNamespace())

    callbacks.on_ui_settings()
    assert {k for k, _, _ in callbacks.SETTINGS} == set(added)
    assert all(info.section == callbacks.SECTION for info in added.values())
    opts.medical_diffusion_default_vectors = 16
    opts.medical_diffusion_resnet18_weights = "/models/resnet18-f37072fd.pth"
    ctx = tabs.make_context()
    assert ctx.defaults["vectors"] == 16 and ctx.defaults["resnet18_weights"].endswith("f37072fd.pth")
    opts.medical_diffusion_default_vectors = 8  # a changed setting applies without a UI reload
    assert ctx.defaults["vectors"] == 8 and dict(ctx.defaults)["learning_rate"] == "0.005"
    assert ctx.work_dir == tmp_path / "medical_diffusion" and ctx.embeddings_dir == tmp_path / "emb"


def test_generation_goes_through_webui_processing(monkeypatch):
    from PIL import Image

    from medical_diffusion.webui import generation

    made = []

    class Processing:
        def __init__(self, **kwargs):
            self.kwargs, self.closed = kwargs, False
            made.append(self)

        def close(self):
            self.closed = True

    processing = types.SimpleNamespace(
        StableDiffusionProcessingTxt2Img=type("T2I", (Processing,), {}),
        StableDiffusionProcessingImg2Img=type("I2I", (Processing,), {}),
        process_images=lambda p: types.SimpleNamespace(images=[Image.new("RGB", (8, 8))] * p.kwargs["batch_size"]),
    )
    jobs = []
    state = types.SimpleNamespace(interrupted=False, begin=lambda job="": jobs.append(job), end=lambda: jobs.append("end"))
    modules = types.ModuleType("modules")
    modules.processing, modules.shared = processing, types.SimpleNamespace(sd_model="model", state=state)
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setitem(sys.modules, "modules.shared", modules.shared)

    images = generation.txt2img("a :0.5 AND b :0.5", seed=7, steps=100, cfg_scale=2.0, batch_size=2)
    t2i = made[-1].kwargs
    assert len(images) == 2 and made[-1].closed
    assert jobs == ["medical-diffusion", "end"]  # the webui's progress state and Interrupt cover the job
    assert t2i["sampler_name"] == "Euler a" and t2i["seed"] == 7 and t2i["cfg_scale"] == 2.0
    assert t2i["prompt"] == "a :0.5 AND b :0.5" and t2i["do_not_save_samples"] and t2i["sd_model"] == "model"

    generation.inpaint(Image.new("RGB", (16, 16)), Image.new("L", (16, 16)), "tumour", fill="latent noise",
                       mask_blur=6, only_masked=True, padding=40, denoising_strength=0.9)
    i2i = made[-1].kwargs
    assert i2i["inpainting_fill"] == 2 and i2i["mask_blur"] == 6 and i2i["inpaint_full_res"] is True
    assert i2i["inpaint_full_res_padding"] == 40 and i2i["denoising_strength"] == 0.9
    assert i2i["mask"].mode == "L" and i2i["init_images"][0].mode == "RGB"
    with pytest.raises(ValueError, match="fill mode"):
        generation.inpaint(Image.new("RGB", (4, 4)), Image.new("L", (4, 4)), "x", fill="blur")


def test_tabs_build_before_the_webui_has_loaded_a_model(monkeypatch, tmp_path):
    """The webui builds extension tabs while its checkpoint still loads (or when it failed to load):
    the tabs must neither wait for a model nor fail; embedding lists then skip the width check."""
    from medical_diffusion.embeddings import Embedding, save_embedding
    from medical_diffusion.ui.app import build_blocks
    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.webui import tabs

    modules = types.ModuleType("modules")
    modules.sd_models = types.SimpleNamespace(model_data=types.SimpleNamespace(sd_model=None))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.sd_models", modules.sd_models)
    assert tabs.loaded_text_width() is None

    save_embedding(Embedding("lesion", torch.zeros(2, 1024)), tmp_path / "emb" / "lesion.pt")

    def no_model():
        raise AssertionError("the model was asked for while building the tabs")

    ctx = UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    cache_backend=False, loaded_text_width=tabs.loaded_text_width)
    blocks = build_blocks(ctx)
    choices = [c for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "md_gen_healthy"
               for c in block.choices]
    assert [c[0] if isinstance(c, tuple) else c for c in choices] == ["lesion"]
