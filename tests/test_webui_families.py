"""WebuiBackend on SD 1.x, SD 2.x and SDXL models, against small fakes of A1111 v1.10's interfaces.

Each fake mirrors the A1111 (or sgm) function named in its comment, reduced to what WebuiBackend
touches; the real proof is a webui run (tests/test_webui_a1111.py). Widths are the real ones
(768, 1024, 768+1280, SDXL vector 2816) so the packing arithmetic is the real one; vocabularies
and networks are tiny.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types

import pytest
import torch

from medical_diffusion.errors import MedDiffError

VOCAB = 64
SDXL_VECTOR = 1280 + 3 * 2 * 256  # pooled clip_g + original size, crop, target size (2 x 256 each)


# -- modules.textual_inversion.textual_inversion ------------------------------------------------
class Embedding:
    """Mirrors textual_inversion.Embedding.__init__ (the fields WebuiBackend sets)."""

    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.step = vec, name, step
        self.shape, self.vectors = None, 0


class EmbeddingDatabase:
    """Mirrors EmbeddingDatabase.register_embedding_by_name / find_embedding_at_position."""

    def __init__(self):
        self.ids_lookup, self.word_embeddings = {}, {}

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        lookup = [x for x in self.ids_lookup.get(ids[0], []) if x[1].name != name]
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if lookup:
                self.ids_lookup[ids[0]] = lookup
            else:
                self.ids_lookup.pop(ids[0], None)
            return None
        self.ids_lookup[ids[0]] = sorted(lookup + [(ids, embedding)], key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


class Hijack:
    """sd_hijack.model_hijack: the embedding db and the per-call ``fixes``."""

    def __init__(self):
        self.embedding_db, self.fixes = EmbeddingDatabase(), None


class Tokenizer:
    """Stands in for both CLIP tokenizers (SDXL's two share the BPE vocabulary): word -> id."""

    id_start, id_end = 0, 1

    def __init__(self):
        self.ids = {}

    def encode(self, text):
        return [self.ids.setdefault(w, 2 + len(self.ids) % (VOCAB - 2)) for w in text.split()]


class EmbeddingsWithFixes(torch.nn.Module):
    """Mirrors sd_hijack.EmbeddingsWithFixes.forward: token rows, then each fix's vectors (the
    ``textual_inversion_key`` block of a dict ``vec``) replace the rows after its offset."""

    def __init__(self, wrapped, hijack, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped, self.embeddings, self.textual_inversion_key = wrapped, hijack, textual_inversion_key

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs
        rows = []
        for fixes, tensor in zip(batch_fixes, inputs):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                n = min(tensor.shape[0] - offset - 1, vec.shape[0])
                tensor = torch.cat([tensor[:offset + 1], vec[:n], tensor[offset + 1 + n:]]).to(inputs.dtype)
            rows.append(tensor)
        return torch.stack(rows)


class TextWrapper(torch.nn.Module):
    """Mirrors sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords (``kind="clip"``, SD1 and SDXL clip_l),
    sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords (``"openclip"``, SD2) and
    FrozenOpenCLIPEmbedder2WithCustomWords (``"openclip2"``, SDXL clip_g, returns pooled): one
    75-token chunk, embedding fixes from the db, a frozen "transformer" over the spliced rows."""

    def __init__(self, hijack, tokenizer, width, kind, ti_key="clip_l"):
        super().__init__()
        self.hijack, self.tokenizer, self.kind = hijack, tokenizer, kind
        table = EmbeddingsWithFixes(torch.nn.Embedding(VOCAB, width), hijack, textual_inversion_key=ti_key)
        mix = torch.nn.Linear(width, width)
        if kind == "clip":  # HF CLIPTextModel layout: wrapped.transformer.text_model.embeddings.token_embedding
            self.wrapped = torch.nn.Module()
            self.wrapped.transformer = torch.nn.Module()
            self.wrapped.transformer.text_model = torch.nn.Module()
            self.wrapped.transformer.text_model.embeddings = torch.nn.Module()
            self.wrapped.transformer.text_model.embeddings.token_embedding = table
        else:  # open_clip layout: wrapped.model.token_embedding
            self.wrapped = torch.nn.Module()
            self.wrapped.model = torch.nn.Module()
            self.wrapped.model.token_embedding = table
        self.mix = mix
        self.return_pooled = kind == "openclip2"
        self.is_trainable = False  # FrozenCLIPEmbedderWithCustomWordsBase copies the wrapped flag (False)
        self.input_key = "txt"
        for p in self.parameters():
            p.requires_grad_(False)

    def _table(self):
        if self.kind == "clip":
            return self.wrapped.transformer.text_model.embeddings.token_embedding
        return self.wrapped.model.token_embedding

    def tokenize(self, texts):  # tokenize(): ids without start/end tokens
        return [self.tokenizer.encode(t) for t in texts]

    def encode_embedding_init_text(self, init_text, nvpt):  # the token rows, via token_embedding.wrapped
        ids = torch.tensor(self.tokenizer.encode(init_text) or [self.tokenizer.id_end])
        return self._table().wrapped(ids)

    def forward(self, texts):  # TextConditionalModel.forward / tokenize_line for one chunk
        db = self.hijack.embedding_db
        batch_tokens, batch_fixes = [], []
        for text in texts:
            tokens, fixes, ids, pos = [], [], self.tokenize([text])[0], 0
            while pos < len(ids):
                emb, length = db.find_embedding_at_position(ids, pos)
                if emb is None:
                    tokens.append(ids[pos])
                    pos += 1
                    continue
                fixes.append((len(tokens), emb))  # PromptChunkFix(offset, embedding); offset before the start token
                tokens += [0] * int(emb.vectors)
                pos += length
            tokens = [self.tokenizer.id_start] + tokens + [self.tokenizer.id_end] * (76 - len(tokens))
            batch_tokens.append(tokens[:77])
            batch_fixes.append(fixes)
        self.hijack.fixes = batch_fixes
        z = self.mix(self._table()(torch.tensor(batch_tokens)))
        if self.return_pooled:
            return z, z[:, -1]  # (B, 77, 1280) and pooled (B, 1280)
        return z


class ConcatTimestepEmbedderND(torch.nn.Module):
    """Mirrors sgm ConcatTimestepEmbedderND(outdim=256): each size number -> 256 sinusoid values."""

    def __init__(self, input_key, outdim=256):
        super().__init__()
        self.input_key, self.outdim, self.is_trainable = input_key, outdim, False

    def forward(self, x):
        freqs = torch.exp(-math.log(10000) * torch.arange(self.outdim // 2) / (self.outdim // 2))
        args = x.float()[..., None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(x.shape[0], -1)


class GeneralConditioner(torch.nn.Module):
    """Mirrors sgm GeneralConditioner.forward (non-trainable embedders under no_grad; 3-D outputs
    -> "crossattn" concatenated on the width, 2-D -> "vector" concatenated) plus sd_models_xl's
    encode_embedding_init_text (text embedders concatenated) and tokenize (the first one's)."""

    KEY2CATDIM = {"vector": 1, "crossattn": 2}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        out = {}
        for embedder in self.embedders:
            with contextlib.nullcontext() if embedder.is_trainable else torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                key = {2: "vector", 3: "crossattn"}[emb.dim()]
                out[key] = torch.cat((out[key], emb), self.KEY2CATDIM[key]) if key in out else emb
        return out

    def encode_embedding_init_text(self, init_text, nvpt):
        return torch.cat([e.encode_embedding_init_text(init_text, nvpt) for e in self.embedders
                          if hasattr(e, "encode_embedding_init_text")], dim=1)

    def tokenize(self, texts):
        return next(e for e in self.embedders if hasattr(e, "tokenize")).tokenize(texts)


class SdConditioning(list):
    """Mirrors prompt_parser.SdConditioning: prompts plus the image width/height SDXL needs."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


class Posterior:
    """ldm DiagonalGaussianDistribution: mean and std of the VAE posterior."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30, 20))


class VAE(torch.nn.Module):
    """AutoencoderKL layout (sgm AutoencodingEngineLegacy): encoder -> quant_conv -> 8 moments."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.quant_conv = torch.nn.Conv2d(8, 8, 1)


class FakeModel(torch.nn.Module):
    """An ldm LatentDiffusion (SD1/SD2) or sgm DiffusionEngine after sd_models_xl.extend_sdxl and
    sd_hijack.hijack (SDXL), with sd_models.set_model_type's flags; apply_model records its cond."""

    def __init__(self, family, hijack, opts):
        super().__init__()
        self.hijack, self.opts, self.seen = hijack, opts, []
        tokenizer = Tokenizer()
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_sdxl_inpaint = (
            family == "SD1", family == "SD2", family == "SDXL", False, False)
        self.latent_channels = 4
        self.first_stage_model = VAE()
        self.model = torch.nn.Module()  # DiffusionWrapper / OpenAIWrapper
        self.model.conditioning_key = "crossattn"
        self.model.diffusion_model = torch.nn.Module()
        self.model.diffusion_model.in_channels = 4
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        self.parameterization = "v" if family == "SD2" else "eps"
        self.sd_checkpoint_info = types.SimpleNamespace(model_name=f"fake-{family.lower()}", shorthash="abc123")
        if family == "SDXL":
            self.scale_factor = 0.13025
            self.conditioner = GeneralConditioner([
                TextWrapper(hijack, tokenizer, 768, "clip"),
                TextWrapper(hijack, tokenizer, 1280, "openclip2", ti_key="clip_g"),
                ConcatTimestepEmbedderND("original_size_as_tuple"),
                ConcatTimestepEmbedderND("crop_coords_top_left"),
                ConcatTimestepEmbedderND("target_size_as_tuple"),
            ])
            self.cond_stage_model = self.conditioner  # sd_hijack.hijack: two text models -> the conditioner
        else:
            self.scale_factor = 0.18215
            self.cond_stage_model = TextWrapper(hijack, tokenizer, 768 if family == "SD1" else 1024,
                                                "clip" if family == "SD1" else "openclip")
        self.out_scale = torch.nn.Parameter(torch.tensor(1.0), requires_grad=False)

    def get_learned_conditioning(self, batch):
        """Mirrors sd_models_xl.get_learned_conditioning: sizes from the batch (1024 when absent)."""
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        n = len(batch)
        return self.conditioner({
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
            "crop_coords_top_left": torch.tensor([self.opts.sdxl_crop_top, self.opts.sdxl_crop_left]).repeat(n, 1),
            "target_size_as_tuple": torch.tensor([height, width]).repeat(n, 1),
        })

    def apply_model(self, x, t, cond):
        """ldm apply_model takes the crossattn tensor; sd_models_xl.apply_model the dict."""
        self.seen.append(cond)
        if self.is_sdxl:
            assert isinstance(cond, dict) and set(cond) == {"crossattn", "vector"}
            signal = cond["crossattn"].mean(dim=(1, 2)) + cond["vector"].mean(dim=1)
        else:
            assert torch.is_tensor(cond)
            signal = cond.mean(dim=(1, 2))
        return x * self.out_scale + signal[:, None, None, None]

    def encode_first_stage(self, x):
        if self.is_sdxl:  # sgm: a scaled sample, no posterior
            return self.scale_factor * Posterior(self.first_stage_model.quant_conv(self.first_stage_model.encoder(x))).mean
        return Posterior(self.first_stage_model.quant_conv(self.first_stage_model.encoder(x)))

    def decode_first_stage(self, z):
        if self.is_sdxl:
            z = z / self.scale_factor
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8)


@pytest.fixture
def webui(monkeypatch):
    """``make(family)`` -> a fake model installed as ``shared.sd_model`` with fake ``modules.*``."""
    hijack = Hijack()
    opts = types.SimpleNamespace(sdxl_crop_top=0, sdxl_crop_left=0)
    shared = types.SimpleNamespace(sd_model=None, opts=opts)
    pkgs = {
        "modules": types.ModuleType("modules"),
        "modules.devices": types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                                                 autocast=contextlib.nullcontext),
        "modules.shared": shared,
        "modules.sd_hijack": types.SimpleNamespace(model_hijack=hijack),
        "modules.prompt_parser": types.SimpleNamespace(SdConditioning=SdConditioning),
        "modules.sd_models": types.SimpleNamespace(model_data=shared),
        "modules.textual_inversion": types.ModuleType("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": types.SimpleNamespace(Embedding=Embedding),
    }
    for name, mod in pkgs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("devices", "shared", "sd_hijack", "prompt_parser", "sd_models", "textual_inversion"):
        setattr(pkgs["modules"], name, pkgs[f"modules.{name}"])

    def make(family):
        torch.manual_seed(0)
        shared.sd_model = FakeModel(family, hijack, opts)
        return shared.sd_model

    return types.SimpleNamespace(make=make, hijack=hijack, db=hijack.embedding_db, shared=shared)


def _backend(webui, family):
    from medical_diffusion.webui.backend import WebuiBackend

    webui.make(family)
    return WebuiBackend()


@pytest.mark.parametrize("family, widths, rows, prediction", [
    ("SD1", {"vectors": 768}, 0, "epsilon"),
    ("SD2", {"vectors": 1024}, 0, "v_prediction"),
    ("SDXL", {"clip_l": 768, "clip_g": 1280}, 2, "epsilon"),
])
def test_family_widths_and_prefix_rows(webui, family, widths, rows, prediction):
    backend = _backend(webui, family)
    assert backend.family == family and backend.text_widths == widths
    assert backend.text_width == sum(widths.values()) and backend.cond_prefix_rows == rows
    assert backend.prediction_type == prediction and backend.label == f"fake-{family.lower()}"
    cond = backend.encode_prompt("a chest x-ray")
    assert cond.shape == (1, rows + 77, backend.text_width)
    if family == "SDXL":
        assert backend.vector_dim == SDXL_VECTOR and rows == math.ceil(SDXL_VECTOR / 2048)


@pytest.mark.parametrize("family", ["SD1", "SD2"])
def test_sd1_sd2_init_text_and_token_norm_read_the_token_table(webui, family):
    backend = _backend(webui, family)
    table = backend.model.cond_stage_model._table().wrapped.weight
    ids = backend.model.cond_stage_model.tokenize(["lung nodule"])[0]
    assert torch.equal(backend.text_to_vectors("lung nodule"), table[ids])
    assert backend.token_embedding_norm() == pytest.approx(float(table.norm(dim=1).mean()))


def test_sdxl_init_text_is_clip_l_then_clip_g_and_norm_of_concatenated_rows(webui):
    backend = _backend(webui, "SDXL")
    clip_l, clip_g = (e._table().wrapped.weight for e in backend.model.conditioner.embedders[:2])
    ids = backend.model.cond_stage_model.tokenize(["lung nodule"])[0]
    assert torch.equal(backend.text_to_vectors("lung nodule"), torch.cat([clip_l[ids], clip_g[ids]], dim=1))
    assert backend.token_embedding_norm() == pytest.approx(float(torch.cat([clip_l, clip_g], 1).norm(dim=1).mean()))
    norms = backend.block_token_norms()
    assert list(norms) == ["clip_l", "clip_g"]
    assert norms["clip_g"] == pytest.approx(float(clip_g.norm(dim=1).mean()))


@pytest.mark.parametrize("family", ["SD1", "SD2", "SDXL"])
def test_trainable_vectors_are_spliced_get_gradients_and_the_db_is_restored(webui, family):
    backend = _backend(webui, family)
    users = Embedding(torch.full((1, backend.text_width), 7.0), "lesion")
    webui.db.register_embedding_by_name(users, backend.model, "lesion")
    spliced = []
    embedders = backend.model.conditioner.embedders[:2] if family == "SDXL" else [backend.model.cond_stage_model]
    for e in embedders:  # capture the rows each text encoder gets
        e._table().register_forward_hook(lambda mod, inp, out: spliced.append((mod.textual_inversion_key, out)))

    vec = (torch.randn(3, backend.text_width) * 0.1).requires_grad_()
    cond = backend.encode_prompt("lesion in a lung", {"lesion": vec})
    assert webui.db.word_embeddings["lesion"] is users  # the user's embedding is back
    assert backend.model.cond_stage_model.tokenize(["lesion"])[0][0] in webui.db.ids_lookup
    if family == "SDXL":
        assert [e.is_trainable for e in embedders] == [False, False]  # flag restored after the call
        rows = {key: out[0, 1:4] for key, out in spliced}
        assert torch.equal(rows["clip_l"], vec[:, :768].detach()) and torch.equal(rows["clip_g"], vec[:, 768:].detach())
    else:
        assert torch.equal(spliced[0][1][0, 1:4], vec.detach())

    noisy = torch.randn(1, 4, 8, 8)
    backend.predict(noisy, torch.tensor([10.0]), cond).square().mean().backward()
    assert vec.grad is not None
    if family == "SDXL":  # both blocks reach the UNet
        assert vec.grad[:, :768].abs().sum() > 0 and vec.grad[:, 768:].abs().sum() > 0
    else:
        assert vec.grad.abs().sum() > 0

    backend.encode_prompt("fresh", {"fresh": vec})
    assert "fresh" not in webui.db.word_embeddings  # a temporary registration is removed


def test_registration_is_undone_when_encoding_fails(webui):
    backend = _backend(webui, "SDXL")

    def boom(batch):
        raise RuntimeError("out of memory")

    backend.model.get_learned_conditioning = boom
    with pytest.raises(RuntimeError):
        backend.encode_prompt("lesion", {"lesion": torch.zeros(2, 2048)})
    assert "lesion" not in webui.db.word_embeddings
    assert [e.is_trainable for e in backend.model.conditioner.embedders[:2]] == [False, False]


def test_sdxl_packed_cond_round_trips_to_the_dict_apply_model_gets(webui):
    backend = _backend(webui, "SDXL")
    cond = backend.encode_prompt("a mammogram")
    expected = backend.model.get_learned_conditioning(SdConditioning(["a mammogram"], width=1024, height=1024))
    assert cond.shape == (1, 2 + 77, 2048)
    assert torch.equal(cond[0, :2].reshape(-1)[SDXL_VECTOR:], torch.zeros(2 * 2048 - SDXL_VECTOR))  # zero padding
    backend.predict(torch.zeros(1, 4, 8, 8), torch.tensor([5.0]), cond)
    seen = backend.model.seen[-1]
    assert torch.equal(seen["crossattn"], expected["crossattn"]) and torch.equal(seen["vector"], expected["vector"])

    # a batch of two (a sampler's cond + uncond) unpacks row by row
    both = torch.cat([cond, backend.encode_prompt("")])
    backend.predict(torch.zeros(2, 4, 8, 8), torch.tensor([5.0, 5.0]), both)
    assert backend.model.seen[-1]["vector"].shape == (2, SDXL_VECTOR)
    assert torch.equal(backend.model.seen[-1]["vector"][0], expected["vector"][0])


def test_pack_and_unpack_are_inverse():
    from medical_diffusion.webui.backend import pack_cond, unpack_cond

    crossattn, vector = torch.randn(3, 154, 2048), torch.randn(3, 2816)
    packed = pack_cond(crossattn, vector, 2)
    back = unpack_cond(packed, 2, 2816)
    assert packed.shape == (3, 156, 2048)
    assert torch.equal(back["crossattn"], crossattn) and torch.equal(back["vector"], vector)


def test_sdxl_size_conditioning_follows_the_training_resolution(webui):
    backend = _backend(webui, "SDXL")
    at_1024 = backend.encode_prompt("a scan")
    backend.set_image_size(512, 512)
    at_512 = backend.encode_prompt("a scan")
    assert torch.equal(at_1024[:, 2:], at_512[:, 2:])  # token rows do not depend on the size
    assert not torch.equal(at_1024[:, :2], at_512[:, :2])
    want = backend.model.get_learned_conditioning(SdConditioning(["a scan"], width=512, height=512))["vector"]
    assert torch.equal(at_512[:, :2].reshape(1, -1)[:, :SDXL_VECTOR], want)


def test_sdxl_latents_are_the_scaled_posterior_mean_and_samples_are_reproducible(webui):
    backend = _backend(webui, "SDXL")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean = backend.encode_images(pixels)
    assert mean.shape == (1, 4, 4, 4)
    assert torch.allclose(mean, backend.model.encode_first_stage(pixels))  # sgm scales by 0.13025 as we do
    a = backend.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    b = backend.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    assert backend.decode_latents(mean).shape == (1, 3, 32, 32)


def _unsupported(webui, change):
    from medical_diffusion.webui.backend import WebuiBackend

    model = webui.make(change[0])
    change[1](model)
    with pytest.raises(MedDiffError) as err:
        WebuiBackend()
    return str(err.value)


def _sd1_inpainting(m):
    m.model.conditioning_key = "hybrid"


def _unet_9_channels(m):
    m.model.diffusion_model.in_channels = 9


def _sd3(m):
    m.is_sd1, m.is_sd3 = False, True


def _sdxl_inpaint(m):
    m.is_sdxl_inpaint = True


def _refiner(m):
    del m.conditioner.embedders[0]


def _no_text_encoder(m):
    m.is_sd1 = False
    del m.cond_stage_model


@pytest.mark.parametrize("change, words", [
    (("SD1", _sd1_inpainting), "'hybrid'"),
    (("SD2", _unet_9_channels), "9 input channels"),
    (("SD1", _sd3), "SD3 is not supported"),
    (("SDXL", _sdxl_inpaint), "SDXL inpainting"),
    (("SDXL", _refiner), "refiner"),
    (("SD1", _no_text_encoder), "unknown model type"),
])
def test_unsupported_models_raise_a_clear_error_naming_the_model(webui, change, words):
    message = _unsupported(webui, change)
    assert words in message and f"'fake-{change[0].lower()}'" in message


def test_no_model_loaded_is_a_clear_error(webui):
    from medical_diffusion.webui.backend import WebuiBackend

    with pytest.raises(MedDiffError, match="no Stable Diffusion checkpoint is loaded"):
        WebuiBackend()


def test_unsupported_model_error_is_shown_in_the_train_tab_state(webui, tmp_path):
    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.ui.training_runner import TrainingRunner
    from medical_diffusion.webui.backend import WebuiBackend

    model = webui.make("SD1")
    _sd3(model)
    ctx = UIContext(backend_factory=WebuiBackend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb", cache_backend=False)
    runner = TrainingRunner(ctx)
    runner._work(types.SimpleNamespace(name="x", steps=1), tmp_path / "run", resume=False)
    assert "SD3 is not supported" in runner.state.error and "fake-sd1" in runner.state.message


@pytest.mark.parametrize("family, fits", [("SD1", {"sd1"}), ("SD2", {"sd2"}), ("SDXL", {"sdxl"})])
def test_loaded_text_width_lists_the_embeddings_of_the_loaded_family(webui, tmp_path, family, fits):
    from medical_diffusion.embeddings import Embedding as Emb
    from medical_diffusion.embeddings import load_embeddings_dir, save_embedding
    from medical_diffusion.webui import tabs

    folder = tmp_path / "emb"
    save_embedding(Emb("sd1", torch.zeros(2, 768)), folder / "sd1.pt")
    save_embedding(Emb("sd2", torch.zeros(2, 1024)), folder / "sd2.pt")
    save_embedding(Emb("sdxl", torch.zeros(2, 768), extra={"clip_g": torch.zeros(2, 1280)}), folder / "sdxl.safetensors",
                   fmt="safetensors")
    webui.make(family)
    width = tabs.loaded_text_width()
    assert width == {"SD1": 768, "SD2": 1024, "SDXL": 2048}[family]
    assert set(load_embeddings_dir(folder, expected_width=width)) == fits


def test_an_sdxl_run_is_copied_to_the_webui_embeddings_as_a_pair_safetensors(webui, tmp_path, monkeypatch):
    from medical_diffusion.embeddings import Embedding as Emb
    from medical_diffusion.embeddings import load_embedding, save_embedding
    from medical_diffusion.training import loop
    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.ui.training_runner import TrainingRunner
    from medical_diffusion.webui.backend import WebuiBackend

    trained = save_embedding(Emb("lesion", torch.ones(2, 768), extra={"clip_g": torch.ones(2, 1280)}),
                             tmp_path / "run" / "lesion.safetensors", fmt="safetensors")
    result = loop.TrainResult(run_dir=tmp_path / "run", embedding_path=trained, steps_done=1, last_loss=0.1,
                              interrupted=False)
    monkeypatch.setattr(loop, "train", lambda *a, **k: result)
    webui.make("SDXL")
    saved = []
    ctx = UIContext(backend_factory=WebuiBackend, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    cache_backend=False, on_embedding_saved=saved.append)
    runner = TrainingRunner(ctx)
    runner._work(types.SimpleNamespace(name="lesion", steps=1), tmp_path / "run", resume=False)
    assert runner.state.error is None, runner.state.error
    assert saved == [tmp_path / "emb" / "lesion.safetensors"]
    assert load_embedding(saved[0], expected_width=2048).family == "SDXL"
