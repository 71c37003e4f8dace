"""Embeddings inside PNG/WebP images (A1111) and exported files loaded by diffusers."""

from __future__ import annotations

import base64
import json
import string

import pytest
import torch
from PIL import Image

from medical_diffusion.embeddings import Embedding, load_embedding, load_embeddings_dir, save_embedding
from medical_diffusion.embeddings.image_format import TEXT_KEY, embed_in_pixels, key_stream, png_text_chunk
from medical_diffusion.errors import InputFileError


def _a1111_data(vec: torch.Tensor, name: str) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": 300,
            "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v2-1_512"}


def _preview() -> Image.Image:
    return Image.new("RGB", (32, 24), (120, 90, 200))


def test_key_stream_matches_the_lcg_definition():
    # x_{k+1} = (1664525 x_k + 1013904223) mod 2**32 from x_0 = 0, each output mod 255
    x, expected = 0, []
    for _ in range(5000):
        x = (1664525 * x + 1013904223) % 2**32
        expected.append(x % 255)
    assert key_stream(5000).tolist() == expected
    assert key_stream(100).tolist()[:5] == [253, 242, 127, 44, 157]  # A1111's self-test reference values


def test_reads_png_text_chunk_written_like_a1111(tmp_path):
    vec = torch.randn(3, 1024) * 0.3
    # A1111 writes base64(JSON) with tensors as {"TORCHTENSOR": lists}, built here by hand
    data = _a1111_data(vec, "Chest-Healthy")
    payload = dict(data, string_to_param={"*": {"TORCHTENSOR": vec.tolist()}})
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(json.dumps(payload).encode()).decode())
    _preview().save(tmp_path / "preview-card.png", pnginfo=info)
    emb = load_embedding(tmp_path / "preview-card.png")
    assert emb.name == "chest-healthy"  # images carry their own name, as in A1111
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (300, "0123abcd", "v2-1_512")
    assert torch.allclose(emb.vectors, vec)
    # our own chunk writer produces the same thing
    _preview().save(tmp_path / "ours.png", pnginfo=png_text_chunk(data))
    assert torch.allclose(load_embedding(tmp_path / "ours.png").vectors, vec)


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("WEBP", ".webp")])
def test_reads_embedding_hidden_in_pixels(tmp_path, fmt, suffix):
    vec = torch.randn(2, 768) * 0.3
    card = embed_in_pixels(_preview(), _a1111_data(vec, "pixelemb"))
    path = tmp_path / f"card{suffix}"
    card.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    emb = load_embedding(path)
    assert emb.name == "pixelemb" and emb.family == "SD1" and emb.step == 300
    assert torch.allclose(emb.vectors, vec)


def test_images_without_embedding_and_broken_chunks(tmp_path):
    _preview().save(tmp_path / "plain.png")
    with pytest.raises(InputFileError, match="image holds no embedding"):
        load_embedding(tmp_path / "plain.png")
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(b"{not json").decode())
    _preview().save(tmp_path / "broken.png", pnginfo=info)
    with pytest.raises(InputFileError, match="broken.png: .*not valid JSON"):
        load_embedding(tmp_path / "broken.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "plain.png").read_bytes()[:40])
    with pytest.raises(InputFileError, match="trunc.png: not a readable image"):
        load_embedding(tmp_path / "trunc.png")
    _preview().save(tmp_path / "card.png", pnginfo=png_text_chunk(_a1111_data(torch.ones(1, 1024), "card")))
    assert list(load_embeddings_dir(tmp_path)) == ["card"]


# -- diffusers ----------------------------------------------------------------------------
def _tiny_tokenizer(folder):
    """A character-level CLIP BPE vocabulary (no merges): enough for load_textual_inversion."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + "_-."
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def tiny_pipeline_factory(tmp_path_factory):
    """Build a fresh tiny StableDiffusionPipeline (text width 1024, random weights) per call."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tok")
    width = 1024

    def build():
        torch.manual_seed(0)
        tokenizer = _tiny_tokenizer(folder)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width, attention_head_dim=2, norm_num_groups=4)
        vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    return build


@pytest.mark.parametrize("fmt, target, token", [
    ("diffusers", "concept", None),
    ("diffusers", "prostate_adc.safetensors", None),
    ("diffusers", "prostate_adc.bin", None),
    ("a1111", "prostate_adc.pt", None),
    ("safetensors", "prostate_adc.safetensors", "prostate_adc"),
])
def test_exported_file_loads_in_diffusers_pipeline(tmp_path, tiny_pipeline_factory, fmt, target, token):
    pipe = tiny_pipeline_factory()
    vec = torch.randn(3, 1024, generator=torch.Generator().manual_seed(3)) * 0.3
    path = save_embedding(Embedding("prostate_adc", vec), tmp_path / target, fmt=fmt)
    source = str(path.parent) if target == "concept" else str(path)
    kwargs = {"token": token} if token else {}
    if target == "concept":
        kwargs["weight_name"] = path.name
    pipe.load_textual_inversion(source, **kwargs)
    # multi-vector expansion works because the token is lowercase
    assert pipe.maybe_convert_prompt("a prostate_adc", pipe.tokenizer) == "a prostate_adc prostate_adc_1 prostate_adc_2"
    ids = pipe.tokenizer.convert_tokens_to_ids(["prostate_adc", "prostate_adc_1", "prostate_adc_2"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.allclose(rows, vec)
    cond, _ = pipe.encode_prompt("a prostate_adc", "cpu", 1, False)
    assert cond.shape[-1] == 1024 and torch.isfinite(cond).all()


def test_deeply_nested_json_in_a_png_is_a_one_line_error(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(b"[" * 200_000 + b"]" * 200_000).decode())
    _preview().save(tmp_path / "deep.png", pnginfo=info)
    with pytest.raises(InputFileError) as caught:
        load_embedding(tmp_path / "deep.png")
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "deep.png")) and "nested too deeply" in message
    assert "\n" not in message
