from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.composition import compose, composition_stages
from medical_diffusion.generation.interpolation import interpolate_prompts, interpolation_steps
from medical_diffusion.generation.sampling import sample_images
from medical_diffusion.generation.synthetic_set import SetParams, generate_set, image_seed
from test_gen_fake_backend import FakeBackend

EMB = {"healthy": torch.randn(3, 16, generator=torch.Generator().manual_seed(1)),
       "sick": torch.randn(3, 16, generator=torch.Generator().manual_seed(2)),
       "effusion": torch.randn(3, 16, generator=torch.Generator().manual_seed(3))}
SMALL = dict(steps=3, width=32, height=32)


def _params(**kw):
    return SetParams(classes={"neg": "healthy", "pos": "sick"}, seed=10, **{**SMALL, **kw})


def test_set_layout_manifest_and_seeds(tmp_path):
    fb = FakeBackend()
    res = generate_set(fb, _params(), tmp_path, 3, embeddings=EMB, batch_size=2)
    assert (res.generated, res.skipped, res.failures) == (6, 0, [])
    assert sorted(p.name for p in (tmp_path / "neg").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rec = manifest["images"]["pos/00002.png"]
    assert rec["seed"] == image_seed(_params(), 1, 2) == 10 + 2 * 2 + 1
    assert rec["prompt"] == "sick" and manifest["params"]["steps"] == 3
    # an image equals a stand-alone sample at its recorded seed
    (alone,) = sample_images(fb, "sick", embeddings=EMB, seed=rec["seed"], cfg_scale=2.0, **SMALL)
    saved = np.asarray(Image.open(tmp_path / "pos/00002.png").convert("RGB"))
    assert np.array_equal(saved, np.asarray(alone))
    seeds = {r["seed"] for r in manifest["images"].values()}
    assert len(seeds) == 6  # distinct unless paired
    assert image_seed(_params(paired_seeds=True), 1, 2) == image_seed(_params(paired_seeds=True), 0, 2)


def test_resume_skips_good_files_and_redoes_missing_or_changed(tmp_path):
    fb = FakeBackend()
    generate_set(fb, _params(), tmp_path, 2, embeddings=EMB)
    before = (tmp_path / "neg/00001.png").read_bytes()
    (tmp_path / "neg/00001.png").unlink()
    (tmp_path / "pos/00000.png").write_bytes(b"garbage")
    fb.calls = 0
    res = generate_set(fb, _params(), tmp_path, 3, embeddings=EMB)  # and grow N to 3
    assert (res.generated, res.skipped) == (4, 2)
    assert (tmp_path / "neg/00001.png").read_bytes() == before
    assert Image.open(tmp_path / "pos/00000.png").size == (32, 32)
    assert len(json.loads((tmp_path / "manifest.json").read_text())["images"]) == 6


def test_other_parameters_are_refused_unless_restart(tmp_path):
    fb = FakeBackend()
    generate_set(fb, _params(), tmp_path, 1, embeddings=EMB)
    with pytest.raises(MedDiffError, match="steps: was 3, now 4"):
        generate_set(fb, _params(steps=4), tmp_path, 1, embeddings=EMB)
    res = generate_set(fb, _params(steps=4), tmp_path, 1, embeddings=EMB, restart=True)
    assert res.generated == 2


def test_failures_are_collected_and_the_run_goes_on(tmp_path):
    fb = FakeBackend()
    params = SetParams(classes={"neg": "healthy", "bad": "healthy :1 AND sick"}, **SMALL)
    original = fb.predict

    def flaky(latents, t, cond):
        if latents.shape[0] == 3:  # the two-part prompt: 2 cond rows + 1 uncond
            raise RuntimeError("out of memory (simulated)")
        return original(latents, t, cond)

    fb.predict = flaky
    res = generate_set(fb, params, tmp_path, 2, embeddings=EMB)
    assert res.generated == 2 and [f[0] for f in res.failures] == ["bad/00000.png", "bad/00001.png"]
    assert "out of memory" in res.failures[0][1]
    with pytest.raises(MedDiffError, match="folder name"):
        generate_set(fb, SetParams(classes={"a/b": "x"}), tmp_path / "x", 1)


def test_interpolation_ends_equal_single_prompts():
    fb = FakeBackend()
    frames = interpolate_prompts(fb, "healthy", "sick", 3, embeddings=EMB, seed=4, cfg_scale=2.0, **SMALL)
    assert [f.t for f in frames] == interpolation_steps(3) == [0.0, 0.5, 1.0]
    assert frames[1].prompt == "healthy :0.5 AND sick :0.5"
    (h,) = sample_images(fb, "healthy", embeddings=EMB, seed=4, **SMALL)
    (s,) = sample_images(fb, "sick", embeddings=EMB, seed=4, **SMALL)
    diff = lambda a, b: np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
    assert diff(frames[0].image, h) <= 1 and diff(frames[2].image, s) <= 1
    assert diff(frames[1].image, h) > 1
    with pytest.raises(MedDiffError):
        interpolation_steps(1)


def test_composition_stages_and_strip():
    stages = composition_stages("healthy", [("effusion", 0.5), ("sick", 0.5)], base_weight=0.0,
                                stage_cfg=[2, 2, 3])
    assert [s.prompt for s in stages] == ["healthy", "effusion :0.5", "effusion :0.5 AND sick :0.5"]
    assert [s.cfg_scale for s in stages] == [2, 2, 3]
    kept = composition_stages("healthy", [("effusion", 0.5)], base_weight=0.5)
    assert kept[1].prompt == "healthy :0.5 AND effusion :0.5"
    with pytest.raises(MedDiffError, match="CFG values"):
        composition_stages("healthy", [("effusion", 0.5)], stage_cfg=[2])
    frames = compose(FakeBackend(), stages, embeddings=EMB, seed=1, **SMALL)
    assert len(frames) == 3 and "cfg 3" in frames[2].label


# --- batched generation on the tiny model ------------------------------------------------------------

def _tiny_embeddings():
    g = torch.Generator().manual_seed(0)
    return {"healthy": torch.randn(4, 32, generator=g) * 0.3, "sick": torch.randn(4, 32, generator=g) * 0.3}


@pytest.mark.parametrize("prompt", ["healthy", "healthy :0.6 AND sick :0.4"])
def test_tiny_batch_of_four_equals_four_single_images(tiny_backend, prompt):
    """Each image draws its initial and ancestral noise from its own seed's generator, and composable
    CFG stacks every image's parts along the batch dimension, so a batch of 4 is 4 single images. The
    batched matrix products may sum in another order: fp32 rounding (~1e-7 relative per product) grown
    over the steps stays far below 1e-5 of the latents' scale, while a shared noise generator or mixed-up
    rows would differ by the scale itself."""
    from medical_diffusion.generation.guidance import encode_composable
    from medical_diffusion.generation.sampling import sample_latents

    cond = encode_composable(tiny_backend, prompt, "", _tiny_embeddings())
    kw = dict(steps=4, cfg_scale=3.0, width=64, height=64)
    seeds = [5, 6, 7, 8]
    batch = sample_latents(tiny_backend, cond, seeds=seeds, **kw)
    singles = torch.cat([sample_latents(tiny_backend, cond, seeds=[s], **kw) for s in seeds])
    scale = singles.abs().max()
    assert (batch - singles).abs().max() <= 1e-5 * scale
    assert (singles[0] - singles[1]).abs().max() > 0.1 * scale  # the seeds do differ


def test_tiny_generate_set_batches_and_resumes_a_partial_batch(tiny_backend, tmp_path):
    emb = _tiny_embeddings()
    params = SetParams(classes={"neg": "healthy", "pos": "sick"}, seed=3, steps=3, width=64, height=64)
    rows = []
    original = tiny_backend.predict

    def counting(latents, t, cond):
        rows.append(latents.shape[0])
        return original(latents, t, cond)

    single = generate_set(tiny_backend, params, tmp_path / "one", 4, embeddings=emb, batch_size=1)
    try:
        tiny_backend.predict = counting
        batched = generate_set(tiny_backend, params, tmp_path / "four", 4, embeddings=emb, batch_size=4)
        assert set(rows) == {8}  # 4 images x (cond + uncond) per model call
        for rel in ("neg/00000.png", "neg/00003.png", "pos/00002.png"):
            a = np.asarray(Image.open(tmp_path / "one" / rel), dtype=np.int16)
            b = np.asarray(Image.open(tmp_path / "four" / rel), dtype=np.int16)
            assert np.abs(a - b).max() <= 1  # the same image (rounding may move a grey level)
        before = (tmp_path / "four" / "neg/00002.png").read_bytes()
        (tmp_path / "four" / "neg/00001.png").unlink()
        (tmp_path / "four" / "neg/00002.png").unlink()
        rows.clear()
        again = generate_set(tiny_backend, params, tmp_path / "four", 4, embeddings=emb, batch_size=4)
    finally:
        tiny_backend.predict = original
    assert (single.generated, batched.generated) == (8, 8)
    assert (again.generated, again.skipped) == (2, 6) and set(rows) == {4}  # only the two missing images
    redone = np.asarray(Image.open(tmp_path / "four" / "neg/00002.png"), dtype=np.int16)
    import io

    assert np.abs(redone - np.asarray(Image.open(io.BytesIO(before)), dtype=np.int16)).max() <= 1


def test_batch_size_is_bounded(tmp_path, capsys):
    from medical_diffusion.cli import main

    with pytest.raises(MedDiffError, match="batch size"):
        generate_set(FakeBackend(), _params(), tmp_path, 1, embeddings=EMB, batch_size=65)
    for bad in ("0", "65", "x"):
        with pytest.raises(SystemExit):
            main(["generate", "--model", "tiny", "--prompt", "neg=a", "-n", "1", "--out", str(tmp_path / "o"),
                  "--batch-size", bad])
        assert "--batch-size: expected a whole number from 1 to 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
