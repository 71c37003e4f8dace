"""Diffusers backend: offline tokenizer, A1111-style prompt encoding, tiny model, loading."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from medical_diffusion.backend.prompt_chunks import ChunkSpec, parse_prompt_attention, tokenize_line
from medical_diffusion.errors import MedDiffError




@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


def _ids(backend, text):
    return backend._tokenize(text)


def _reference_cond(backend, token_rows):
    """The text encoder's own forward on explicit token ids (no splicing)."""
    ids = torch.tensor(token_rows, dtype=torch.long)
    with torch.no_grad():
        return backend.text_encoder(ids).last_hidden_state.reshape(1, -1, backend.text_width)


def _row(backend, ids):
    """start + ids + end + pad(0) to 77, as A1111 does for SD2."""
    bos, eos = backend.chunk_spec.id_start, backend.chunk_spec.id_end
    return [bos] + ids + [eos] + [0] * (75 - len(ids))


def test_tokenizer_ids_match_open_clip(monkeypatch):
    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer

    tok = load_sd2_tokenizer()  # imports transformers before the ftfy stand-in below
    if "ftfy" not in sys.modules and importlib.util.find_spec("ftfy") is None:
        # open_clip's tokenizer imports ftfy; ASCII text needs no fixing
        monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda s: s))
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

    reference = open_clip_tokenizer.SimpleTokenizer()
    for text in ["a photo of prostate_neg, MRI", "Hello   World!! 123", "t2w-adc_dwi (x:1.2)", "hello <x> 4567"]:
        assert tok.convert_tokens_to_ids(tok._tokenize(text)) == reference.encode(text)
    assert tok.bos_token_id == reference.encoder["<start_of_text>"] == 49406
    assert tok.eos_token_id == reference.encoder["<end_of_text>"] == 49407
    assert tok.pad_token_id == 0


def test_plain_prompt_equals_text_encoder(backend):
    cond = backend.encode_prompt("a photo of a dog")
    ref = _reference_cond(backend, [_row(backend, _ids(backend, "a photo of a dog"))])
    assert cond.shape == (1, 77, backend.text_width)
    torch.testing.assert_close(cond, ref, rtol=0, atol=1e-6)


def test_embedding_spliced_in_place_with_grad(backend):
    name = "prostate_neg"
    vec = torch.randn(3, backend.text_width, requires_grad=True)
    cond = backend.encode_prompt(f"a {name} scan", {name: vec})
    # reference: same ids with the vectors put into the token embedding table temporarily
    emb = backend.token_embedding
    spare = [100, 101, 102]
    saved = emb.weight.data[spare].clone()
    try:
        emb.weight.data[spare] = vec.detach()
        ref = _reference_cond(backend, [_row(backend, _ids(backend, "a") + spare + _ids(backend, "scan"))])
    finally:
        emb.weight.data[spare] = saved
    torch.testing.assert_close(cond.detach(), ref, rtol=0, atol=1e-6)
    cond.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0


SPEC = ChunkSpec(tokenize=lambda t: [ord(c) for c in t if c != " "], id_start=1, id_end=2, comma_token=ord(","))


@pytest.mark.parametrize(
    "prompt, sizes, expect_chunks, expect_fixes",
    [
        ("ab", {}, 1, [[]]),
        ("", {}, 1, [[]]),
        ("x" * 75, {}, 1, [[]]),
        ("x" * 76, {}, 2, [[], []]),
        ("E", {"E": 64}, 1, [[(0, "E")]]),
        ("x" * 12 + "E", {"E": 64}, 2, [[], [(0, "E")]]),  # 12 + 64 > 75: embedding moves to next chunk
        ("x" * 11 + "E", {"E": 64}, 1, [[(11, "E")]]),
        ("E E", {"E": 40}, 2, [[(0, "E")], [(0, "E")]]),
        ("aBREAKb", {}, 1, [[]]),  # BREAK needs word boundaries
        ("a BREAK b", {}, 2, [[], []]),
        ("EF", {"EF": 2, "E": 1}, 1, [[(0, "EF")]]),  # longest name wins
    ],
)
def test_chunking_table(prompt, sizes, expect_chunks, expect_fixes):
    chunks, _ = tokenize_line(prompt, SPEC, sizes)
    assert len(chunks) == expect_chunks
    assert [c.fixes for c in chunks] == expect_fixes
    for c in chunks:
        assert len(c.tokens) == 77 and c.tokens[0] == 1 and c.tokens[-1] == 2
        for off, name in c.fixes:
            assert c.tokens[1 + off : 1 + off + sizes[name]] == [0] * sizes[name]


def test_comma_backtrack_moves_tail_to_next_chunk():
    prompt = "x" * 70 + "," + "y" * 10
    chunks, _ = tokenize_line(prompt, SPEC)
    assert len(chunks) == 2
    assert chunks[0].tokens[1:72] == [ord("x")] * 70 + [ord(",")]
    assert chunks[0].tokens[72:] == [2] * 5
    assert chunks[1].tokens[1:11] == [ord("y")] * 10


def test_parse_prompt_attention_matches_a1111_doctests():
    assert parse_prompt_attention("normal text") == [["normal text", 1.0]]
    assert parse_prompt_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert parse_prompt_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert parse_prompt_attention("\\(literal\\]") == [["(literal]", 1.0]]
    assert parse_prompt_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [["a ", 1.0], ["house", 1.573], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
            [", sun, ", 1.1], ["sky", 1.4641], [".", 1.1]]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


def test_long_prompt_two_chunks(backend):
    cond = backend.encode_prompt("dog " * 80)
    assert cond.shape == (1, 154, backend.text_width)


def test_emphasis_restores_a_nonzero_mean(backend, monkeypatch):
    """With a text encoder whose output mean is clearly non-zero, A1111 restores the mean."""
    monkeypatch.setattr(backend, "encode_token_embeddings", lambda e: torch.ones_like(e) * 2.0)
    plain = backend.encode_prompt("a dog")
    weighted = backend.encode_prompt("a (dog:1.5)")
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())


@pytest.mark.parametrize(
    "prompt, unweighted",
    [("a (dog:1.5)", "a dog"), ("(scan:1.2) of prostate", "scan of prostate"), ("((dog)) " * 40, "dog " * 40)],
)
def test_emphasis_on_a_zero_mean_encoder_is_finite(backend, prompt, unweighted):
    """The tiny model's final layer norm gives a mean of ~0: the weights apply, the rescale is skipped."""
    plain = backend.encode_prompt(unweighted)
    weighted = backend.encode_prompt(prompt)
    assert torch.isfinite(weighted).all()
    chunks = backend.prompt_chunks(prompt)
    multipliers = torch.tensor([c.multipliers for c in chunks]).reshape(1, -1, 1)
    torch.testing.assert_close(weighted, plain * multipliers)


def test_apply_emphasis_controlled_means():
    from medical_diffusion.backend.emphasis import apply_emphasis

    # non-zero mean: weighted, then rescaled to the old mean (A1111)
    z = torch.full((1, 4, 2), 2.0)
    m = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    out = apply_emphasis(z, m)
    torch.testing.assert_close(out, z * m[:, :, None] * (2.0 / 2.5))
    torch.testing.assert_close(out.mean(), z.mean())
    # new mean exactly 0 (A1111 gives inf), old mean exactly 0 (A1111 gives all zeros), both 0:
    # the rescale is skipped, the weights still apply
    cases = [
        (torch.tensor([[[1.0, 1.0], [-0.5, -0.5]]]), torch.tensor([[1.0, 2.0]])),
        (torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]]), torch.tensor([[1.0, 2.0]])),
        (torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]), torch.tensor([[1.0, 1.5]])),
    ]
    for z, m in cases:
        out = apply_emphasis(z, m)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, z * m[:, :, None])


def test_encode_prompt_rejects_bad_embeddings(backend):
    with pytest.raises(MedDiffError, match="76 vectors"):
        backend.encode_prompt("big", {"big": torch.zeros(76, backend.text_width)})
    with pytest.raises(MedDiffError, match="shape"):
        backend.encode_prompt("w", {"w": torch.zeros(2, backend.text_width + 1)})


def test_vae_roundtrip_shapes_and_scaling(backend):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = backend.encode_images(pixels)
    assert mean.shape == (2, 4, 8, 8)
    raw = backend.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(mean, raw * 0.18215)
    g = torch.Generator().manual_seed(0)
    sampled = backend.encode_images(pixels, sample=True, generator=g)
    assert not torch.equal(sampled, mean)
    assert backend.decode_latents(mean).shape == (2, 3, 64, 64)


def test_tiny_seeded_and_prediction_types():
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.tiny import build_tiny_backend

    a, b = build_tiny_backend(seed=3), build_tiny_backend(seed=3, prediction_type="v_prediction")
    assert torch.equal(next(a.unet.parameters()), next(b.unet.parameters()))
    assert a.prediction_type == "epsilon" and b.prediction_type == "v_prediction"
    assert a.alphas_cumprod.shape == (1000,)


def test_save_and_load_tiny_folder(tmp_path, backend):
    from medical_diffusion.backend.diffusers_backend import load_backend
    from medical_diffusion.backend.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny", seed=0)
    loaded = load_backend(str(folder))
    torch.testing.assert_close(loaded.encode_prompt("a dog"), backend.encode_prompt("a dog"), rtol=0, atol=0)
    assert loaded.prediction_type == "epsilon"


def test_load_backend_errors(tmp_path):
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.diffusers_backend import load_backend

    with pytest.raises(MedDiffError, match="not found"):
        load_backend(str(tmp_path / "missing.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedDiffError, match="config.json"):
        load_backend(str(tmp_path / "empty"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MedDiffError, match="bad.safetensors"):
        load_backend(str(bad))


def test_embedding_that_does_not_fit_starts_a_new_chunk(backend):
    vec = torch.randn(64, backend.text_width)
    words = " ".join(["dog"] * 12)  # 12 tokens + 64 vectors > 75: A1111 moves the embedding on
    cond = backend.encode_prompt(f"{words} sick", {"sick": vec})
    assert cond.shape == (1, 154, backend.text_width)
    torch.testing.assert_close(cond[:, :77], backend.encode_prompt(words), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[:, 77:], backend.encode_prompt("sick", {"sick": vec}), rtol=0, atol=1e-6)
    fits = backend.encode_prompt(" ".join(["dog"] * 11) + " sick", {"sick": vec})
    assert fits.shape == (1, 77, backend.text_width)


def test_single_file_uses_shipped_configs_offline(tmp_path, monkeypatch):
    """An SD2-keyed file missing most weights fails inside component loading (configs found
    locally, nothing fetched) with a one-line error naming the file."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from medical_diffusion.backend.diffusers_backend import load_backend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "partial_sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3072, 1024)}, str(path))
    with pytest.raises(MedDiffError) as info:
        load_backend(str(path))
    message = str(info.value)
    assert "partial_sd2.safetensors" in message and "missing" in message and "\n" not in message
