"""Textual Inversion training on the tiny model: learning, frozen model, resume, outputs, errors."""

from __future__ import annotations

import csv
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.embedding_init import initial_vectors
from medical_diffusion.training.loop import train
from medical_diffusion.training.lr_schedule import LearnRateSchedule




@pytest.fixture(autouse=True)
def _embeddings_home(tmp_path, monkeypatch):
    """`meddiff train` publishes its embedding here, never into ./embeddings of the repository."""
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(tmp_path / "embeddings_home"))


@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = rng.integers(0, 40, (64, 64, 4)).astype(np.uint8)
        a[16:48, 12 + 3 * i : 40 + 3 * i, :3] = 210
        a[..., 3] = 0
        a[20:40, 20:40, 3] = 255  # alpha marks a "lesion"
        Image.fromarray(a, "RGBA").save(folder / f"{i:02d}_case.png")
    return folder


def _config(data_dir, **kw):
    base = dict(name="blob", data_dir=str(data_dir), n_vectors=4, steps=6, resolution=64, save_every=0,
                preview_every=0, batch_size=2, learning_rate="0.05")
    base.update(kw)
    return TrainConfig(**base)


def _vectors(path, width=32):
    from medical_diffusion.embeddings import load_embedding

    return load_embedding(path, expected_width=width).vectors


def test_loss_decreases_and_model_stays_frozen(backend, data_dir, tmp_path):
    from medical_diffusion.training.dataset import LatentCache, load_training_images

    before = {k: v.clone() for m in (backend.unet, backend.vae, backend.text_encoder) for k, v in
              ((f"{id(m)}.{n}", p) for n, p in m.state_dict().items())}
    cache = LatentCache(backend, load_training_images(data_dir, 64))
    g = torch.Generator().manual_seed(1)
    lat = cache.latents[0].repeat(3, 1, 1, 1)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (lat.shape[0],), generator=g).float()

    def eval_loss(vec):
        with torch.no_grad():
            cond = backend.encode_prompt("blob", {"blob": vec}).expand(lat.shape[0], -1, -1)
            return float(backend.diffusion_loss(lat, cond, noise, t))

    config = _config(data_dir, steps=30, n_vectors=8)
    result = train(config, backend, tmp_path / "run")
    start = initial_vectors(backend, 8)
    trained = _vectors(result.embedding_path)
    assert result.steps_done == 30 and not result.interrupted
    assert eval_loss(trained) < eval_loss(start) * 0.995
    after = {k: v for m in (backend.unet, backend.vae, backend.text_encoder) for k, v in
             ((f"{id(m)}.{n}", p) for n, p in m.state_dict().items())}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # run folder contents
    run = tmp_path / "run"
    rows = list(csv.reader(open(run / "loss.csv")))
    assert rows[0] == ["step", "loss", "lr", "seconds"] and [int(r[0]) for r in rows[1:]] == list(range(1, 31))
    assert (run / "loss.png").stat().st_size > 1000
    assert TrainConfig.load(run / "run_config.json") == config


def test_resume_equals_uninterrupted(backend, data_dir, tmp_path):
    kw = dict(steps=6, save_every=3, grad_accumulation=2, hflip=True, latents="sample", learning_rate="0.05:3, 0.01")
    full = train(_config(data_dir, **kw), backend, tmp_path / "full")

    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    part = train(_config(data_dir, **kw), backend, tmp_path / "part", stop=stop_after_three)
    assert part.interrupted and part.steps_done == 3
    assert (tmp_path / "part" / "embeddings" / "blob-3.pt").is_file()  # the stop saved a checkpoint
    resumed = train(_config(data_dir, **kw), backend, tmp_path / "part", resume=True)
    assert resumed.steps_done == 6
    assert torch.equal(_vectors(full.embedding_path), _vectors(resumed.embedding_path))
    losses = lambda run: [r[:3] for r in csv.reader(open(run / "loss.csv"))]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_checkpoints_load_in_embedding_module_and_diffusers(backend, data_dir, tmp_path):
    result = train(_config(data_dir, steps=2, save_every=1, mask="alpha", mask_weight=4.0), backend, tmp_path / "r")
    ckpt = tmp_path / "r" / "embeddings" / "blob-2.pt"
    from medical_diffusion.embeddings import load_embedding

    emb = load_embedding(ckpt, expected_width=32)
    assert emb.name == "blob-2" and emb.step == 2 and emb.vectors.shape == (4, 32)
    assert torch.equal(emb.vectors, _vectors(result.embedding_path))
    pipe = backend.make_pipeline(own_text_encoder=True)
    pipe.load_textual_inversion(str(result.embedding_path), token="blob")
    prompt = pipe.maybe_convert_prompt("blob", pipe.tokenizer)  # diffusers expands multi-vector tokens
    ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
    assert len(ids) == 4
    weights = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weights[ids].detach(), emb.vectors)
    assert backend.text_encoder.get_input_embeddings().weight.shape[0] == 49408  # backend untouched


def test_template_and_mask_weights(backend, data_dir, tmp_path):
    from medical_diffusion.training.dataset import LatentCache, caption_for, load_training_images
    from medical_diffusion.training.prompts import PromptSource

    images = load_training_images(data_dir, 64, mask="alpha")
    cache = LatentCache(backend, images, mask_weight=3.0)
    w = cache.weights[0, 0, 0]
    assert w.shape == (8, 8) and float(w.max()) == pytest.approx(3.0) and float(w.min()) == pytest.approx(1.0)
    assert caption_for(data_dir / "00_case.png") == "case"
    template = tmp_path / "t.txt"
    template.write_text("a scan of [name], [filewords]\n\n")
    import random

    assert PromptSource("blob", template).prompts(["case"], random.Random(0)) == ["a scan of blob, case"]
    result = train(_config(data_dir, steps=2, template_file=str(template)), backend, tmp_path / "tpl")
    assert result.steps_done == 2
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(InputFileError, match=r"\[name\]"):
        PromptSource("blob", tmp_path / "bad.txt")


@pytest.mark.parametrize(
    "text, steps, total, rates",
    [
        ("0.005", 50, 50, {0: 0.005, 49: 0.005}),
        ("0.05:10, 0.005:200, 0.001", 500, 500, {0: 0.05, 9: 0.05, 10: 0.005, 199: 0.005, 200: 0.001}),
        ("0.1:5, 0.01:8", 100, 8, {4: 0.1, 5: 0.01, 7: 0.01}),
        ("1e-3:-1", 7, 7, {6: 1e-3}),
    ],
)
def test_lr_schedule(text, steps, total, rates):
    schedule = LearnRateSchedule.parse(text)
    assert schedule.total_steps(steps) == total
    for done, rate in rates.items():
        assert schedule.rate_at(done) == rate


@pytest.mark.parametrize("text", ["", "abc", "0.1:10, 0.2:5", "0.1:x", "-1"])
def test_lr_schedule_errors(text):
    with pytest.raises(MedDiffError, match="learning rate schedule"):
        LearnRateSchedule.parse(text)


def test_init_text_spreads_tokens_like_a1111(backend):
    tokens = backend.text_to_vectors("prostate mri scan")
    k = tokens.shape[0]
    vec = initial_vectors(backend, 7, "text", "prostate mri scan")
    for i in range(7):
        assert torch.equal(vec[i], tokens[i * k // 7])
    assert torch.equal(initial_vectors(backend, 3, "zeros"), torch.zeros(3, 32))
    rnd = initial_vectors(backend, 64, "random", seed=1)
    assert torch.equal(rnd, initial_vectors(backend, 64, "random", seed=1))
    assert 0 < float(rnd.norm(dim=1).mean()) < backend.token_embedding_norm() * 0.05


def test_bad_inputs(backend, data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError, match="no training images"):
        train(_config(empty), backend, tmp_path / "r1")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputFileError, match="bad.png"):
        train(_config(broken), backend, tmp_path / "r2")
    with pytest.raises(MedDiffError, match="n_vectors must be between 1 and 75"):
        train(_config(data_dir, n_vectors=76), backend, tmp_path / "r3")
    with pytest.raises(MedDiffError, match="lowercase"):
        train(_config(data_dir, name="Blob"), backend, tmp_path / "r4")
    # a run folder is never silently reused
    train(_config(data_dir, steps=1), backend, tmp_path / "r5")
    with pytest.raises(MedDiffError, match="--resume"):
        train(_config(data_dir, steps=1), backend, tmp_path / "r5")


def test_resume_with_other_width_is_refused(backend, data_dir, tmp_path):
    from medical_diffusion.backend.tiny import build_tiny_backend

    train(_config(data_dir, steps=1, save_every=1), backend, tmp_path / "run")
    wide = build_tiny_backend(seed=0, text_width=48)
    with pytest.raises(MedDiffError, match="width 32 does not match the model's token width 48"):
        train(_config(data_dir, steps=2), wide, tmp_path / "run", resume=True)


def test_cli_end_to_end(data_dir, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.tiny import save_tiny_model
    from medical_diffusion.cli import main

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data_dir), "--name", "blob", "--out", str(out),
            "--vectors", "3", "--steps", "2", "--resolution", "64", "--save-every", "1", "--preview-every", "0"]
    assert main(args) == 0
    assert "done: 2/2 steps" in capsys.readouterr().out
    assert (out / "embeddings" / "blob-1.pt").is_file() and (out / "blob.pt").is_file()
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert _vectors(out / "blob.pt").shape == (3, 32)
    assert main(["train", "--resume", str(out), "--vectors", "5"]) == 1
    assert "keeps the run's own vectors" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--data", str(tmp_path / "nope"), "--name", "x",
                 "--out", str(tmp_path / "x")]) == 1
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("before", [signal.default_int_handler, signal.SIG_IGN], ids=["default", "ignored"])
def test_ctrl_c_stops_cleanly_with_a_checkpoint(backend, data_dir, tmp_path, before):
    """The SIGINT state is set here, not inherited: pytest started as a background job has SIGINT ignored."""
    import os

    def interrupt(event):
        if event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the loop: finish the step, save, stop

    outer = signal.signal(signal.SIGINT, before)
    try:
        result = train(_config(data_dir, steps=5), backend, tmp_path / "run", progress=interrupt)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert result.interrupted and result.steps_done in (2, 3)
    assert (tmp_path / "run" / "embeddings" / f"blob-{result.steps_done}.pt").is_file()
    assert after is before  # the loop's handler is gone again


def test_gradient_checkpointing_same_result_and_autocast_runs(backend, data_dir, tmp_path):
    plain = train(_config(data_dir, steps=2), backend, tmp_path / "plain")
    ckpt = train(_config(data_dir, steps=2, gradient_checkpointing=True), backend, tmp_path / "ckpt")
    torch.testing.assert_close(_vectors(plain.embedding_path), _vectors(ckpt.embedding_path), rtol=1e-5, atol=1e-6)
    assert not backend.unet.is_gradient_checkpointing  # switched off again after the run
    bf16 = train(_config(data_dir, steps=2, autocast="bf16"), backend, tmp_path / "bf16")
    vec = _vectors(bf16.embedding_path)
    assert torch.isfinite(vec).all() and not torch.equal(vec, _vectors(plain.embedding_path))


def test_preview_images_at_fixed_seed(backend, data_dir, tmp_path):
    events = []
    kw = dict(steps=2, preview_every=2, preview_steps=2, learning_rate="1e-9")
    train(_config(data_dir, **kw), backend, tmp_path / "a", progress=events.append)
    train(_config(data_dir, **kw), backend, tmp_path / "b")
    preview = tmp_path / "a" / "previews" / "blob-2.png"
    assert events[-1].preview == preview and preview.is_file()
    a = np.asarray(Image.open(preview))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "previews" / "blob-2.png")))


def test_stop_during_a_long_preview_is_honoured(backend, data_dir, tmp_path):
    """preview_steps at its maximum: Stop is asked between sampler steps, not only between training steps."""
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3  # training step 1 and two preview sampler steps, then Stop

    kw = dict(steps=2, preview_every=1, preview_steps=150)
    result = train(_config(data_dir, **kw), backend, tmp_path / "run", stop=stop)
    assert result.interrupted and result.steps_done == 1
    assert calls["n"] <= 5  # not 150 sampler steps
    assert not (tmp_path / "run" / "previews" / "blob-1.png").exists()
    assert (tmp_path / "run" / "embeddings" / "blob-1.pt").is_file()  # the stop still saved a checkpoint


@pytest.mark.parametrize("field,value,message", [
    ("preview_steps", 10**6, "preview_steps must be between 1 and 150"),
    ("steps", 10**9, "steps must be between 1 and 1000000"),
    ("batch_size", 0, "batch_size must be between 1 and 64"),
    ("resolution", 4096, "resolution must be between 8 and 1024"),
    ("resolution", 100, "multiple of 8"),
    ("preview_cfg", float("nan"), "preview_cfg must be between"),
    ("n_vectors", "4", "n_vectors must be int, got str"),
    ("n_vectors", 4.5, "n_vectors must be int, got float"),
    ("hflip", "yes", "hflip must be bool"),
    ("mask", "", "mask: give 'alpha'"),
    ("learning_rate", "1e9", "learning rate must be between"),
])
def test_config_bounds_and_types(data_dir, field, value, message):
    from medical_diffusion.errors import OutOfRangeError

    with pytest.raises(MedDiffError, match=message) as info:
        _config(data_dir, **{field: value}).validate()
    if "between" in message:
        assert isinstance(info.value, OutOfRangeError)


def test_config_from_dict_names_missing_settings():
    with pytest.raises(MedDiffError, match="missing training setting.*data_dir"):
        TrainConfig.from_dict({"name": "x"})


def test_eta_is_shown_as_hours_minutes_seconds(tmp_path):
    from medical_diffusion.training.progress import ProgressEvent, format_duration
    from medical_diffusion.ui.context import UIContext

    assert format_duration(59213) == "16:26:53"
    assert format_duration(5) == "5 s" and format_duration(59.6) == "0:01:00" and format_duration(61) == "0:01:01"
    assert format_duration(90061) == "1 d 1 h 01 min"
    assert format_duration(3 * 86400 + 23 * 3600 + 3) == "3 d 23 h 00 min"  # not "3 d 23:00:03 (h:mm:ss)"
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path)
    ctx.trainer._on_event(ProgressEvent(step=1, total=50000, loss=0.1, lr=0.005, eta_seconds=59213.4))
    assert ctx.trainer.state.message.endswith("ETA 16:26:53") and "59213" not in ctx.trainer.state.message
