"""Training runtime on the CPU: fp32 vectors over bf16 weights, VAE offload, deferred loss reads, NaN stops."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion.backend.numerics import NAN_HINT
from medical_diffusion.errors import MedDiffError
from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.loop import offload_vae_wanted, sync_interval, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        a[16:48, 10 + 4 * i : 40 + 4 * i] = 200
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def _config(data_dir, **kw):
    base = dict(name="blob", data_dir=str(data_dir), n_vectors=4, steps=3, resolution=64, save_every=0,
                preview_every=0, learning_rate="0.05")
    base.update(kw)
    return TrainConfig(**base)


def _state(run_dir):
    files = sorted((run_dir / "state").glob("*.pt")) if (run_dir / "state").is_dir() else []
    return files


class Wrapped:
    """A backend seen through a wrapper: records VAE moves, can claim another VAE home or dtype."""

    def __init__(self, inner, vae_home="cpu", dtype=None):
        self._inner = inner
        self.moves: list[str] = []
        self._where = torch.device(vae_home)
        self.dtype = dtype or inner.dtype

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def num_train_timesteps(self):
        return self._inner.num_train_timesteps

    @property
    def vae_device(self):
        return self._where

    def place_vae(self, device):
        self._where = torch.device(device)
        self.moves.append(str(device))


def test_bf16_weights_keep_fp32_vectors_gradient_and_adamw_state(data_dir, tmp_path):
    pytest.importorskip("diffusers")  # the tiny model of the standalone backend
    from medical_diffusion.backend.tiny import build_tiny_backend

    backend = build_tiny_backend(seed=0, dtype=torch.bfloat16)
    assert next(backend.unet.parameters()).dtype is torch.bfloat16
    assert next(backend.text_encoder.parameters()).dtype is torch.bfloat16
    seen = {}
    original = torch.optim.AdamW.step

    def spy(self, *a, **k):  # look at the parameter, its gradient and the moments at the first step
        p = self.param_groups[0]["params"][0]
        seen.setdefault("param", p.dtype)
        seen.setdefault("grad", (p.grad.dtype, bool(torch.isfinite(p.grad).all()), float(p.grad.abs().sum())))
        out = original(self, *a, **k)
        seen.setdefault("moments", tuple(self.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq")))
        return out

    losses = []
    torch.optim.AdamW.step = spy
    try:
        result = train(_config(data_dir, steps=2), backend, tmp_path / "run",
                       progress=lambda e: losses.append(e.loss))
    finally:
        torch.optim.AdamW.step = original
    assert seen["param"] is torch.float32
    grad_dtype, grad_finite, grad_size = seen["grad"]
    assert grad_dtype is torch.float32 and grad_finite and grad_size > 0
    assert seen["moments"] == (torch.float32, torch.float32)
    assert len(losses) == 2 and all(np.isfinite(losses))
    from medical_diffusion.embeddings import load_embedding
    from medical_diffusion.training.embedding_init import initial_vectors

    trained = load_embedding(result.embedding_path, expected_width=32).vectors
    start = initial_vectors(backend, 4, "text", "*")
    assert trained.dtype is torch.float32 and torch.isfinite(trained).all()
    assert not torch.allclose(trained, start.float())  # the vectors moved
    assert next(backend.unet.parameters()).dtype is torch.bfloat16  # frozen weights untouched


def test_vectors_are_cast_to_the_encoder_dtype_only_inside_the_forward():
    pytest.importorskip("diffusers")  # the tiny model of the standalone backend
    from medical_diffusion.backend.tiny import build_tiny_backend

    backend = build_tiny_backend(seed=0, dtype=torch.bfloat16)
    param = torch.nn.Parameter(torch.randn(3, 32) * 0.1)
    cond = backend.encode_prompt("blob", {"blob": param})
    assert cond.dtype is torch.bfloat16 and param.dtype is torch.float32
    cond.float().square().mean().backward()
    assert param.grad is not None and param.grad.dtype is torch.float32 and param.grad.abs().sum() > 0


def test_token_norm_needs_no_fp32_copy_of_the_table(tiny_backend, monkeypatch):
    weight = tiny_backend.token_embedding.weight
    expected = float(weight.detach().double().norm(dim=1).mean())
    assert tiny_backend.token_embedding_norm() == pytest.approx(expected, rel=1e-5)
    rows = []
    real_float = torch.Tensor.float

    def watch(self, *a, **k):
        rows.append(self.shape[0] if self.ndim else 0)
        return real_float(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "float", watch)
    tiny_backend.token_embedding_norm()
    assert rows and max(rows) <= 4096 < weight.shape[0]  # upcast in row blocks, never the whole table


def test_offload_defaults():
    cfg = TrainConfig(name="a", data_dir=".")
    assert offload_vae_wanted(cfg, torch.device("cuda")) and not offload_vae_wanted(cfg, torch.device("cpu"))
    cfg.offload_vae = False
    assert not offload_vae_wanted(cfg, torch.device("cuda"))
    cfg.offload_vae = True
    assert offload_vae_wanted(cfg, torch.device("cpu"))
    assert sync_interval(TrainConfig(name="a", data_dir="."), torch.device("cuda")) == 10
    assert sync_interval(TrainConfig(name="a", data_dir="."), torch.device("cpu")) == 1
    assert sync_interval(TrainConfig(name="a", data_dir=".", sync_every=3), torch.device("cuda")) == 3


def test_vae_goes_to_cpu_after_caching_and_home_only_for_previews(tiny_backend, data_dir, tmp_path, monkeypatch):
    import medical_diffusion.generation.sampling as sampling
    import medical_diffusion.training.loop as loop

    backend = Wrapped(tiny_backend, vae_home="meta")  # "meta" stands for the GPU: only the moves are recorded
    log = []
    real_cache, real_sample = loop.LatentCache, sampling.sample_images

    def cache(*a, **k):
        log.append(("cache", str(backend.vae_device)))
        return real_cache(*a, **k)

    def sample(*a, **k):
        log.append(("preview", str(backend.vae_device)))
        return real_sample(*a, **k)

    monkeypatch.setattr(loop, "LatentCache", cache)
    monkeypatch.setattr(sampling, "sample_images", sample)
    monkeypatch.setattr(tiny_backend, "place_vae", lambda device: None)  # the real VAE stays usable on the CPU
    train(_config(data_dir, steps=4, preview_every=2, preview_steps=2, offload_vae=True), backend, tmp_path / "r")
    assert log == [("cache", "meta"), ("preview", "meta"), ("preview", "meta")]
    # cached on its home, parked, home for each preview and parked again, home at the end
    assert backend.moves == ["cpu", "meta", "cpu", "meta", "cpu", "meta"]


def test_no_offload_means_no_moves(tiny_backend, data_dir, tmp_path):
    backend = Wrapped(tiny_backend)
    train(_config(data_dir, steps=2, preview_every=2, preview_steps=2, offload_vae=False), backend, tmp_path / "r")
    assert backend.moves == []


def test_place_vae_moves_the_real_vae():
    pytest.importorskip("diffusers")  # the tiny model of the standalone backend
    from medical_diffusion.backend.tiny import build_tiny_backend

    backend = build_tiny_backend(seed=1)
    backend.place_vae("meta")
    assert backend.vae_device == torch.device("meta") and next(backend.vae.parameters()).device.type == "meta"
    assert next(backend.unet.parameters()).device.type == "cpu"


def test_deferred_loss_reads_log_every_step_and_change_nothing(tiny_backend, data_dir, tmp_path):
    from medical_diffusion.embeddings import load_embedding

    events_a, events_b = [], []
    a = train(_config(data_dir, steps=7, save_every=5), tiny_backend, tmp_path / "a", progress=events_a.append)
    b = train(_config(data_dir, steps=7, save_every=5, sync_every=3), tiny_backend, tmp_path / "b",
              progress=events_b.append)
    assert [e.step for e in events_b] == list(range(1, 8)) == [e.step for e in events_a]
    assert [e.loss for e in events_a] == pytest.approx([e.loss for e in events_b], rel=1e-6)
    assert events_b[4].checkpoint is not None and all(e.it_per_s and e.it_per_s > 0 for e in events_b)
    rows = list(csv.reader(open(tmp_path / "b" / "loss.csv")))
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 8))
    va = load_embedding(a.embedding_path, expected_width=32).vectors
    vb = load_embedding(b.embedding_path, expected_width=32).vectors
    torch.testing.assert_close(va, vb)


def _nan_from(backend, step_no):
    """Make the model's prediction NaN from training step ``step_no`` (1-based) on."""
    calls = [0]
    real = backend.predict

    def predict(latents, t, cond):
        calls[0] += 1
        out = real(latents, t, cond)
        return out * float("nan") if calls[0] >= step_no else out

    return predict


def test_nan_loss_in_fp16_stops_with_the_hint_and_keeps_the_last_finite_state(tiny_backend, data_dir, tmp_path,
                                                                             monkeypatch):
    from medical_diffusion.embeddings import load_embedding

    backend = Wrapped(tiny_backend, dtype=torch.float16)  # the loop sees fp16 weights (the message's case)
    monkeypatch.setattr(tiny_backend, "predict", _nan_from(tiny_backend, 3))
    with pytest.raises(MedDiffError) as info:
        train(_config(data_dir, steps=5), backend, tmp_path / "run")
    message = str(info.value)
    assert message.startswith("step 3: the loss is not finite") and NAN_HINT in message
    assert "keeps step 2" in message and "\n" not in message
    saved = load_embedding(tmp_path / "run" / "embeddings" / "blob-2.pt", expected_width=32).vectors
    assert torch.isfinite(saved).all()
    assert not (tmp_path / "run" / "embeddings" / "blob-3.pt").exists()


def test_nan_with_deferred_reads_rolls_back_to_the_last_read(tiny_backend, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_backend, "predict", _nan_from(tiny_backend, 5))
    with pytest.raises(MedDiffError) as info:
        train(_config(data_dir, steps=8, sync_every=3), tiny_backend, tmp_path / "run")
    message = str(info.value)
    assert message.startswith("step 5:") and "keeps step 3" in message
    assert NAN_HINT not in message and "lower learning rate" in message  # fp32: no fp16 hint
    rows = list(csv.reader(open(tmp_path / "run" / "loss.csv")))
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]


def test_nan_latents_or_decode_in_fp16_name_the_fix(tiny_backend):
    from medical_diffusion.backend.numerics import check_finite

    with pytest.raises(MedDiffError, match="sampled latents is not finite"):
        tiny_backend.decode_latents(torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(MedDiffError) as info:
        check_finite(torch.tensor([float("inf")]), "the VAE's decoded image", torch.float16)
    assert NAN_HINT in str(info.value)
    check_finite(torch.ones(2), "fine", torch.float16)
