"""Training-quality options: validation loss and best.pt, min-SNR-gamma, EMA of the vectors, TensorBoard.

Each option is off by default and, off, leaves the paper's run bit for bit unchanged. A toy backend whose
prediction depends linearly on the vectors shows that validation tracks learning (the tiny random model
learns noise); the tiny model checks the real code path: fixed draws, resume, the OFF identity.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.training import loop as loop_module
from medical_diffusion.training import tb_logging
from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.loop import train
from medical_diffusion.training.loss_weighting import min_snr_weights, snr_at, weighted_diffusion_loss
from medical_diffusion.training.run_folder import resume_config
from medical_diffusion.training.validation import BestTracker, Validator, resolve_val_dir, stratified_timesteps


# -- fixtures -----------------------------------------------------------------------------------------------
def _images(folder, n, seed, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
        a[16:48, 12 + 3 * i + shift : 40 + 3 * i + shift] = 200
        Image.fromarray(a).save(folder / f"{i:02d}_case.png")
    return folder


@pytest.fixture(autouse=True)
def _embeddings_home(tmp_path, monkeypatch):
    """`meddiff train` publishes its embedding here, never into ./embeddings of the repository."""
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(tmp_path / "embeddings_home"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("train"), 4, 0)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("val"), 2, 1, shift=2)


@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


def _config(data_dir, **kw):
    base = dict(name="blob", data_dir=str(data_dir), n_vectors=4, steps=6, resolution=64, save_every=0,
                preview_every=0, batch_size=2, learning_rate="0.05")
    base.update(kw)
    return TrainConfig(**base)


def _vectors(path):
    """The vectors of an A1111 ``.pt`` (any width: the tiny model's 32, the toy's 4)."""
    from medical_diffusion.embeddings.safe_pickle import safe_torch_load

    return safe_torch_load(path)["string_to_param"]["*"]


def _rows(path, cols=None):
    rows = list(csv.reader(open(path)))
    return [r[:cols] if cols else r for r in rows]


class ToyBackend(ModelBackend):
    """Latents = 8x8-pooled pixels; the model predicts the noise as if x0 were the first vector's first 3
    entries (a colour), so the vectors can reach the optimum (the images' mean colour)."""

    text_width = 4
    latent_channels = 3
    vae_scale_factor = 8
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, prediction_type="epsilon"):
        self.prediction_type = prediction_type
        self.alphas_cumprod = torch.linspace(0.95, 0.05, 50)

    def text_to_vectors(self, text):
        return torch.full((1, self.text_width), 0.5)

    def token_embedding_norm(self):
        return 1.0

    def encode_prompt(self, prompt, embeddings=None):
        rows = torch.zeros(1, 77, self.text_width)
        for name, vec in (embeddings or {}).items():
            if name in prompt:
                rows = torch.cat([rows[:, :1], vec.unsqueeze(0).float(), rows[:, 1 + vec.shape[0]:]], 1)
        return rows

    def encode_images(self, pixels, *, sample=False, generator=None):
        return F.avg_pool2d(pixels, 8)

    def decode_latents(self, latents):
        return F.interpolate(latents, scale_factor=8)

    def predict(self, latents, timesteps, cond):
        alpha, sigma = self._alpha_sigma(timesteps, latents)
        x0 = cond[:, 1, :3].reshape(-1, 3, 1, 1)
        eps = (latents - alpha * x0) / sigma
        return eps if self.prediction_type == "epsilon" else alpha * eps - sigma * x0


def _toy_config(data_dir, **kw):
    base = dict(name="toy", data_dir=str(data_dir), n_vectors=1, init="zeros", steps=12, resolution=64,
                save_every=0, preview_every=0, batch_size=2, learning_rate="0.05")
    base.update(kw)
    return TrainConfig(**base)


# -- validation ---------------------------------------------------------------------------------------------
def test_val_loss_uses_fixed_draws_and_leaves_training_alone(backend, data_dir, val_dir, tmp_path):
    from medical_diffusion.training.dataset import load_training_images
    from medical_diffusion.training.prompts import PromptSource

    images = load_training_images(val_dir, 64)
    vec = torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 0.1
    make = lambda: Validator(backend, images, name="blob", prompts=PromptSource("blob"), seed=0,  # noqa: E731
                             timesteps_per_image=4)
    a = make()
    torch.manual_seed(1)
    first = a.loss(vec)
    torch.manual_seed(2)  # the global RNG plays no part
    assert a.loss(vec) == first and make().loss(vec) == first  # same value each evaluation and each run
    assert a.loss(vec * 2) != first
    t = a.timesteps[0]
    assert t.shape == (4,) and [int(x) // 250 for x in t] == [0, 1, 2, 3]  # stratified over [0, T)
    draw = lambda: stratified_timesteps(5, 1000, torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(draw(), draw())

    # a run with validation trains exactly as one without; both runs' validation rows are the same
    plain = train(_config(data_dir), backend, tmp_path / "plain")
    with_val = train(_config(data_dir, val_data=str(val_dir), val_every=2, val_timesteps=4), backend, tmp_path / "v1")
    train(_config(data_dir, val_data=str(val_dir), val_every=2, val_timesteps=4), backend, tmp_path / "v2")
    assert _rows(tmp_path / "plain" / "loss.csv", 3) == _rows(tmp_path / "v1" / "loss.csv", 3)
    assert torch.equal(_vectors(plain.embedding_path), _vectors(with_val.embedding_path))
    val_rows = _rows(tmp_path / "v1" / "val_loss.csv")
    assert val_rows[0] == ["step", "val_loss"] and [int(r[0]) for r in val_rows[1:]] == [0, 2, 4, 6]
    assert val_rows == _rows(tmp_path / "v2" / "val_loss.csv")
    assert with_val.last_val_loss == pytest.approx(float(val_rows[-1][1]), rel=1e-6)
    assert not (tmp_path / "plain" / "val_loss.csv").exists() and not (tmp_path / "plain" / "best.pt").exists()
    assert (tmp_path / "v1" / "loss.png").stat().st_size > 1000


def test_val_loss_drops_and_best_pt_holds_the_minimum(val_dir, data_dir, tmp_path):
    toy = ToyBackend()
    events = []
    result = train(_toy_config(data_dir, val_data=str(val_dir), val_every=1, save_every=1, val_timesteps=3,
                               learning_rate="0.1"), toy, tmp_path / "run", progress=events.append)
    run = tmp_path / "run"
    vals = [(int(r[0]), float(r[1])) for r in _rows(run / "val_loss.csv")[1:]]
    assert [s for s, _ in vals] == list(range(13))
    # the vectors learn the images' mean colour (the floor is the images' own spatial variance)
    assert vals[-1][1] < vals[0][1] * 0.6 and all(v < vals[0][1] for _, v in vals[1:])
    best_step, best_loss = min(vals, key=lambda r: (r[1], r[0]))
    meta = json.loads((run / "best.json").read_text())
    assert meta["step"] == best_step == result.best_step and meta["val_loss"] == pytest.approx(best_loss, rel=1e-6)
    assert torch.equal(_vectors(run / "best.pt"), _vectors(run / "embeddings" / f"toy-{best_step}.pt"))
    assert [e.val_loss is not None for e in events] == [True] * 13  # step 0 (the untrained vectors) too
    assert events[0].step == 0 and math.isnan(events[0].loss) and events[0].validation_only and events[0].val_loss == pytest.approx(vals[0][1], rel=1e-6)
    assert events[-1].best_step == best_step

    # resumed with a learning rate that ruins the vectors: later validation losses are worse, best stays
    before = (run / "best.pt").read_bytes(), (run / "best.json").read_text()
    worse = train(_toy_config(data_dir, val_data=str(val_dir), val_every=1, save_every=1, val_timesteps=3,
                              steps=16, learning_rate="5"), toy, run, resume=True)
    later = [float(r[1]) for r in _rows(run / "val_loss.csv")[1:]][13:]
    assert len(later) == 4 and min(later) > best_loss
    assert ((run / "best.pt").read_bytes(), (run / "best.json").read_text()) == before
    assert worse.best_step == best_step


def test_best_files_follow_the_resumed_checkpoint_not_an_abandoned_later_step(val_dir, data_dir, tmp_path):
    """Killed after ``best.*`` was written past the last checkpoint, then resumed on another course: the
    best is the best of the steps the resumed run keeps, in the file as in the result."""
    toy, run = ToyBackend(), tmp_path / "run"
    kw = dict(val_data=str(val_dir), val_every=1, save_every=4, val_timesteps=3)
    train(_toy_config(data_dir, steps=8, learning_rate="0.1", **kw), toy, run)
    assert json.loads((run / "best.json").read_text())["step"] > 4
    for path in (run / "embeddings").glob("toy-8.pt*"):  # as if the process died before the step-8 checkpoint
        path.unlink()
    kept = [(int(r[0]), float(r[1])) for r in _rows(run / "val_loss.csv")[1:] if int(r[0]) <= 4]
    result = train(_toy_config(data_dir, steps=8, learning_rate="5", **kw), toy, run, resume=True)
    later = [float(r[1]) for r in _rows(run / "val_loss.csv")[1:] if int(r[0]) > 4]
    step, loss = min(kept, key=lambda r: (r[1], r[0]))
    assert min(later) > loss  # lr 5 ruins the vectors: the best stays among the kept steps
    meta = json.loads((run / "best.json").read_text())
    assert (meta["step"], result.best_step) == (step, step) and meta["val_loss"] == pytest.approx(loss, rel=1e-6)
    if step == 4:
        assert torch.equal(_vectors(run / "best.pt"), _vectors(run / "embeddings" / "toy-4.pt"))


def test_best_tracker_and_the_run_folder_best_files(tmp_path):
    from medical_diffusion.training.run_folder import RunFolder

    t = BestTracker()
    assert t.offer(0, 1.0) and not t.offer(1, 1.0) and not t.offer(2, float("nan")) and t.offer(3, 0.5)
    assert (t.step, t.loss) == (3, 0.5)
    run = RunFolder(tmp_path, "x")
    for s, v in [(0, 1.0), (2, 0.4), (4, 0.3), (6, 0.2)]:
        run.append_val_loss(s, v)
    run.close()
    assert run.read_best() is None
    run.save_best(torch.zeros(1, 4), 2, 0.4)
    assert run.read_best() == (2, 0.4)
    assert run.remove_best() and run.read_best() is None and not run.best_path.exists()
    assert not run.remove_best()
    run.truncate_val_losses(4)
    assert run.read_val_losses() == [(0, 1.0), (2, 0.4), (4, 0.3)]


def test_resume_equals_uninterrupted_with_every_option(backend, data_dir, val_dir, tmp_path):
    kw = dict(steps=6, save_every=3, val_data=str(val_dir), val_every=2, val_timesteps=2, min_snr_gamma=5.0,
              ema_decay=0.8, learning_rate="0.05:3, 0.01")
    train(_config(data_dir, **kw), backend, tmp_path / "full")
    calls = {"n": 0}

    def stop_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    part = train(_config(data_dir, **kw), backend, tmp_path / "part", stop=stop_after_four)
    assert part.interrupted and part.steps_done == 4
    # the stop after step 4 saved step 4; pretend the process died after its step-3 checkpoint instead
    (tmp_path / "part" / "embeddings" / "blob-4.pt").unlink()
    resumed = train(_config(data_dir, **kw), backend, tmp_path / "part", resume=True)
    assert resumed.steps_done == 6
    for name in ("blob.pt", "blob-ema.pt", "best.pt"):
        assert torch.equal(_vectors(tmp_path / "full" / name), _vectors(tmp_path / "part" / name)), name
    assert _rows(tmp_path / "full" / "loss.csv", 3) == _rows(tmp_path / "part" / "loss.csv", 3)
    assert _rows(tmp_path / "full" / "val_loss.csv") == _rows(tmp_path / "part" / "val_loss.csv")
    assert (tmp_path / "full" / "best.json").read_text() == (tmp_path / "part" / "best.json").read_text()
    state = torch.load(tmp_path / "part" / "embeddings" / "blob-6.pt.optim", weights_only=True)
    assert torch.equal(state["ema"]["shadow"], _vectors(tmp_path / "part" / "blob-ema.pt"))


def test_val_auto_finds_the_prepared_val_split(tmp_path):
    out = tmp_path / "prepared"
    train_dir = _images(out / "embedding" / "pos", 1, 0)
    val = _images(out / "classifier" / "val" / "pos", 1, 1)
    assert resolve_val_dir("auto", train_dir) == val.resolve()
    assert resolve_val_dir("auto", out / "classifier" / "train" / "pos") == val.resolve()
    assert resolve_val_dir(None, train_dir) is None
    with pytest.raises(MedDiffError, match="not a training folder of `meddiff prepare --splits`"):
        resolve_val_dir("auto", tmp_path / "elsewhere")
    with pytest.raises(MedDiffError, match="must not be the training images"):
        resolve_val_dir(str(train_dir), train_dir)


# -- min-SNR-gamma ------------------------------------------------------------------------------------------
def test_min_snr_weights_match_the_formula():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0])
    eps = min_snr_weights(snr, 5.0, "epsilon")
    v = min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51]))
    acp = torch.tensor([0.5, 0.8, 0.2])
    snr = snr_at(acp, torch.tensor([0.0, 1.0, 2.0, 0.5]))  # t = 0.5: alpha_bar 0.65 -> 0.65 / 0.35
    torch.testing.assert_close(snr, torch.tensor([1.0, 4.0, 0.25, 0.65 / 0.35]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_weighted_loss_with_unit_weights_is_the_plain_loss(prediction):
    toy = ToyBackend(prediction)
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 3, 2, 2, generator=g), torch.randn(3, 3, 2, 2, generator=g)
    t = torch.tensor([3.0, 20.0, 45.0])
    cond = toy.encode_prompt("toy", {"toy": torch.randn(1, 4, generator=g)}).expand(3, -1, -1)
    mask = torch.rand(3, 1, 2, 2, generator=g) + 0.5
    for weight in (None, mask):
        plain = toy.diffusion_loss(lat, cond, noise, t, weight)
        torch.testing.assert_close(weighted_diffusion_loss(toy, lat, cond, noise, t, weight, torch.ones(3)), plain)
    s = torch.tensor([1.0, 0.5, 0.1])
    per = [float(toy.diffusion_loss(lat[i:i + 1], cond[i:i + 1], noise[i:i + 1], t[i:i + 1])) for i in range(3)]
    expected = sum(w * p for w, p in zip(s.tolist(), per)) / 3
    assert float(weighted_diffusion_loss(toy, lat, cond, noise, t, None, s)) == pytest.approx(expected, rel=1e-5)


def test_min_snr_changes_the_loss_and_off_is_the_default_run(backend, data_dir, tmp_path, monkeypatch):
    default = train(_config(data_dir), backend, tmp_path / "default")
    off = train(_config(data_dir, min_snr_gamma=None, ema_decay=None, val_data=None, log_with="none",
                        val_every=1, val_timesteps=3), backend, tmp_path / "off")
    train(_config(data_dir, min_snr_gamma=0.05), backend, tmp_path / "snr")
    losses = lambda name: _rows(tmp_path / name / "loss.csv", 3)  # noqa: E731
    assert losses("default") == losses("off") and torch.equal(_vectors(default.embedding_path),
                                                              _vectors(off.embedding_path))
    assert losses("snr") != losses("default")
    assert float(losses("snr")[1][1]) < float(losses("default")[1][1])  # weights <= 1 on the same draws

    # with every option off the run never reaches their code: it matches the run above bit for bit
    def untouched(*args, **kwargs):
        raise AssertionError("an option's code ran although the option is off")

    for attr in ("weighted_diffusion_loss", "min_snr_weights", "VectorEma", "Validator", "resolve_val_dir",
                 "BestTracker"):
        if attr == "resolve_val_dir":
            monkeypatch.setattr(loop_module, attr, lambda val, data: untouched() if val is not None else None)
        else:
            monkeypatch.setattr(loop_module, attr, untouched)
    monkeypatch.setattr(tb_logging, "open_tensorboard", untouched)
    bare = train(_config(data_dir), backend, tmp_path / "bare")
    assert losses("bare") == losses("default") and torch.equal(_vectors(bare.embedding_path),
                                                               _vectors(default.embedding_path))
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == sorted(
        p.name for p in (tmp_path / "default").iterdir())


def test_min_snr_on_the_toy_v_prediction_learns(data_dir, tmp_path):
    result = train(_toy_config(data_dir, min_snr_gamma=2.0, steps=8), ToyBackend("v_prediction"), tmp_path / "v")
    losses = [float(r[1]) for r in _rows(tmp_path / "v" / "loss.csv")[1:]]
    assert result.steps_done == 8 and losses[-1] < losses[0]


# -- EMA ----------------------------------------------------------------------------------------------------
def test_ema_follows_the_recurrence(data_dir, tmp_path):
    toy = ToyBackend()
    decay = 0.7
    plain = train(_toy_config(data_dir, steps=4, save_every=1), toy, tmp_path / "plain")
    result = train(_toy_config(data_dir, steps=4, save_every=1, ema_decay=decay), toy, tmp_path / "ema")
    run = tmp_path / "ema"
    assert torch.equal(_vectors(plain.embedding_path), _vectors(result.embedding_path))  # EMA does not steer
    assert _rows(tmp_path / "plain" / "loss.csv", 3) == _rows(run / "loss.csv", 3)
    assert not (tmp_path / "plain" / "toy-ema.pt").exists() and result.ema_path == run / "toy-ema.pt"
    ema = torch.zeros(1, 4)  # init "zeros"
    for step in range(1, 5):
        ema = decay * ema + (1 - decay) * _vectors(run / "embeddings" / f"toy-{step}.pt")
    torch.testing.assert_close(_vectors(run / "toy-ema.pt"), ema, rtol=1e-6, atol=1e-7)
    assert not torch.equal(_vectors(run / "toy-ema.pt"), _vectors(run / "toy.pt"))


# -- TensorBoard --------------------------------------------------------------------------------------------
class FakeWriter:
    def __init__(self):
        self.scalars, self.images, self.closed = [], [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, float(value)))

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, step, np.asarray(img).shape, dataformats))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_gets_the_scalars(data_dir, val_dir, tmp_path, monkeypatch):
    writer = FakeWriter()
    opened = []
    monkeypatch.setattr(tb_logging, "tensorboard_available", lambda: True)
    monkeypatch.setattr(tb_logging, "open_tensorboard", lambda d, purge_step=None: opened.append((d, purge_step))
                        or writer)
    train(_toy_config(data_dir, steps=4, val_data=str(val_dir), val_every=2, log_with="tensorboard"),
          ToyBackend(), tmp_path / "run")
    assert opened == [(tmp_path / "run" / "tensorboard", None)] and writer.closed
    tags = {}
    for tag, step, value in writer.scalars:
        tags.setdefault(tag, []).append(step)
    assert tags["train/loss"] == tags["train/lr"] == tags["train/vector_norm"] == [1, 2, 3, 4]
    assert tags["val/loss"] == [0, 2, 4]
    losses = [float(r[1]) for r in _rows(tmp_path / "run" / "loss.csv")[1:]]
    assert [v for t, _, v in writer.scalars if t == "train/loss"] == pytest.approx(losses, rel=1e-6)
    # previews go in as images
    png = tmp_path / "p.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(png)
    tb_logging.TrainLogger(writer).preview(5, png)
    assert writer.images == [("preview", 5, (6, 8, 3), "HWC")]


def test_tensorboard_missing_is_a_clear_error_before_loading(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tb_logging, "tensorboard_available", lambda: False)
    with pytest.raises(MedDiffError, match="pip install tensorboard"):
        train(_toy_config(tmp_path / "no-such-folder", log_with="tensorboard"), ToyBackend(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_real_tensorboard_writes_events(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    train(_toy_config(data_dir, steps=2, log_with="tensorboard"), ToyBackend(), tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# -- config, resume, CLI, API -------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("val_every", -1, "val_every must be between 0 and"),
    ("val_timesteps", 0, "val_timesteps must be between 1 and 32"),
    ("val_timesteps", 33, "val_timesteps must be between 1 and 32"),
    ("min_snr_gamma", 0.0, "min_snr_gamma must be between"),
    ("min_snr_gamma", float("inf"), "min_snr_gamma must be between"),
    ("ema_decay", 1.0, "ema_decay must be between"),
    ("ema_decay", 0.0, "ema_decay must be between"),
    ("ema_decay", "0.9", "ema_decay must be float or null"),
    ("log_with", "wandb", "log_with must be one of none, tensorboard"),
    ("val_data", " ", "val data: give a folder"),
])
def test_new_settings_are_bounded(data_dir, field, value, message):
    with pytest.raises(MedDiffError, match=message):
        _config(data_dir, **{field: value}).validate()


def test_old_run_configs_load_and_resume_keeps_the_identity(data_dir, val_dir, tmp_path):
    from medical_diffusion.training.config import CONFIG_FILE

    old = {k: v for k, v in _config(data_dir).to_dict().items()
           if k not in ("val_data", "val_every", "val_timesteps", "min_snr_gamma", "ema_decay", "log_with")}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    loaded = TrainConfig.load(tmp_path / CONFIG_FILE)
    assert loaded.val_data is None and loaded.ema_decay is None and loaded.min_snr_gamma is None
    assert loaded.log_with == "none" and loaded.val_every == 500
    merged = resume_config(tmp_path, {"val_every": 7, "log_with": "tensorboard", "steps": 9})
    assert (merged.val_every, merged.log_with, merged.steps) == (7, "tensorboard", 9)
    for key, value in (("ema_decay", 0.9), ("min_snr_gamma", 5.0), ("val_data", str(val_dir)), ("val_timesteps", 2)):
        with pytest.raises(MedDiffError, match=f"keeps the run's own {key}"):
            resume_config(tmp_path, {key: value})


def test_cli_flags_reach_the_config_and_bounds_are_refused(data_dir, val_dir, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from medical_diffusion.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--data", str(data_dir), "--name", "blob", "--out", str(out), "--vectors",
            "2", "--steps", "2", "--resolution", "64", "--save-every", "0", "--preview-every", "0",
            "--val-data", str(val_dir), "--val-every", "1", "--val-timesteps", "2", "--min-snr-gamma", "5",
            "--ema-decay", "0.9", "--log-with", "none"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "best validation loss" in printed and "EMA of the vectors" in printed
    saved = TrainConfig.load(out / "run_config.json")
    assert (saved.val_data, saved.val_every, saved.val_timesteps, saved.min_snr_gamma, saved.ema_decay,
            saved.log_with) == (str(val_dir.resolve()), 1, 2, 5.0, 0.9, "none")
    assert (out / "best.pt").is_file() and (out / "blob-ema.pt").is_file() and (out / "val_loss.csv").is_file()
    assert main(["train", "--resume", str(out), "--steps", "3", "--val-every", "3"]) == 0
    assert TrainConfig.load(out / "run_config.json").val_every == 3
    assert main(["train", "--resume", str(out), "--ema-decay", "0.5"]) == 1
    assert "keeps the run's own ema_decay" in capsys.readouterr().err
    bad = ["train", "--model", "tiny", "--data", str(data_dir), "--name", "x", "--out", str(tmp_path / "x")]
    assert main(bad + ["--ema-decay", "1"]) == 1
    assert "ema_decay must be between" in capsys.readouterr().err
    assert main(bad + ["--val-timesteps", "100"]) == 1
    assert "val_timesteps must be between 1 and 32" in capsys.readouterr().err
    assert main(bad + ["--val-data", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_api_bounds_and_status(tmp_path, data_dir, val_dir, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity
    from medical_diffusion.ui.api_routes import PREFIX, make_router
    from medical_diffusion.ui.context import UIContext

    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", f"{tmp_path}:{data_dir}:{val_dir}")
    ctx = UIContext(backend_factory=ToyBackend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    from fastapi import FastAPI

    security = ServerSecurity(ApiCredentials(), None)
    app = FastAPI(middleware=[security.middleware()])
    app.include_router(make_router(ctx, dependencies=security.router_dependencies()))
    client = TestClient(app)
    base = {"name": "toy", "data_dir": str(data_dir)}
    for extra, message in [({"ema_decay": 1.5}, "ema_decay must be between"),
                           ({"val_every": -3}, "val_every must be between"),
                           ({"min_snr_gamma": 10**9}, "min_snr_gamma must be between"),
                           ({"val_timesteps": 99}, "val_timesteps must be between 1 and 32")]:
        resp = client.post(PREFIX + "/train", json={"config": dict(base, **extra)})
        assert resp.status_code == 422 and message in resp.json()["detail"], resp.text
    config = dict(_toy_config(data_dir, steps=3, val_data=str(val_dir), val_every=1, ema_decay=0.9).to_dict())
    resp = client.post(PREFIX + "/train", json={"config": config, "run_dir": str(tmp_path / "run")})
    assert resp.status_code == 200, resp.text
    state = ctx.trainer.wait(60)
    assert state.error is None, state.error
    status = client.get(PREFIX + "/train/status").json()
    assert status["best_step"] is not None and status["val_loss"] is not None and status["best"].endswith("best.pt")
    assert status["ema"].endswith("toy-ema.pt") and "val_losses" not in status
    assert "best validation loss" in status["message"]
    assert len(client.get(PREFIX + "/train/status", params={"losses": True}).json()["val_losses"]) == 4  # step 0 too


def test_tab_fields_map_to_the_config():
    pytest.importorskip("gradio")
    from medical_diffusion.ui.tab_train import quality_options

    assert quality_options("", 500, 0, 0, "none") == dict(val_data=None, val_every=500, min_snr_gamma=None,
                                                          ema_decay=None, log_with="none")
    assert quality_options(" auto ", 50, 5, 0.999, "tensorboard") == dict(
        val_data="auto", val_every=50, min_snr_gamma=5.0, ema_decay=0.999, log_with="tensorboard")


def test_tab_trains_with_the_options_and_plots_both_losses(data_dir, val_dir, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    from medical_diffusion.ui import tab_train
    from medical_diffusion.ui.context import UIContext

    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", f"{tmp_path}:{data_dir}:{val_dir}")
    ctx = UIContext(backend_factory=ToyBackend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    with gr.Blocks() as demo:
        tab_train.build(ctx)
    start = next(f.fn for f in demo.fns if f.fn.__name__ == "start")
    # name, data, run, vectors, init text, lr, steps, batch, accumulation, seed, resolution, save/preview every,
    # preview steps, latents, hflip, gradient checkpointing, resume, then val data, val every, min-SNR, EMA, log
    outputs = list(start("toy", str(data_dir), str(tmp_path / "run"), 1, "", "0.1", 4, 2, 1, 0, 64, 0, 0, 2,
                         "mean", False, False, False, str(val_dir), 2, 5, 0.9, "none"))
    message, plot, _preview = outputs[-1]
    assert message.startswith("finished at step 4") and "best validation loss" in message and "EMA" in message
    assert sorted(set(plot["series"])) == ["training", "validation"]
    assert plot[plot["series"] == "validation"]["step"].tolist() == [0, 2, 4]
    saved = TrainConfig.load(tmp_path / "run" / "run_config.json")
    assert (saved.min_snr_gamma, saved.ema_decay, saved.val_every) == (5.0, 0.9, 2)


def test_empty_validation_folder_is_named(data_dir, tmp_path):
    from medical_diffusion.errors import InputFileError

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no validation images found"):
        train(_toy_config(data_dir, val_data=str(tmp_path / "empty")), ToyBackend(), tmp_path / "run")
    with pytest.raises(InputFileError, match="validation images folder not found"):
        train(_toy_config(data_dir, val_data=str(tmp_path / "nope")), ToyBackend(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
