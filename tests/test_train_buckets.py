"""Aspect-ratio bucketing: the grid, image placement, per-bucket latent cache, batch order, square path intact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion.errors import MedDiffError
from medical_diffusion.training.buckets import (
    BucketBatchOrder,
    BucketedLatentCache,
    bucket_counts,
    bucket_grid,
    bucket_summary,
    load_bucketed_images,
    nearest_bucket,
    placement_for,
)
from medical_diffusion.training.dataset import LatentCache, load_training_images

#: the tiny tests' grid step (the tiny UNet wants even latent sides)
STEP = 16
SIZES = [(40, 80), (80, 40), (64, 64), (40, 80), (42, 80), (64, 64), (80, 40)]  # (width, height)


@pytest.fixture(autouse=True)
def _embeddings_home(tmp_path, monkeypatch):
    """`meddiff train` publishes its embedding here, never into ./embeddings of the repository."""
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(tmp_path / "embeddings_home"))


@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


def _write(folder, sizes, seed=0):
    """RGBA images of ``sizes``: noise, a bright bar, an alpha "lesion"; plus a masks folder at twice the size."""
    rng = np.random.default_rng(seed)
    (folder / "masks").mkdir()
    for i, (w, h) in enumerate(sizes):
        a = rng.integers(0, 60, (h, w, 4)).astype(np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2, :3] = 220
        a[..., 3] = 0
        a[h // 4 : h // 2, w // 4 : w // 2, 3] = 255  # the "lesion" is the bar (off centre)
        Image.fromarray(a, "RGBA").save(folder / f"{i:02d}_case.png")
        Image.fromarray(np.repeat(np.repeat(a[..., 3], 2, 0), 2, 1), "L").save(folder / "masks" / f"{i:02d}_case.png")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("buckets"), SIZES)


class CountingBackend:
    """The tiny backend, counting the images it encodes."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, 0

    def encode_images(self, pixels, **kw):
        self.encoded += len(pixels)
        return self.inner.encode_images(pixels, **kw)


# -- the grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (1024, 64), (520, 64), (64, 16), (64, 8)])
def test_grid_bounded_and_both_orientations(resolution, step):
    grid = bucket_grid(resolution, step=step)
    assert (resolution, resolution) in grid
    assert len(set(grid)) == len(grid)
    for w, h in grid:
        assert w * h <= resolution * resolution
        assert 0.5 <= w / h <= 2.0
        if w != h:
            assert w % step == 0 and h % step == 0 and min(w, h) >= step
            assert (h, w) in grid  # both orientations
    assert any(w < h for w, h in grid) and any(w > h for w, h in grid)
    assert [w / h for w, h in grid] == sorted(w / h for w, h in grid)  # portrait first


def test_grid_sd_values_and_bad_arguments():
    assert bucket_grid(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert (320, 768) in bucket_grid(512, max_aspect=2.5)
    assert bucket_grid(64, step=64) == [(64, 64)]
    for kw in (dict(resolution=60), dict(resolution=512, step=60), dict(resolution=512, max_aspect=0.5),
               dict(resolution=512, max_aspect=9)):
        with pytest.raises(MedDiffError):
            bucket_grid(**kw)


def test_nearest_bucket_is_closest_in_log_aspect():
    grid = bucket_grid(512)
    for w, h in [(1, 2), (2, 1), (3, 4), (4, 3), (1, 1), (2048, 2500), (100, 1000), (1000, 100), (37, 41)]:
        k = nearest_bucket(w, h, grid)
        dist = [abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in grid]
        assert dist[k] == min(dist)
    assert grid[nearest_bucket(2048, 2500, grid)] == (448, 576)  # a portrait chest X-ray
    assert grid[nearest_bucket(900, 900, grid)] == (512, 512)


def test_placement_keeps_the_largest_centred_region():
    assert placement_for(64, 128, (32, 64)).box is None  # aspect matches: the whole image
    wide = placement_for(100, 40, (80, 48))  # wider than the bucket: full height, sides trimmed
    left, top, right, bottom = wide.box
    assert (top, bottom) == (0.0, 1.0) and left == pytest.approx(1 - right)
    assert (right - left) * 100 / 40 == pytest.approx(80 / 48)
    tall = placement_for(40, 80, (48, 80))
    left, top, right, bottom = tall.box
    assert (left, right) == (0.0, 1.0) and top == pytest.approx(1 - bottom)
    assert 40 / ((bottom - top) * 80) == pytest.approx(48 / 80)


# -- loading ------------------------------------------------------------------------------

def test_bucketed_images_keep_their_aspect(data_dir):
    images = load_bucketed_images(data_dir, 64, step=STEP)
    square = load_training_images(data_dir, 64)
    assert [im.path for im in images] == [im.path for im in square]
    assert [im.caption for im in images] == [im.caption for im in square]
    grid = bucket_grid(64, step=STEP)
    for (w, h), im in zip(SIZES, images):
        bh, bw = im.pixels.shape[-2:]
        assert (bw, bh) in grid
        assert (bw, bh) == grid[nearest_bucket(w, h, grid)]
        assert abs(math.log(bw / bh) - math.log(w / h)) < 0.2
        assert im.pixels.shape[0] == 3 and im.mask is None
    assert bucket_counts(images) == {(48, 80): 3, (64, 64): 2, (80, 48): 2}
    assert bucket_summary(images) == "48x80: 3, 64x64: 2, 80x48: 2"


def test_square_path_is_a_plain_resize(data_dir):
    """``load_training_images``: the same bicubic resize and tensors as before bucketing existed."""
    images = load_training_images(data_dir, 64, mask="alpha")
    for i in (0, 1, 2):
        img = Image.open(data_dir / f"{i:02d}_case.png").convert("RGBA").resize((64, 64), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        assert torch.equal(images[i].pixels, arr[:3] * 2 - 1)
        assert torch.equal(images[i].mask, arr[3:4])
    masks = load_training_images(data_dir, 64, mask=str(data_dir / "masks"))
    m = Image.open(data_dir / "masks" / "01_case.png").convert("L").resize((64, 64), Image.BILINEAR)
    assert torch.equal(masks[1].mask, torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None])


def test_square_images_bucket_exactly_as_the_square_path(data_dir):
    images = load_bucketed_images(data_dir, 64, mask="alpha", step=STEP)
    square = load_training_images(data_dir, 64, mask="alpha")
    for (w, h), a, b in zip(SIZES, images, square):
        if w == h:
            assert torch.equal(a.pixels, b.pixels) and torch.equal(a.mask, b.mask)


def test_bucketed_crop_matches_pil(data_dir):
    """A 40x80 image in the 48x80 bucket: its centred 40x66.67 region resized (one bicubic pass)."""
    im = load_bucketed_images(data_dir, 64, step=STEP)[0]
    src = Image.open(data_dir / "00_case.png").convert("RGB")
    keep = 40 * 80 / 48
    want = src.resize((48, 80), Image.BICUBIC, box=(0, (80 - keep) / 2, 40, (80 + keep) / 2))
    assert torch.equal(im.pixels, torch.from_numpy(np.asarray(want, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.parametrize("mask", ["alpha", "folder"])
def test_masks_follow_the_crop(data_dir, mask):
    """The alpha channel and a mask file twice the image's size land on the bright bar they mark after the crop."""
    images = load_bucketed_images(data_dir, 64, mask=str(data_dir / "masks") if mask == "folder" else "alpha",
                                  step=STEP)
    rgb = load_bucketed_images(data_dir, 64, step=STEP)  # RGB: the bar among noise, alpha ignored
    for im, plain in zip(images, rgb):
        assert im.mask.shape[-2:] == im.pixels.shape[-2:]
        assert _iou(im.mask[0] > 0.5, plain.pixels.mean(0) > 0) > 0.95
    # a mask stretched to the bucket instead (no crop) would miss the bar of a cropped image
    im = images[0]
    stretched = Image.open(data_dir / "masks" / "00_case.png").resize((48, 80), Image.BILINEAR)
    stretched = torch.from_numpy(np.asarray(stretched, dtype=np.float32) / 255.0)
    assert _iou(stretched > 0.5, rgb[0].pixels.mean(0) > 0) < 0.85
    if mask == "folder":
        src = Image.open(data_dir / "masks" / "00_case.png")  # 80x160: the image's box, in its own pixels
        keep = 80 * 80 / 48
        want = src.resize((48, 80), Image.BILINEAR, box=(0, (160 - keep) / 2, 80, (160 + keep) / 2))
        assert torch.equal(im.mask[0], torch.from_numpy(np.asarray(want, dtype=np.float32) / 255.0))


def test_loader_errors_still_reported_together(tmp_path):
    folder = _write(tmp_path, [(40, 80), (64, 64)])
    (folder / "masks" / "01_case.png").unlink()
    (folder / "03_broken.png").write_bytes(b"not a png")
    with pytest.raises(MedDiffError, match="2 training files are unusable"):
        load_bucketed_images(folder, 64, mask=str(folder / "masks"), step=STEP)


# -- the cache ----------------------------------------------------------------------------

def test_cache_encodes_each_image_once_per_view(backend, data_dir):
    images = load_bucketed_images(data_dir, 64, mask="alpha", step=STEP)
    counting = CountingBackend(backend)
    cache = BucketedLatentCache(counting, images, hflip=True, mask_weight=3.0, encode_batch=2)
    assert counting.encoded == 2 * len(images)
    assert len(cache) == len(images) and cache.captions == [im.caption for im in images]
    assert cache.buckets == [(48, 80), (64, 64), (80, 48)]
    for i, im in enumerate(images):
        bh, bw = im.pixels.shape[-2:]
        assert cache.buckets[cache.bucket_of[i]] == (bw, bh)
        assert cache.latent(i).shape == (4, bh // 8, bw // 8)
    with torch.no_grad():
        direct = backend.encode_images(images[0].pixels[None]).float().cpu()[0]
        flipped = backend.encode_images(images[0].pixels.flip(-1)[None]).float().cpu()[0]
    assert torch.allclose(cache.latent(0), direct, atol=1e-4)
    assert torch.allclose(cache.latent(0, flipped=True), flipped, atol=1e-4)

    portrait = [i for i, b in enumerate(cache.bucket_of) if b == 0]
    lat, weight = cache.batch(portrait, [False, True, False, True])  # flips may be longer (partial batch)
    assert lat.shape == (3, 4, 10, 6) and weight.shape == (3, 1, 10, 6)
    assert torch.equal(lat[0], cache.latent(portrait[0])) and torch.equal(lat[1], cache.latent(portrait[1], True))
    assert torch.equal(weight[1], weight[1].flip(-1).flip(-1)) and float(weight.max()) > 2.0
    assert torch.equal(cache.batch(portrait[1:2], [True])[1], cache.batch(portrait[1:2], [False])[1].flip(-1))
    with pytest.raises(ValueError, match="one aspect bucket"):
        cache.batch([portrait[0], cache.bucket_of.index(1)], [False, False])
    with pytest.raises(ValueError):
        cache.batch(portrait, [False])


def test_one_bucket_cache_equals_the_square_cache(backend, tmp_path):
    """All-square images: bucketing gives the very latents (and sampled noise) of the square path."""
    folder = _write(tmp_path, [(64, 64), (96, 96), (32, 32)])
    images = load_bucketed_images(folder, 64, mask="alpha", step=STEP)
    square = load_training_images(folder, 64, mask="alpha")
    kw = dict(sample=True, hflip=True, mask_weight=2.0, seed=11, encode_batch=2)
    a, b = BucketedLatentCache(backend, images, **kw), LatentCache(backend, square, **kw)
    assert a.buckets == [(64, 64)]
    assert torch.equal(a.latents[0], b.latents) and torch.equal(a.weights[0], b.weights)
    assert all(torch.equal(x, y) for x, y in zip(a.batch([2, 0], [True, False]), b.batch([2, 0], [True, False])))


def test_bucket_batch_runs_through_the_model(backend, data_dir):
    cache = BucketedLatentCache(backend, load_bucketed_images(data_dir, 64, step=STEP))
    cond = backend.encode_prompt("a chest x-ray")
    for b in range(len(cache.buckets)):
        idx = [i for i, k in enumerate(cache.bucket_of) if k == b]
        lat, _ = cache.batch(idx, [False] * len(idx))
        g = torch.Generator().manual_seed(0)
        noise, t = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (len(idx),), generator=g).float()
        with torch.no_grad():
            assert torch.isfinite(backend.diffusion_loss(lat, cond.expand(len(idx), -1, -1), noise, t))


# -- the batch order ----------------------------------------------------------------------

BUCKET_OF = [0, 1, 2, 0, 0, 2, 1, 0, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 20])
def test_order_every_image_once_per_epoch_one_bucket_per_batch(batch_size):
    order = BucketBatchOrder(BUCKET_OF, batch_size, seed=3)
    per_bucket = [BUCKET_OF.count(b) for b in range(3)]
    assert order.batches_per_epoch == sum(math.ceil(n / batch_size) for n in per_bucket)
    epochs = []
    for epoch in range(3):
        seen = []
        for k in range(order.batches_per_epoch):
            idx = order.indices(epoch * order.batches_per_epoch + k)
            assert 1 <= len(idx) <= batch_size
            assert len({BUCKET_OF[i] for i in idx}) == 1
            seen += idx
        assert sorted(seen) == list(range(len(BUCKET_OF)))
        epochs.append(seen)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled every epoch


def test_order_depends_on_seed_and_batch_number_only():
    a, b = BucketBatchOrder(BUCKET_OF, 2, seed=5), BucketBatchOrder(BUCKET_OF, 2, seed=5)
    numbers = [0, 17, 3, 40, 3, 16, 0]
    b.indices(99)  # b's state differs: a resumed run that starts elsewhere
    assert [a.indices(n) for n in numbers] == [b.indices(n) for n in reversed(numbers)][::-1]
    assert [BucketBatchOrder(BUCKET_OF, 2, seed=6).indices(n) for n in range(12)] != [a.indices(n) for n in range(12)]
    with pytest.raises(MedDiffError):
        BucketBatchOrder(BUCKET_OF, 0, seed=0)
    with pytest.raises(MedDiffError):
        BucketBatchOrder([], 1, seed=0)


def test_one_bucket_order_is_the_square_order():
    from medical_diffusion.training.loop import _DataOrder

    square = _DataOrder(6, 9)
    order = BucketBatchOrder([0] * 6, 2, seed=9)
    assert [order.indices(n) for n in range(9)] == [[square.index(2 * n), square.index(2 * n + 1)] for n in range(9)]


def test_seeding_mix_is_the_loops():
    from medical_diffusion.training.loop import _mix
    from medical_diffusion.training.seeds import mix

    for values in [(), (0,), (1, 2, 3), (2**70, -5, 7), (123456789, 4, 10**6, 3)]:
        assert mix(*values) == _mix(*values)


# -- in the training loop (runs once the loop has TrainConfig.bucketing) --------------------

def test_bucketed_training_resumes_exactly_and_square_data_trains_as_before(backend, tmp_path, monkeypatch):
    import csv
    import dataclasses

    from medical_diffusion.embeddings import load_embedding
    from medical_diffusion.training import buckets
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    if "bucketing" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        pytest.skip("the training loop has no bucketing option yet")
    monkeypatch.setattr(buckets, "DEFAULT_STEP", STEP)
    mixed, square = tmp_path / "mixed", tmp_path / "square"
    mixed.mkdir(), square.mkdir()
    _write(mixed, SIZES), _write(square, [(64, 64), (96, 96), (32, 32), (64, 64)])

    def config(folder, **kw):
        base = dict(name="blob", data_dir=str(folder), n_vectors=4, steps=4, resolution=64, save_every=0,
                    preview_every=0, batch_size=2, learning_rate="0.05", mask="alpha", hflip=True, bucketing=True)
        return TrainConfig(**dict(base, **kw))

    def vectors(result):
        return load_embedding(result.embedding_path, expected_width=32).vectors

    def losses(run):
        return [row[1] for row in csv.reader(open(run / "loss.csv"))]

    full = train(config(mixed, grad_accumulation=2), backend, tmp_path / "full")
    train(config(mixed, grad_accumulation=2, steps=2, save_every=2), backend, tmp_path / "part")
    resumed = train(config(mixed, grad_accumulation=2, save_every=2), backend, tmp_path / "part", resume=True)
    assert resumed.steps_done == 4
    assert torch.equal(vectors(full), vectors(resumed))
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    # every image square and 4 % batch_size == 0: one bucket, the square path's latents and order
    on = train(config(square), backend, tmp_path / "on")
    off = train(config(square, bucketing=False), backend, tmp_path / "off")
    assert torch.equal(vectors(on), vectors(off)) and losses(tmp_path / "on") == losses(tmp_path / "off")


def test_bucketing_from_the_cli_and_the_tab_with_a_bucketed_validation_set(backend, tmp_path, monkeypatch):
    """``--bucketing`` and the tab's checkbox reach the run config; validation images are bucketed too."""
    import csv

    gr = pytest.importorskip("gradio")
    from medical_diffusion.cli import main
    from medical_diffusion.training import buckets
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.ui import tab_train
    from medical_diffusion.ui.context import UIContext

    monkeypatch.setattr(buckets, "DEFAULT_STEP", STEP)
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path))
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir(), val_dir.mkdir()
    _write(train_dir, SIZES), _write(val_dir, [(40, 80), (80, 40)], seed=1)
    code = main(["train", "--model", "tiny", "--data", str(train_dir), "--name", "cxr", "--out", str(tmp_path / "cli"),
                 "--vectors", "2", "--steps", "2", "--resolution", "64", "--save-every", "0", "--preview-every", "0",
                 "--bucketing", "--val-data", str(val_dir), "--val-every", "1", "--val-timesteps", "2",
                 "--device", "cpu"])
    assert code == 0
    assert TrainConfig.load(tmp_path / "cli" / "run_config.json").bucketing is True
    rows = list(csv.reader(open(tmp_path / "cli" / "val_loss.csv")))[1:]
    assert [int(r[0]) for r in rows] == [0, 1, 2] and all(math.isfinite(float(r[1])) for r in rows)

    ctx = UIContext(backend_factory=lambda: backend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb")
    with gr.Blocks() as demo:
        tab_train.build(ctx)
    start = next(f.fn for f in demo.fns if f.fn.__name__ == "start")
    *_, (message, _plot, _preview) = start("cxr", str(train_dir), str(tmp_path / "tab"), 2, "", "0.05", 2, 1, 1, 0,
                                           64, 0, 0, 2, "mean", False, False, False, "", 500, 0, 0, "none", True)
    assert message.startswith("finished at step 2"), message
    assert TrainConfig.load(tmp_path / "tab" / "run_config.json").bucketing is True


def test_nan_latents_are_refused_naming_the_image(backend, data_dir):
    """An fp16 VAE that overflows gives NaN latents: caught when they are cached, naming the file."""

    class Overflowing(CountingBackend):
        def encode_images(self, pixels, **kw):
            out = super().encode_images(pixels, **kw).clone()
            out[-1] = float("nan")  # the last image of each encode batch
            return out

    images = load_bucketed_images(data_dir, 64, step=STEP)
    with pytest.raises(MedDiffError, match=r"NaN/inf latents for .*_case\.png.*--no-half-vae"):
        BucketedLatentCache(Overflowing(backend), images)
    square = load_training_images(data_dir, 64)
    with pytest.raises(MedDiffError, match=r"NaN/inf latents for .*_case\.png"):
        LatentCache(Overflowing(backend), square)


def test_a_backend_with_size_conditioning_gets_each_buckets_size(backend, tmp_path, monkeypatch):
    """The webui's SDXL bakes the image size into the prompt encoding: with buckets it is set per micro-batch."""
    from medical_diffusion.training import buckets
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    monkeypatch.setattr(buckets, "DEFAULT_STEP", STEP)
    data = tmp_path / "data"
    data.mkdir()
    _write(data, SIZES)
    seen = []
    monkeypatch.setattr(backend, "set_image_size", lambda w, h: seen.append((w, h)), raising=False)
    config = TrainConfig(name="cxr", data_dir=str(data), n_vectors=2, steps=8, resolution=64, save_every=0,
                         preview_every=0, learning_rate="0.05", bucketing=True)
    train(config, backend, tmp_path / "run")
    grid = {placement_for(w, h, bucket_grid(64, step=STEP)[nearest_bucket(w, h, bucket_grid(64, step=STEP))]).size
            for w, h in SIZES}
    assert seen[0] == (64, 64) and set(seen[1:]) == grid and len(grid) > 1


def test_force_removes_both_families_files(tmp_path):
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.run_folder import RunFolder

    run = RunFolder(tmp_path, "cxr")
    (tmp_path / "embeddings").mkdir()
    old = [tmp_path / "embeddings" / n for n in ("cxr-5.pt", "cxr-5.pt.optim", "cxr-5.safetensors",
                                                  "cxr-5.safetensors.optim")]
    old += [tmp_path / n for n in ("cxr.pt", "cxr.safetensors", "best.pt", "best.safetensors", "best.json",
                                   "cxr-ema.pt", "cxr-ema.safetensors", "loss.csv", "val_loss.csv")]
    for path in old:
        path.write_bytes(b"x")
    run.create(TrainConfig(name="cxr", data_dir=str(tmp_path)), force=True)
    assert [p.name for p in old if p.exists()] == []
