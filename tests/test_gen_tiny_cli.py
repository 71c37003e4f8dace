"""End to end on the tiny random-weight SD2-shaped model: sampling and every CLI command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from medical_diffusion.cli import main  # noqa: E402
from medical_diffusion.generation.sampling import sample_images  # noqa: E402

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]




@pytest.fixture(scope="module")
def tiny(tiny_backend):
    return tiny_backend


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    from medical_diffusion.embeddings import Embedding, save_embedding

    folder = tmp_path_factory.mktemp("emb")
    g = torch.Generator().manual_seed(0)
    for name in ("healthy", "sick", "effusion"):
        save_embedding(Embedding(name=name, vectors=torch.randn(4, 32, generator=g) * 0.3), folder / f"{name}.pt")
    return folder


@pytest.fixture
def reuse_tiny(tiny, monkeypatch):
    """CLI calls get the already-built tiny model instead of building it again (saves seconds)."""
    import medical_diffusion.generation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny)


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_tiny_sampling_deterministic_and_weight_semantics(tiny):
    g = torch.Generator().manual_seed(1)
    emb = {"healthy": torch.randn(4, 32, generator=g) * 0.3, "sick": torch.randn(4, 32, generator=g) * 0.3}
    kw = dict(embeddings=emb, seed=3, steps=3, width=64, height=64)
    a = sample_images(tiny, "healthy", **kw)[0]
    assert np.array_equal(_arr(a), _arr(sample_images(tiny, "healthy", **kw)[0]))
    assert np.abs(_arr(a) - _arr(sample_images(tiny, "healthy :1", **kw)[0])).max() <= 1
    assert np.abs(_arr(a) - _arr(sample_images(tiny, "healthy :1 AND sick :0", **kw)[0])).max() <= 1
    s = sample_images(tiny, "sick", **kw)[0]
    assert np.abs(_arr(s) - _arr(sample_images(tiny, "healthy :0 AND sick :1", **kw)[0])).max() <= 1
    assert np.abs(_arr(a) - _arr(s)).max() > 1


def test_cli_generate_resume(tmp_path, emb_dir, capsys, tiny, monkeypatch):
    out = tmp_path / "set"
    args = ["generate", "--model", "tiny", "--embeddings-dir", str(emb_dir), "--prompt", "neg=healthy",
            "--prompt", "pos=sick", "-n", "2", "--out", str(out), "--batch-size", "2", *SMALL]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "pos").iterdir()) == ["00000.png", "00001.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["params"]["embeddings"]) == {"healthy", "sick"}  # only the used ones
    import medical_diffusion.generation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny)  # the first run loaded it for real
    assert main(args) == 0
    assert "0 generated, 4 already present" in capsys.readouterr().out
    assert main([*args[:-6], "--steps", "3", "--width", "64", "--height", "64"]) == 1
    assert "other parameters" in capsys.readouterr().err
    rnd = [*args, "--seed", "-1"]
    rnd[rnd.index(str(out))] = str(tmp_path / "random")
    assert main(rnd) == 0 and main(rnd) == 0  # the random seed is recorded and reused on resume
    assert "0 generated, 4 already present" in capsys.readouterr().out.splitlines()[-1]


def test_cli_interpolate_and_compose(tmp_path, emb_dir, reuse_tiny):
    base = ["--model", "tiny", "--embeddings-dir", str(emb_dir), *SMALL]
    assert main(["interpolate", "--healthy", "healthy", "--diseased", "sick", "-k", "3",
                 "--out", str(tmp_path / "i"), *base]) == 0
    record = json.loads((tmp_path / "i" / "interpolation.json").read_text())
    assert [f["prompt"] for f in record["frames"]][1] == "healthy :0.5 AND sick :0.5"
    assert Image.open(tmp_path / "i" / "interpolation_grid.png").size[0] >= 3 * 256
    assert main(["interpolate", "--healthy", "healthy", "--diseased", "sick", "-k", "2", "--mode", "embedding",
                 "--blend", "slerp", "--out", str(tmp_path / "e"), "--steps", "1", "--width", "64", "--height", "64",
                 "--model", "tiny", "--embeddings-dir", str(emb_dir)]) == 0
    assert len(list((tmp_path / "e").glob("interpolation_0*.png"))) == 2
    assert main(["interpolate", "--healthy", "healthy", "--diseased", "nope", "--mode", "embedding",
                 "--out", str(tmp_path / "x"), *base]) == 1
    assert main(["compose", "--base", "healthy", "--add", "sick:0.5", "--add", "effusion:0.5",
                 "--stage-cfg", "2,2,3", "--out", str(tmp_path / "c"), *base]) == 0
    stages = json.loads((tmp_path / "c" / "composition.json").read_text())["params"]["stages"]
    assert stages[2] == {"prompt": "healthy :1 AND sick :0.5 AND effusion :0.5", "cfg_scale": 3.0}


def test_cli_mask_then_inpaint(tmp_path, emb_dir, testdata, reuse_tiny):
    dcm = testdata / "cxr" / "siim_cr_chest_pa_monochrome2.dcm"
    mask = tmp_path / "m.png"
    assert main(["mask", "--out", str(mask), "--unit", "mm", "--spacing-from", str(dcm), "--image", str(dcm),
                 "--circle", "60", "80", "12", "--ellipse", "120", "100", "15", "8", "30", "--feather", "2",
                 "--target-size", "64", "64"]) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["spec"]["spacing"] == pytest.approx([0.168, 0.168])
    assert np.array(record["shape_sizes_mm"]) == pytest.approx(np.array([[24, 24], [30, 16]]))
    assert (tmp_path / "m.overlay.png").exists()
    image = tmp_path / "healthy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "inp"
    assert main(["inpaint", "--model", "tiny", "--embeddings-dir", str(emb_dir), "--image", str(image),
                 "--mask", str(mask), "--mask", str(tmp_path / "m.json"), "--prompt", "sick", "--fill",
                 "latent noise", "--padding", "4", "--out", str(out), *SMALL]) == 0
    results = json.loads((out / "inpaint.json").read_text())["results"]
    assert len(results) == 2 and (out / "inpaint_grid.png").exists()
    got = np.asarray(Image.open(out / results[0]["file"]).convert("RGB"))
    far = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(got[far & (np.arange(64)[None, :] < 3)], np.asarray(Image.open(image))[far & (np.arange(64)[None, :] < 3)])
    assert main(["mask", "--out", str(mask), "--circle", "1", "1", "1"]) == 1  # exists, no --force


@pytest.mark.parametrize("n_words,n_vectors", [(0, 64), (11, 64), (12, 64), (30, 50), (80, 8)])
def test_token_budget_agrees_with_the_backend_chunker(tiny, n_words, n_vectors):
    from medical_diffusion.generation.loading import backend_token_counter
    from medical_diffusion.generation.prompts import check_token_budget

    prompt = " ".join(["lung"] * n_words + ["sick"])
    (budget,) = check_token_budget(prompt, {"sick": n_vectors}, backend_token_counter(tiny))
    chunks = tiny.prompt_chunks(prompt, {"sick": n_vectors})
    assert budget.chunks == len(chunks)
    (chunk_index,) = [i for i, c in enumerate(chunks) if c.fixes]
    assert budget.embeddings["sick"][0] == chunk_index


def test_txt2img_matches_diffusers_pipeline_with_euler_ancestral(tiny):
    """The whole loop (CFG, input scaling, per-seed noise, Euler a) against diffusers' own
    StableDiffusionPipeline + EulerAncestralDiscreteScheduler(timestep_spacing="linspace"), using
    diffusers' sigma interpolation."""
    from diffusers import EulerAncestralDiscreteScheduler

    from medical_diffusion.generation.guidance import encode_composable
    from medical_diffusion.generation.sampling import sample_latents

    emb = {"healthy": torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.3}
    pipe = tiny.make_pipeline()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(tiny.scheduler_config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=tiny.encode_prompt("healthy", emb), negative_prompt_embeds=tiny.encode_prompt("", emb),
               guidance_scale=2.0, num_inference_steps=3, height=64, width=64,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    cond = encode_composable(tiny, "healthy", "", emb)
    ours = sample_latents(tiny, cond, seeds=[5], steps=3, cfg_scale=2.0, width=64, height=64, interpolation="linear")
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)
