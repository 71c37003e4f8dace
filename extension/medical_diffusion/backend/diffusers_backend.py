""":class:`ModelBackend` on Hugging Face diffusers/transformers objects (standalone use).

Prompts are encoded as A1111 does (``sd_hijack_clip`` + ``sd_hijack_open_clip``): 75-token chunks
between start/end tokens, embedding vectors spliced in place of their name's tokens, emphasis
``(word:1.2)`` with the mean restored (skipped for a chunk whose mean is ~0, see
:mod:`~medical_diffusion.backend.emphasis`). Per family:

- SD1 (CLIP ViT-L/14): pads with the end token; the final layer + final layer norm (CLIP skip 1);
- SD2 (OpenCLIP ViT-H/14): pads with id 0 after the first end token; the shipped/diffusers text
  encoder already stops at OpenCLIP's penultimate layer, then the final layer norm;
- SDXL: CLIP-L (pads with the end token) and OpenCLIP bigG (pads with id 0), each the penultimate
  layer without the final norm, emphasis applied per encoder, concatenated to ``768 + 1280``; the
  pooled bigG embedding of the first chunk (projection of the final-normed end token) travels in
  the conditioning's first row and the UNet's ``time_ids`` come from the latents' size.

The CLIP text transformers are run from input embeddings so gradients reach trainable vectors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.backend.emphasis import apply_emphasis
from medical_diffusion.backend.numerics import check_finite, vae_dtype_for
from medical_diffusion.backend.prompt_chunks import ChunkSpec, PromptChunk, tokenize_line
from medical_diffusion.errors import InputFileError, MedDiffError

log = logging.getLogger(__name__)

#: config folders shipped with the package, one per family (``sd1``, ``sd2``, ``sdxl``), for single files
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class DiffusersBackend(ModelBackend):
    """A frozen Stable Diffusion model made of diffusers/transformers modules."""

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config: Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        label: str = "",
        attention: str = "auto",
        vae_dtype: torch.dtype | None = None,
        family: str | None = None,
        text_encoder_2=None,
        tokenizer_2=None,
    ):
        from diffusers import DDPMScheduler

        self.device = torch.device(device)
        self.dtype = dtype
        self.label = label
        #: fp32 when the weights are fp16 and the VAE asks to be upcast (diffusers' ``force_upcast``)
        self.vae_dtype = vae_dtype or vae_dtype_for(dtype, getattr(vae, "config", None))
        #: where the VAE is now (:meth:`place_vae` moves it off the GPU once training latents are cached)
        self._vae_device = self.device
        self.unet = unet.to(self.device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.device, self.vae_dtype).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device, dtype).eval().requires_grad_(False)
        if family is None:
            family = "SDXL" if text_encoder_2 is not None else (
                "SD1" if int(text_encoder.config.hidden_size) == 768 else "SD2")
        if family not in ("SD1", "SD2", "SDXL"):
            raise MedDiffError(f"unknown model family {family!r} (SD1, SD2 or SDXL)")
        if (family == "SDXL") != (text_encoder_2 is not None):
            raise MedDiffError("an SDXL model needs text_encoder_2 (and only SDXL has one)")
        self.family = family
        self.text_encoder_2 = None
        if text_encoder_2 is not None:
            self.text_encoder_2 = text_encoder_2.to(self.device, dtype).eval().requires_grad_(False)
        self.attention = set_attention(self, attention)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2 if tokenizer_2 is not None or family != "SDXL" else tokenizer
        self.scheduler_config = dict(scheduler_config)
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu()
        self.prediction_type = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise MedDiffError(f"unsupported prediction type {self.prediction_type!r}")
        if family == "SDXL":
            self.text_widths = {"clip_l": int(text_encoder.config.hidden_size),
                                "clip_g": int(self.text_encoder_2.config.hidden_size)}
            #: width of the pooled CLIP-G embedding carried in the first conditioning row
            self.pooled_width = int(self.text_encoder_2.config.projection_dim)
            self.cond_prefix_rows = 1
            self.zero_empty_negative = True
        else:
            self.text_widths = {"vectors": int(text_encoder.config.hidden_size)}
        self.text_width = sum(self.text_widths.values())
        if family == "SDXL" and self.pooled_width > self.text_width:
            raise MedDiffError(f"pooled width {self.pooled_width} exceeds the token width {self.text_width}")
        self.latent_channels = int(self.vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        vocab = tokenizer.get_vocab()
        pad = tokenizer.pad_token_id
        self.chunk_spec = ChunkSpec(
            tokenize=self._tokenize,
            id_start=int(tokenizer.bos_token_id),
            id_end=int(tokenizer.eos_token_id),
            comma_token=vocab.get(",</w>"),
        )
        self.id_pad = int(pad) if pad is not None else self.chunk_spec.id_end
        #: pad id per text encoder (SDXL: CLIP-L pads with the end token, OpenCLIP bigG with 0)
        self.id_pads = [self.id_pad]
        if family == "SDXL":
            pad_2 = self.tokenizer_2.pad_token_id
            self.id_pads.append(int(pad_2) if pad_2 is not None else self.chunk_spec.id_end)
        self._chunk_cache: dict[tuple, list[PromptChunk]] = {}

    # -- components -----------------------------------------------------------------------
    @property
    def text_encoders(self) -> list:
        """The text encoders in block order (SDXL: CLIP-L, then OpenCLIP bigG)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def pipeline_components(self) -> dict[str, Any]:
        """unet, vae, text encoder(s), tokenizer(s) and a fresh DDPM-config scheduler, for diffusers code."""
        from diffusers import DDPMScheduler

        parts = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": DDPMScheduler.from_config(self.scheduler_config),
        }
        if self.family == "SDXL":
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return parts

    def set_prediction_type(self, prediction_type: str) -> None:
        """Override the scheduler's prediction type; a v-prediction model gets ``upcast_attention``."""
        if prediction_type not in ("epsilon", "v_prediction"):
            raise MedDiffError(f"unsupported prediction type {prediction_type!r}")
        self.scheduler_config["prediction_type"] = prediction_type
        self.prediction_type = prediction_type
        if prediction_type == "v_prediction":
            self.enable_upcast_attention()

    def make_pipeline(self, own_text_encoder: bool = False):
        """A ``StableDiffusionPipeline`` sharing this backend's modules (no safety checker).

        diffusers' ``load_textual_inversion`` grows the tokenizer and the token-embedding table in
        place; ``own_text_encoder=True`` gives the pipeline copies so this backend is unaffected.
        """
        import copy

        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = self.pipeline_components
        if own_text_encoder:
            for key in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
                if key in parts:
                    parts[key] = copy.deepcopy(parts[key])
        if self.family == "SDXL":  # a ``StableDiffusionXLPipeline`` (no watermarker)
            return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers folder that :func:`load_backend` reads back (with its family marked in
        ``model_index.json``, so a tiny model of any width loads as the right family)."""
        from medical_diffusion.atomic_io import atomic_write_text
        from medical_diffusion.backend.families import FAMILY_MARKER

        folder = Path(folder)
        self.make_pipeline().save_pretrained(folder, safe_serialization=True)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text("utf-8"))
        index[FAMILY_MARKER] = self.family
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return folder

    @property
    def vae_device(self) -> torch.device:
        return self._vae_device

    def place_vae(self, device: str | torch.device) -> None:
        """Move the VAE to ``device`` (training: to the CPU once latents are cached, back for previews)."""
        device = torch.device(device)
        if device != self._vae_device:
            self.vae.to(device)
            self._vae_device = device

    def enable_upcast_attention(self) -> None:
        """Compute attention scores in fp32 (diffusers' ``upcast_attention``, needed by SD 2.1-v in fp16
        with the classic attention; torch's SDPA kernels accumulate in fp32 anyway)."""
        from diffusers.models.attention_processor import Attention

        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.upcast_attention = True
        self.unet.register_to_config(upcast_attention=True)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory in the UNet's backward pass (training option)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    # -- text -----------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        return bpe_token_ids(self.tokenizer, text)

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The (first) text encoder's token-embedding table."""
        return self.text_encoder.get_input_embeddings()

    @property
    def token_embeddings(self) -> list[torch.nn.Embedding]:
        """Each text encoder's token-embedding table, in block order."""
        return [encoder.get_input_embeddings() for encoder in self.text_encoders]

    def text_to_vectors(self, text: str) -> torch.Tensor:
        """Token rows ``(k, text_width)``; SDXL: both tables' rows side by side (A1111's
        ``encode_embedding_init_text``, CLIP-L first)."""
        ids = torch.tensor(self._tokenize(text), dtype=torch.long, device=self.device)
        with torch.no_grad():
            return torch.cat([table(ids).float().cpu() for table in self.token_embeddings], dim=1)

    def block_token_norms(self) -> dict[str, float]:
        """Mean L2 norm of each text encoder's token vectors, by block of :attr:`text_widths`
        (SDXL: ``{"clip_l": ..., "clip_g": ...}``; SD1/SD2: ``{"vectors": token_embedding_norm()}``)."""
        return {part: mean_row_norm(table.weight.detach())
                for part, table in zip(self.text_widths, self.token_embeddings)}

    def token_embedding_norm(self) -> float:
        """Mean L2 norm of the vocabulary's token vectors (SDXL: of the concatenated rows)."""
        # row blocks: no fp32 copy of the whole (49408, width) table
        weights = [table.weight.detach() for table in self.token_embeddings]
        if len(weights) == 1:  # SD1/SD2: exactly the original sums
            return mean_row_norm(weights[0])
        rows = min(w.shape[0] for w in weights)
        total = torch.zeros((), dtype=torch.float64, device=weights[0].device)
        for start in range(0, rows, 4096):
            squares = sum(w[start : start + 4096].float().pow(2).sum(dim=1).to(weights[0].device) for w in weights)
            total += squares.sqrt().sum().double()
        return float(total / rows)

    def prompt_chunks(self, prompt: str, embedding_sizes: Mapping[str, int] | None = None) -> list[PromptChunk]:
        """A1111's chunks for ``prompt`` (cached per prompt and embedding sizes)."""
        key = (prompt, tuple(sorted((embedding_sizes or {}).items())))
        chunks = self._chunk_cache.get(key)
        if chunks is None:
            chunks, _ = tokenize_line(prompt, self.chunk_spec, embedding_sizes)
            if len(self._chunk_cache) > 256:
                self._chunk_cache.clear()
            self._chunk_cache[key] = chunks
        return chunks

    def encode_prompt(self, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        embeddings = dict(embeddings or {})
        for name, vec in embeddings.items():
            if vec.ndim != 2 or vec.shape[-1] != self.text_width:
                raise MedDiffError(
                    f"embedding {name!r} has shape {tuple(vec.shape)}; this model needs (n, {self.text_width})"
                )
        chunks = self.prompt_chunks(prompt, {k: int(v.shape[0]) for k, v in embeddings.items()})
        if self.family == "SDXL":
            return self._encode_sdxl(chunks, embeddings)
        tokens = self._chunk_tokens(chunks, self.id_pad)
        rows = self._splice(self.token_embedding(tokens), chunks, embeddings)
        z = self.encode_token_embeddings(rows)
        z = self._emphasis(z, chunks)
        return z.reshape(1, -1, z.shape[-1])

    def _chunk_tokens(self, chunks: list[PromptChunk], id_pad: int) -> torch.Tensor:
        """Token ids ``(chunks, 77)``; a pad id other than the end token replaces everything after
        the first end token (A1111's ``process_tokens``: SD2 and SDXL's OpenCLIP pad with id 0)."""
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=self.device)
        if id_pad != self.chunk_spec.id_end:
            for row in range(tokens.shape[0]):
                end = chunks[row].tokens.index(self.chunk_spec.id_end)
                tokens[row, end + 1 :] = id_pad
        return tokens

    @staticmethod
    def _splice(embeds: torch.Tensor, chunks: list[PromptChunk], embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token vectors ``(chunks, 77, width)`` with each embedding's vectors at its fixes."""
        rows = []
        for row, chunk in enumerate(chunks):
            tensor = embeds[row]
            for offset, name in chunk.fixes:
                emb = embeddings[name].to(tensor.device, tensor.dtype)
                n = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[: offset + 1], emb[:n], tensor[offset + 1 + n :]])
            rows.append(tensor)
        return torch.stack(rows)

    @staticmethod
    def _emphasis(z: torch.Tensor, chunks: list[PromptChunk]) -> torch.Tensor:
        multipliers = torch.tensor([c.multipliers for c in chunks], dtype=z.dtype, device=z.device)
        if bool((multipliers != 1).any()):  # A1111 "Original" emphasis, chunk by chunk
            z = apply_emphasis(z, multipliers)
        return z

    def _encode_sdxl(self, chunks: list[PromptChunk], embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """SDXL: each encoder on its own block of the vectors, penultimate layer, its own emphasis
        (as A1111's two embedders), concatenated; the first chunk's pooled bigG embedding in row 0."""
        blocks, pooled, start = [], None, 0
        for index, (encoder, table, width) in enumerate(zip(self.text_encoders, self.token_embeddings,
                                                            self.text_widths.values())):
            tokens = self._chunk_tokens(chunks, self.id_pads[index])
            part = {name: vec[:, start : start + width] for name, vec in embeddings.items()}
            rows = self._splice(table(tokens), chunks, part)
            hidden, last = run_text_model(encoder, rows, penultimate=True)
            if index == 1:  # OpenCLIP bigG: projection of the final-normed first end token, first chunk
                text_model = getattr(encoder, "text_model", encoder)
                end = chunks[0].tokens.index(self.chunk_spec.id_end)
                pooled = encoder.text_projection(text_model.final_layer_norm(last[0:1, end]))
            blocks.append(self._emphasis(hidden, chunks))
            start += width
        z = torch.cat(blocks, dim=-1).reshape(1, -1, self.text_width)
        prefix = torch.cat([pooled.to(z.dtype), z.new_zeros(1, self.text_width - pooled.shape[-1])], dim=-1)
        return torch.cat([prefix[:, None], z], dim=1)

    def encode_token_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP text transformer output ``(B, T, width)`` from token vectors ``(B, T, width)``
        (SD1/SD2: the final layer, then the final layer norm)."""
        return run_text_model(self.text_encoder, inputs_embeds)[0]

    # -- images ---------------------------------------------------------------------------
    def encode_images(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae_device, self.vae_dtype)).latent_dist
        latents = dist.mean
        if sample:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            latents = latents + dist.std * noise
        return (latents * self.scaling_factor).to(self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        check_finite(latents, "the sampled latents", self.dtype)
        pixels = self.vae.decode(latents.to(self.vae_device, self.vae_dtype) / self.scaling_factor).sample
        check_finite(pixels, "the VAE's decoded image", self.vae_dtype)
        return pixels.clamp(-1, 1).to(self.device)

    # -- denoiser -------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = timesteps.to(self.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        cond = cond.to(self.device, self.dtype)
        if not self.cond_prefix_rows:
            return self.unet(latents.to(self.device, self.dtype), t, encoder_hidden_states=cond).sample
        return self.unet(latents.to(self.device, self.dtype), t, encoder_hidden_states=cond[:, self.cond_prefix_rows :],
                         added_cond_kwargs=self.added_cond(latents, cond)).sample

    def added_cond(self, latents: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """SDXL's ``added_cond_kwargs``: the pooled embedding from the conditioning's first row and
        ``time_ids`` = (original h, w, crop top, left, target h, w) in pixels, from the latents' size
        (A1111: original = target = the image size, crop 0, 0)."""
        h, w = (int(n) * self.vae_scale_factor for n in latents.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype)
        return {"text_embeds": cond[:, 0, : self.pooled_width], "time_ids": time_ids.expand(cond.shape[0], 6)}


def mean_row_norm(weight: torch.Tensor) -> float:
    """Mean L2 norm of the rows of a token table, in row blocks (no fp32 copy of the whole table)."""
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], 4096):
        total += weight[start : start + 4096].float().norm(dim=1).sum().double()
    return float(total / weight.shape[0])


def run_text_model(encoder, inputs_embeds: torch.Tensor, penultimate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP text transformer on token vectors ``(B, T, width)``: ``(output, last hidden state)``.

    The output is the final layer's state after the final layer norm (SD1/SD2), or with
    ``penultimate`` the state before the last layer, without the norm (SDXL, both encoders).
    """
    # transformers 4 wraps the transformer in ``.text_model``; transformers 5's CLIPTextModel is it
    text_model = getattr(encoder, "text_model", encoder)
    hidden = text_model.embeddings(inputs_embeds=inputs_embeds)
    b, t = hidden.shape[:2]
    causal = torch.full((t, t), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
    causal = causal.triu(1)[None, None].expand(b, 1, t, t)
    # the additive causal mask as ``attention_mask``: transformers 4.x adds it, and 5.x (which dropped
    # ``causal_attention_mask`` and would ignore it silently) applies it as given
    if not penultimate:
        out = text_model.encoder(inputs_embeds=hidden, attention_mask=causal)
        last = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return text_model.final_layer_norm(last), last
    # the penultimate state from a hook on the last-but-one layer: transformers 5's encoder no longer takes
    # ``output_hidden_states`` (its outputs are captured a level up); a layer returns a tuple in 4.x, a tensor in 5.x
    layers = text_model.encoder.layers
    captured = [hidden]  # a one-layer encoder's penultimate state is its input

    def keep(_module, _inputs, output):
        captured[0] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layers[-2].register_forward_hook(keep) if len(layers) > 1 else None
    try:
        out = text_model.encoder(inputs_embeds=hidden, attention_mask=causal)
    finally:
        if handle is not None:
            handle.remove()
    last = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return captured[0], last


def bpe_token_ids(tokenizer, text: str) -> list[int]:
    """BPE ids of ``text`` without start/end tokens and without added-token splitting.

    Added tokens are not split out, so "!!" stays one token as in OpenCLIP although "!" is the pad
    token. transformers 4's slow ``CLIPTokenizer`` does this in ``_tokenize``; transformers 5's
    tokenizers-backed one has no ``_tokenize`` (and its ``tokenize`` splits "!" out as the pad token,
    id 0), so its normalizer, pre-tokenizer and BPE model are run directly: they leave the added
    vocabulary out.
    """
    slow = getattr(tokenizer, "_tokenize", None)
    if slow is not None:
        return tokenizer.convert_tokens_to_ids(slow(text))
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    return [token.id for word, _ in words for token in backend.model.tokenize(word)]


# -- loading --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputFileError(path, "missing (expected in a diffusers model folder)") from None
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"unreadable JSON: {exc}") from None


def _load_tokenizer(folder: Path | None, family: str = "SD2", second: bool = False):
    """The folder's tokenizer when it has one, else the family's built-in one (same ids, see
    :mod:`~medical_diffusion.backend.clip_tokenizer`)."""
    from transformers import CLIPTokenizer

    from medical_diffusion.backend.clip_tokenizer import load_tokenizer_for

    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return load_tokenizer_for(family, second)


def load_diffusers_folder(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          attention: str = "auto") -> DiffusersBackend:
    """Load a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``;
    SDXL also ``text_encoder_2/``); the family comes from :func:`~medical_diffusion.backend.families.family_of_folder`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from medical_diffusion.backend.families import family_of_folder

    folder = Path(folder)
    family = family_of_folder(folder)
    subs = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "SDXL" else ())
    for sub in subs:
        if not (folder / sub / "config.json").is_file():
            what = "an SDXL" if family == "SDXL" else "a diffusers Stable Diffusion"
            raise InputFileError(folder / sub / "config.json", f"missing: not {what} folder")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    text_encoder_2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
        vae_dtype = vae_dtype_for(dtype, argparse_namespace(vae_config))
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True
        )
        if family == "SDXL":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(folder, f"cannot load model weights: {exc}") from None
    return DiffusersBackend(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(folder / "tokenizer", family),
        scheduler_config=sched,
        device=device,
        dtype=dtype,
        label=str(folder),
        attention=attention,
        vae_dtype=vae_dtype,
        family=family,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_load_tokenizer(folder / "tokenizer_2", family, second=True) if family == "SDXL" else None,
    )


#: what each family's single file is called in messages
_FAMILY_NAMES = {"SD1": "Stable Diffusion 1", "SD2": "Stable Diffusion 2", "SDXL": "Stable Diffusion XL"}


def load_single_file(
    path: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    attention: str = "auto",
    family: str | None = None,
) -> DiffusersBackend:
    """Load an SD1/SD2/SDXL ``.ckpt``/``.safetensors`` with the config files shipped in this package.

    ``family`` None tells it from the file's tensor names
    (:func:`~medical_diffusion.backend.families.family_of_checkpoint`). diffusers reads the
    shipped config folder (``configs/sd1``, ``sd2``, ``sdxl``) as a local path: nothing is downloaded.
    ``prediction_type`` None detects it for SD2 as A1111 does (:func:`detect_v_prediction`): SD 2.x
    768-v checkpoints are v-prediction, the 512 "base" ones epsilon; SD1 and SDXL are epsilon.
    A v-prediction model gets ``upcast_attention`` (the shipped config is the 512-base one, which
    lacks it; diffusers' own converter sets it for SD 2.1-v).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from medical_diffusion.backend.families import family_of_checkpoint

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "model file not found")
    family = family or family_of_checkpoint(path)
    config_dir = CONFIG_DIR / family.lower()
    tokenizer = _load_tokenizer(None, family)
    kwargs: dict[str, Any] = dict(config=str(config_dir), tokenizer=tokenizer, local_files_only=True, torch_dtype=dtype)
    if family == "SDXL":
        pipeline_class = StableDiffusionXLPipeline
        kwargs.update(tokenizer_2=_load_tokenizer(None, family, second=True), add_watermarker=False)
    else:
        pipeline_class = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many types for bad checkpoints
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputFileError(path, f"cannot load as a {_FAMILY_NAMES[family]} checkpoint: {first}") from None
    sched = dict(pipe.scheduler.config)
    sched["prediction_type"] = prediction_type or "epsilon"
    backend = DiffusersBackend(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=tokenizer,
        scheduler_config=sched,
        device=device,
        dtype=dtype,
        label=str(path),
        attention=attention,
        family=family,
        text_encoder_2=getattr(pipe, "text_encoder_2", None) if family == "SDXL" else None,
        tokenizer_2=kwargs.get("tokenizer_2"),
    )
    if prediction_type is None and family == "SD2":  # on the target device: a fp16 UNet forward on the CPU is slow
        detected = "v_prediction" if detect_v_prediction(backend.unet) else "epsilon"
        log.info("%s: detected %s", path.name, detected)
        backend.set_prediction_type(detected)
    return backend


@torch.no_grad()
def detect_v_prediction(unet) -> bool:
    """A1111's test (``is_using_v_parameterization_for_sd2``): a v-model's output at t=999 on a
    constant input falls well below the input."""
    param = next(unet.parameters())
    width = int(unet.config.cross_attention_dim)
    cond = torch.full((1, 2, width), 0.5, device=param.device, dtype=param.dtype)
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
    return bool((out - x).float().mean().item() < -1)


def load_backend(
    model: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    attention: str = "auto",
) -> ModelBackend:
    """A backend for ``model``: a diffusers folder, a single ``.ckpt``/``.safetensors`` file, or a tiny
    demo model (``"tiny"`` SD2, ``"tiny-sd1"``, ``"tiny-sdxl"``).

    The tiny models are random-weight models of their family's shape for demos and tests (they make
    noise, not images). The family of a folder or file is detected (:mod:`~medical_diffusion.backend.families`).
    ``device``/``dtype`` are the frozen weights' (see :mod:`medical_diffusion.devices`); ``attention``
    is ``auto``/``sdpa``/``xformers``/``classic`` (:func:`set_attention`).
    """
    from medical_diffusion.backend.families import tiny_family

    family = tiny_family(model)
    if family is not None:
        from medical_diffusion.backend.tiny import build_tiny_backend

        kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        if family != "SD2":
            kwargs["family"] = family
        return build_tiny_backend(device=device, dtype=dtype, attention=attention, **kwargs)
    path = Path(model).expanduser()
    if path.is_dir():
        backend = load_diffusers_folder(path, device, dtype, attention)
        if prediction_type and prediction_type != backend.prediction_type:
            backend.set_prediction_type(prediction_type)
        elif backend.prediction_type == "v_prediction" and not backend.unet.config.get("upcast_attention"):
            backend.enable_upcast_attention()
        return backend
    if path.suffix.lower() in (".ckpt", ".safetensors"):
        return load_single_file(path, device, dtype, prediction_type, attention)
    if not path.exists():
        raise InputFileError(path, "model not found (give a diffusers folder, a .ckpt/.safetensors file, "
                                   "or 'tiny' / 'tiny-sd1' / 'tiny-sdxl')")
    raise InputFileError(path, "not a model: expected a diffusers folder or a .ckpt/.safetensors file")


def argparse_namespace(config: Mapping[str, Any]):
    """A config dict seen with attribute access (``force_upcast`` as diffusers' configs expose it)."""
    import types

    return types.SimpleNamespace(**dict(config))


def set_attention(backend: DiffusersBackend, mode: str = "auto") -> str:
    """Set the UNet's and VAE's attention kernel; returns the one in use.

    ``auto``/``sdpa``: torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels;
    diffusers' default on torch 2, set explicitly so nothing leaves the classic processor in place);
    ``xformers``: xformers' memory-efficient attention (must be installed); ``classic``: diffusers'
    plain attention (the full score matrix: the most memory, but honours ``upcast_attention``).
    """
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    mode = (mode or "auto").lower()
    if mode == "auto":
        mode = "sdpa" if hasattr(F, "scaled_dot_product_attention") else "classic"
    modules = (backend.unet, backend.vae)
    if mode == "sdpa":
        for module in modules:
            module.set_attn_processor(AttnProcessor2_0())
    elif mode == "classic":
        for module in modules:
            module.set_attn_processor(AttnProcessor())
    elif mode == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise MedDiffError("--attention xformers: xformers is not installed (pip install xformers, "
                               "or use --attention sdpa)") from None
        try:
            for module in modules:
                module.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # xformers built for another torch/CUDA, or no GPU
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MedDiffError(f"--attention xformers: unusable here ({first}); use --attention sdpa") from None
    else:
        raise MedDiffError(f"--attention {mode}: use auto, sdpa, xformers or classic")
    return mode
