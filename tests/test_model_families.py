"""SD1 and SDXL on the standalone backend: tiny models end to end (train, resume, generate,
interpolate, inpaint; library and CLI), SDXL embedding files, prompt encoding, family detection."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from medical_diffusion.backend.families import (  # noqa: E402
    family_from_keys,
    family_of_checkpoint,
    family_of_folder,
    is_tiny_model,
)
from medical_diffusion.embeddings import Embedding, load_embedding, save_embedding  # noqa: E402
from medical_diffusion.embeddings.model import validate  # noqa: E402
from medical_diffusion.embeddings.vector_blocks import embedding_from_vectors, vectors_from_embedding  # noqa: E402
from medical_diffusion.errors import InputFileError, MedDiffError  # noqa: E402
from medical_diffusion.training.config import TrainConfig  # noqa: E402
from medical_diffusion.training.loop import train  # noqa: E402

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]  # the smallest size the limits allow


@pytest.fixture(scope="module")
def sd1():
    from medical_diffusion.backend.diffusers_backend import load_backend

    return load_backend("tiny-sd1")


@pytest.fixture(scope="module")
def sdxl():
    from medical_diffusion.backend.diffusers_backend import load_backend

    return load_backend("tiny-sdxl")


@pytest.fixture(params=["sd1", "sdxl"])
def family_backend(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        a = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
        a[8:24, 6 + 2 * i : 20 + 2 * i] = 210
        Image.fromarray(a).save(folder / f"{i:02d}_case.png")
    return folder


def _config(data_dir, model, **kw):
    base = dict(name="blob", data_dir=str(data_dir), model=model, n_vectors=3, steps=4, resolution=32,
                save_every=0, preview_every=0, batch_size=2, learning_rate="0.05")
    base.update(kw)
    return TrainConfig(**base)


def _random_vectors(backend, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, backend.text_width, generator=g) * 0.3


def _arr(img):
    return np.asarray(img, dtype=np.int16)


# -- attributes and tiny models ------------------------------------------------------------------
def test_family_attributes(sd1, sdxl, tiny_backend):
    assert (tiny_backend.family, tiny_backend.text_widths, tiny_backend.cond_prefix_rows) == ("SD2", {"vectors": 32}, 0)
    assert (sd1.family, sd1.text_widths, sd1.cond_prefix_rows, sd1.scaling_factor) == ("SD1", {"vectors": 32}, 0, 0.18215)
    assert (sdxl.family, sdxl.text_widths, sdxl.cond_prefix_rows) == ("SDXL", {"clip_l": 32, "clip_g": 48}, 1)
    assert sdxl.text_width == 80 and sdxl.scaling_factor == 0.13025 and sdxl.zero_empty_negative
    assert "SD1" in sd1.label and "SDXL" in sdxl.label
    assert all(is_tiny_model(m) for m in ("tiny", "TINY-SD1", "tiny-sdxl")) and not is_tiny_model("tiny-sd3")
    from medical_diffusion.generation.loading import check_model_path

    check_model_path("tiny-sdxl")
    with pytest.raises(InputFileError, match="tiny-sdxl"):
        check_model_path("tiny-sd3")


# -- prompt encoding -----------------------------------------------------------------------------
def test_sd1_pads_with_the_end_token_and_matches_diffusers(sd1):
    chunks = sd1.prompt_chunks("a photo of a cat")
    tokens = sd1._chunk_tokens(chunks, sd1.id_pad)[0].tolist()
    end = tokens.index(49407)
    assert sd1.id_pad == 49407 and set(tokens[end:]) == {49407}
    pipe = sd1.make_pipeline()
    with torch.no_grad():
        ours = sd1.encode_prompt("a photo of a cat")
        theirs = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_sdxl_cond_layout_matches_diffusers_encode_prompt(sdxl):
    tokens_g = sdxl._chunk_tokens(sdxl.prompt_chunks("a photo of a cat"), sdxl.id_pads[1])[0].tolist()
    end = tokens_g.index(49407)
    assert sdxl.id_pads == [49407, 0] and set(tokens_g[end + 1 :]) == {0}
    pipe = sdxl.make_pipeline()
    with torch.no_grad():
        cond = sdxl.encode_prompt("a photo of a cat")
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu", do_classifier_free_guidance=False)
    assert cond.shape == (1, 1 + 77, 80)
    torch.testing.assert_close(cond[:, 1:], embeds, rtol=1e-4, atol=1e-5)  # penultimate layers, no final norm
    torch.testing.assert_close(cond[:, 0, :48], pooled, rtol=1e-4, atol=1e-5)  # text_embeds of clip_g
    assert torch.count_nonzero(cond[:, 0, 48:]) == 0
    long = sdxl.encode_prompt(" ".join(["word"] * 100))
    assert long.shape == (1, 1 + 2 * 77, 80)


def test_sdxl_vectors_get_gradients_in_both_blocks(sdxl):
    param = torch.nn.Parameter(_random_vectors(sdxl))
    cond = sdxl.encode_prompt("a (blob:1.2) scan", {"blob": param})
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = sdxl.diffusion_loss(latents, cond, torch.randn_like(latents), torch.tensor([500.0]))
    loss.backward()
    assert param.grad[:, :32].abs().sum() > 0 and param.grad[:, 32:].abs().sum() > 0
    # the pooled row alone reaches the clip_g block (through the UNet's text_time embedding)
    param.grad = None
    sdxl.encode_prompt("blob", {"blob": param})[0, 0].sum().backward()
    assert param.grad[:, :32].abs().sum() == 0 and param.grad[:, 32:].abs().sum() > 0


def test_pad_conditionings_keeps_prefix_rows_first(sdxl, tiny_backend):
    with torch.no_grad():
        short, long = sdxl.encode_prompt("blob"), sdxl.encode_prompt(" ".join(["word"] * 100))
        batch = sdxl.pad_conditionings([short, long])
        empty = sdxl.encode_prompt("")
        assert batch.shape == (2, 1 + 154, 80)
        assert torch.equal(batch[0, :78], short[0]) and torch.equal(batch[0, 78:], empty[0, 1:])
        assert torch.equal(batch[1], long[0])
        conds = [tiny_backend.encode_prompt("a"), tiny_backend.encode_prompt(" ".join(["w"] * 80))]
        before = torch.cat([torch.cat([conds[0], tiny_backend.encode_prompt("")], 1), conds[1]])  # loop's old padding
        assert torch.equal(tiny_backend.pad_conditionings(conds), before)  # SD2 exactly as before


def test_sdxl_empty_negative_is_zeros(sd1, sdxl):
    from medical_diffusion.generation.guidance import encode_composable

    assert torch.count_nonzero(encode_composable(sdxl, "a", "").uncond) == 0
    assert torch.count_nonzero(encode_composable(sdxl, "a", "b").uncond) > 0
    assert torch.count_nonzero(encode_composable(sd1, "a", "").uncond) > 0


def test_sdxl_time_ids_from_latent_size(sdxl):
    cond = torch.zeros(2, 78, 80)
    kwargs = sdxl.added_cond(torch.zeros(2, 4, 6, 4), cond)
    assert kwargs["time_ids"].tolist() == [[48, 32, 0, 0, 48, 32]] * 2 and kwargs["text_embeds"].shape == (2, 48)


# -- training, resume ----------------------------------------------------------------------------
def test_train_resume_equals_uninterrupted(family_backend, data_dir, tmp_path):
    backend = family_backend
    model = "tiny-sdxl" if backend.family == "SDXL" else "tiny-sd1"
    kw = dict(steps=4, save_every=2, hflip=True)
    full = train(_config(data_dir, model, **kw), backend, tmp_path / "full")
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    part = train(_config(data_dir, model, **kw), backend, tmp_path / "part", stop=stop_after_two)
    assert part.interrupted and part.steps_done == 2
    resumed = train(_config(data_dir, model, **kw), backend, tmp_path / "part", resume=True)
    assert resumed.steps_done == 4
    widths = backend.text_widths
    a = vectors_from_embedding(load_embedding(full.embedding_path, expected_widths=widths), widths)
    b = vectors_from_embedding(load_embedding(resumed.embedding_path, expected_widths=widths), widths)
    assert a.shape == (3, backend.text_width) and torch.equal(a, b)
    losses = lambda run: [r[:3] for r in csv.reader(open(run / "loss.csv"))]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    suffix = ".safetensors" if backend.family == "SDXL" else ".pt"
    assert full.embedding_path.name == f"blob{suffix}"
    assert (tmp_path / "part" / "embeddings" / f"blob-2{suffix}").is_file()
    if backend.family == "SDXL":
        from safetensors import safe_open

        with safe_open(str(full.embedding_path), framework="pt") as fh:
            assert set(fh.keys()) == {"clip_l", "clip_g"}
            assert fh.get_tensor("clip_l").shape == (3, 32) and fh.get_tensor("clip_g").shape == (3, 48)


# -- generation ----------------------------------------------------------------------------------
def test_generate_interpolate_inpaint(family_backend):
    from medical_diffusion.generation.inpainting import inpaint
    from medical_diffusion.generation.interpolation import interpolate_embeddings, interpolate_prompts
    from medical_diffusion.generation.sampling import sample_images

    backend = family_backend
    emb = {"healthy": _random_vectors(backend, seed=1), "sick": _random_vectors(backend, seed=2)}
    kw = dict(embeddings=emb, seed=3, steps=2, width=32, height=32)
    a = sample_images(backend, "healthy", **kw)[0]
    assert a.size == (32, 32) and np.array_equal(_arr(a), _arr(sample_images(backend, "healthy", **kw)[0]))
    assert np.abs(_arr(a) - _arr(sample_images(backend, "healthy :1 AND sick :0", **kw)[0])).max() <= 1
    frames = interpolate_prompts(backend, "healthy", "sick", 2, **kw)
    assert len(frames) == 2 and frames[0].image.size == (32, 32)
    pair = {n: embedding_from_vectors(n, v, backend.text_widths) for n, v in emb.items()}
    blended = interpolate_embeddings(backend, pair["healthy"], pair["sick"], 2, mode="slerp", seed=3, steps=2,
                                     width=32, height=32)
    assert len(blended) == 2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 48), 0)
    mask.paste(255, (16, 16, 32, 32))
    result = inpaint(backend, image, mask, "sick", embeddings=emb, seed=1, steps=2, width=32, height=32, padding=4)
    assert result.image.size == (48, 48)
    assert np.array_equal(np.asarray(result.image)[:4, :4], np.asarray(image)[:4, :4])  # outside the mask kept


def test_cli_train_generate_interpolate_inpaint(tmp_path, data_dir, capsys, monkeypatch):
    from medical_diffusion.cli import main

    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(tmp_path / "embeddings_home"))  # where train publishes

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-sdxl", "--data", str(data_dir), "--name", "blob", "--out", str(run),
                 "--vectors", "2", "--steps", "2", "--resolution", "32", "--save-every", "1",
                 "--preview-every", "2"]) == 0
    assert (run / "blob.safetensors").is_file() and (run / "embeddings" / "blob-1.safetensors").is_file()
    assert (run / "previews" / "blob-2.png").is_file()
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    emb = load_embedding(run / "blob.safetensors", expected_widths={"clip_l": 32, "clip_g": 48})
    assert emb.step == 3 and emb.is_sdxl
    other = tmp_path / "emb"
    other.mkdir()
    save_embedding(embedding_from_vectors("sick", torch.randn(2, 80) * 0.3, {"clip_l": 32, "clip_g": 48}),
                   other / "sick.safetensors", fmt="safetensors")
    (other / "blob.safetensors").write_bytes((run / "blob.safetensors").read_bytes())
    base = ["--model", "tiny-sdxl", "--embeddings-dir", str(other), *SMALL]
    assert main(["generate", "--prompt", "pos=sick", "-n", "1", "--out", str(tmp_path / "set"), *base]) == 0
    assert (tmp_path / "set" / "pos" / "00000.png").is_file()
    assert main(["interpolate", "--healthy", "blob", "--diseased", "sick", "-k", "2", "--out", str(tmp_path / "i"),
                 *base]) == 0
    assert main(["interpolate", "--healthy", "blob", "--diseased", "sick", "-k", "2", "--mode", "embedding",
                 "--out", str(tmp_path / "e"), *base]) == 0
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    assert main(["inpaint", "--image", str(image), "--mask", str(mask), "--prompt", "sick", "--padding", "4",
                 "--out", str(tmp_path / "inp"), *base]) == 0
    # an SD2 embedding is refused for the SDXL model, naming the file and both families
    sd2 = tmp_path / "old.pt"
    save_embedding(Embedding("old", torch.randn(2, 1024)), sd2)
    capsys.readouterr()
    assert main(["generate", "--prompt", "p=old", "-n", "1", "--out", str(tmp_path / "x"), "--embedding", str(sd2),
                 "--model", "tiny-sdxl", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "old.pt" in err and "SD2" in err and "SDXL" in err


def test_cli_sd1_generate(tmp_path):
    from medical_diffusion.cli import main

    folder = tmp_path / "emb"
    folder.mkdir()
    save_embedding(Embedding("healthy", torch.randn(2, 32) * 0.3), folder / "healthy.pt")
    assert main(["generate", "--model", "tiny-sd1", "--embeddings-dir", str(folder), "--prompt", "neg=healthy",
                 "-n", "1", "--out", str(tmp_path / "set"), *SMALL]) == 0
    assert (tmp_path / "set" / "neg" / "00000.png").is_file()


# -- embedding files -----------------------------------------------------------------------------
def test_sdxl_embedding_file_round_trip(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    real = Embedding("pair", torch.randn(2, 768, generator=g), step=5, extra={"clip_g": torch.randn(2, 1280, generator=g)})
    path = save_embedding(real, tmp_path / "pair.safetensors", fmt="safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == {"clip_l", "clip_g"}
        assert fh.get_tensor("clip_l").shape == (2, 768) and fh.get_tensor("clip_g").shape == (2, 1280)
    back = load_embedding(path)
    assert back.is_sdxl and back.family == "SDXL" and back.step == 5
    assert torch.equal(vectors_from_embedding(back, {"clip_l": 768, "clip_g": 1280}),
                       torch.cat([real.vectors, real.extra["clip_g"]], 1))
    tiny = embedding_from_vectors("small", torch.randn(3, 80, generator=g), {"clip_l": 32, "clip_g": 48})
    small = save_embedding(tiny, tmp_path / "small.safetensors", fmt="safetensors")
    with pytest.raises(InputFileError, match="block clip_l has width 32, expected 768"):
        load_embedding(small)  # real SDXL widths stay strict
    got = load_embedding(small, expected_widths={"clip_l": 32, "clip_g": 48})
    assert got.vectors.shape == (3, 32) and got.extra["clip_g"].shape == (3, 48)
    assert load_embedding(small, expected_width=80).is_sdxl  # a tiny model's total width
    with pytest.raises(MedDiffError, match="only as 'safetensors'"):
        save_embedding(got, tmp_path / "small.pt")


def test_family_mismatch_messages(tmp_path, sdxl):
    from medical_diffusion.generation.loading import load_embedding_table

    sd2 = save_embedding(Embedding("old", torch.randn(2, 1024)), tmp_path / "old.pt")
    with pytest.raises(InputFileError) as err:
        load_embedding_table(sdxl, None, [str(sd2)])
    assert "old.pt" in str(err.value) and "SD2 (1024 wide)" in str(err.value) and "SDXL" in str(err.value)
    sd1 = Embedding("one", torch.randn(1, 768))
    with pytest.raises(InputFileError, match=r"for SD1 \(768 wide\) but the model is SD2 \(1024 wide\)"):
        validate(sd1, tmp_path / "one.pt", expected_widths={"vectors": 1024})
    pair = Embedding("p", torch.randn(1, 768), extra={"clip_g": torch.randn(1, 1280)})
    with pytest.raises(InputFileError, match="for SDXL .* but the model is SD1"):
        validate(pair, tmp_path / "p.safetensors", expected_widths={"vectors": 768})
    with pytest.raises(MedDiffError, match="do not fit widths"):
        embedding_from_vectors("x", torch.randn(2, 79), {"clip_l": 32, "clip_g": 48})


def test_blend_and_compare_sdxl_pairs(tmp_path):
    from medical_diffusion.cli import main
    from medical_diffusion.embeddings.blend import blend_embeddings
    from medical_diffusion.embeddings.similarity import compare_embeddings

    widths = {"clip_l": 32, "clip_g": 48}
    a = embedding_from_vectors("a", torch.randn(2, 80), widths)
    b = embedding_from_vectors("b", torch.randn(2, 80), widths)
    mid = blend_embeddings(a, b, 0.5)
    assert torch.allclose(vectors_from_embedding(mid, widths), (vectors_from_embedding(a) + vectors_from_embedding(b)) / 2)
    assert set(compare_embeddings(a, b)["parts"]) == {"clip_l", "clip_g"}
    for emb in (a, b):
        save_embedding(emb, tmp_path / f"{emb.name}.safetensors", fmt="safetensors")
    assert main(["embedding", "blend", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--weight", "0.5", "--name", "mid", "--expected-width", "80"]) == 0
    written = load_embedding(tmp_path / "mid.safetensors", expected_widths=widths)
    assert torch.allclose(vectors_from_embedding(written), vectors_from_embedding(mid))


# -- family detection ----------------------------------------------------------------------------
def test_family_from_checkpoint_keys(tmp_path):
    from safetensors.torch import save_file

    sd1 = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    sd2 = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"]
    sdxl = ["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding"]
    assert (family_from_keys(sd1), family_from_keys(sd2), family_from_keys(sdxl)) == ("SD1", "SD2", "SDXL")
    assert family_from_keys(["model.diffusion_model.out.0.weight"]) is None
    path = tmp_path / "xl.safetensors"
    save_file({k: torch.zeros(1) for k in sdxl}, str(path))
    assert family_of_checkpoint(path) == "SDXL"
    ckpt = tmp_path / "one.ckpt"
    torch.save({"state_dict": {k: torch.zeros(1) for k in sd1}}, ckpt)
    assert family_of_checkpoint(ckpt) == "SD1"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(InputFileError, match="no SD1/SD2/SDXL text encoder"):
        family_of_checkpoint(tmp_path / "unet.safetensors")


def test_saved_tiny_folders_round_trip(tmp_path, sd1, sdxl, tiny_backend):
    import json

    from medical_diffusion.backend.diffusers_backend import load_backend

    for backend in (tiny_backend, sd1, sdxl):
        folder = backend.save_pretrained(tmp_path / backend.family)
        assert family_of_folder(folder) == backend.family
        loaded = load_backend(str(folder))
        assert (loaded.family, loaded.text_widths, loaded.id_pads) == (backend.family, backend.text_widths, backend.id_pads)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_prompt("a blob"), backend.encode_prompt("a blob"))
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("_medical_diffusion_family")  # unmarked folders: told by their structure
        (folder / "model_index.json").write_text(json.dumps(index))
        assert family_of_folder(folder) == backend.family
    assert (tmp_path / "SDXL" / "text_encoder_2").is_dir() and (tmp_path / "SDXL" / "tokenizer_2").is_dir()


def test_a_torchscript_ckpt_is_refused_before_family_detection_loads_it(tmp_path):
    import torch

    from medical_diffusion.backend.families import family_of_checkpoint
    from medical_diffusion.embeddings.safe_pickle import UnsafePickleError

    path = tmp_path / "model.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(UnsafePickleError, match="TorchScript"):
        family_of_checkpoint(path)
