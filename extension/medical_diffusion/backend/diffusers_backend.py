""":class:`ModelBackend` on Hugging Face diffusers/transformers objects (standalone use).

Prompts are encoded exactly as A1111 does for SD2 (``sd_hijack_clip`` + ``sd_hijack_open_clip``):
75-token chunks between start/end tokens, padding with id 0 after the end token, embedding
vectors spliced in place of their name's tokens, emphasis ``(word:1.2)`` with the mean restored
(skipped for a chunk whose mean is ~0, see :mod:`~medical_diffusion.backend.emphasis`).
The CLIP text transformer is run from input embeddings so gradients reach trainable vectors.
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

#: SD2 config folder shipped with the package (used for single-file checkpoints)
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
        self.attention = set_attention(self, attention)
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu()
        self.prediction_type = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise MedDiffError(f"unsupported prediction type {self.prediction_type!r}")
        self.text_width = int(self.text_encoder.config.hidden_size)
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
        self._chunk_cache: dict[tuple, list[PromptChunk]] = {}

    # -- components -----------------------------------------------------------------------
    @property
    def pipeline_components(self) -> dict[str, Any]:
        """unet, vae, text_encoder, tokenizer and a fresh DDPM-config scheduler, for diffusers code."""
        from diffusers import DDPMScheduler

        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": DDPMScheduler.from_config(self.scheduler_config),
        }

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

        from diffusers import StableDiffusionPipeline

        parts = self.pipeline_components
        if own_text_encoder:
            parts["text_encoder"] = copy.deepcopy(self.text_encoder)
            parts["tokenizer"] = copy.deepcopy(self.tokenizer)
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers folder that :func:`load_backend` reads back."""
        folder = Path(folder)
        self.make_pipeline().save_pretrained(folder, safe_serialization=True)
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
        # ``_tokenize`` skips added-token splitting, so "!!" stays one token as in OpenCLIP; a tokenizer
        # without it (transformers 5's tokenizers-backed CLIPTokenizer) splits with its own BPE
        split = getattr(self.tokenizer, "_tokenize", None) or self.tokenizer.tokenize
        return self.tokenizer.convert_tokens_to_ids(split(text))

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.text_encoder.text_model.embeddings.token_embedding

    def text_to_vectors(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self._tokenize(text), dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.token_embedding(ids).float().cpu()

    def token_embedding_norm(self) -> float:
        # row blocks: no fp32 copy of the whole (49408, width) table
        weight = self.token_embedding.weight.detach()
        total = torch.zeros((), dtype=torch.float64, device=weight.device)
        for start in range(0, weight.shape[0], 4096):
            total += weight[start : start + 4096].float().norm(dim=1).sum().double()
        return float(total / weight.shape[0])

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
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=self.device)
        if self.id_pad != self.chunk_spec.id_end:  # SD2: pad with id 0 after the first end token
            for row in range(tokens.shape[0]):
                end = chunks[row].tokens.index(self.chunk_spec.id_end)
                tokens[row, end + 1 :] = self.id_pad
        embeds = self.token_embedding(tokens)
        rows = []
        for row, chunk in enumerate(chunks):
            tensor = embeds[row]
            for offset, name in chunk.fixes:
                emb = embeddings[name].to(tensor.device, tensor.dtype)
                n = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[: offset + 1], emb[:n], tensor[offset + 1 + n :]])
            rows.append(tensor)
        z = self.encode_token_embeddings(torch.stack(rows))
        multipliers = torch.tensor([c.multipliers for c in chunks], dtype=z.dtype, device=z.device)
        if bool((multipliers != 1).any()):  # A1111 "Original" emphasis, chunk by chunk
            z = apply_emphasis(z, multipliers)
        return z.reshape(1, -1, z.shape[-1])

    def encode_token_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP text transformer output ``(B, T, width)`` from token vectors ``(B, T, width)``."""
        text_model = self.text_encoder.text_model
        hidden = text_model.embeddings(inputs_embeds=inputs_embeds)
        b, t = hidden.shape[:2]
        causal = torch.full((t, t), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        causal = causal.triu(1)[None, None].expand(b, 1, t, t)
        # the additive causal mask as ``attention_mask``: transformers 4.x adds it, and 5.x (which dropped
        # ``causal_attention_mask`` and would ignore it silently) applies it as given
        out = text_model.encoder(inputs_embeds=hidden, attention_mask=causal)
        last = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return text_model.final_layer_norm(last)

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
        return self.unet(
            latents.to(self.device, self.dtype), t, encoder_hidden_states=cond.to(self.device, self.dtype)
        ).sample


# -- loading --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputFileError(path, "missing (expected in a diffusers model folder)") from None
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"unreadable JSON: {exc}") from None


def _load_tokenizer(folder: Path | None):
    from transformers import CLIPTokenizer

    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer

    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return load_sd2_tokenizer()


def load_diffusers_folder(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          attention: str = "auto") -> DiffusersBackend:
    """Load a diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise InputFileError(folder / sub / "config.json", "missing: not a diffusers Stable Diffusion folder")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
        vae_dtype = vae_dtype_for(dtype, argparse_namespace(vae_config))
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(folder, f"cannot load model weights: {exc}") from None
    return DiffusersBackend(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(folder / "tokenizer"),
        scheduler_config=sched,
        device=device,
        dtype=dtype,
        label=str(folder),
        attention=attention,
        vae_dtype=vae_dtype,
    )


def load_single_file(
    path: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    attention: str = "auto",
) -> DiffusersBackend:
    """Load an SD2 ``.ckpt``/``.safetensors`` with the config files shipped in this package.

    ``prediction_type`` None detects it as A1111 does (:func:`detect_v_prediction`): SD 2.x
    768-v checkpoints are v-prediction, the 512 "base" ones epsilon. A v-prediction model gets
    ``upcast_attention`` (the shipped config is the 512-base one, which lacks it; diffusers' own
    converter sets it for SD 2.1-v).
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "model file not found")
    config_dir = CONFIG_DIR / "sd2"
    tokenizer = _load_tokenizer(None)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config_dir),
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            torch_dtype=dtype,
        )
    except Exception as exc:  # diffusers raises many types for bad checkpoints
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputFileError(path, f"cannot load as a Stable Diffusion 2 checkpoint: {first}") from None
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
    )
    if prediction_type is None:  # on the target device: a fp16 UNet forward on the CPU is slow or unsupported
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
    """A backend for ``model``: a diffusers folder, a single ``.ckpt``/``.safetensors`` file, or ``"tiny"``.

    ``"tiny"`` is a random-weight SD2-shaped model for demos and tests (it makes noise, not images).
    ``device``/``dtype`` are the frozen weights' (see :mod:`medical_diffusion.devices`); ``attention``
    is ``auto``/``sdpa``/``xformers``/``classic`` (:func:`set_attention`).
    """
    if str(model).lower() == "tiny":
        from medical_diffusion.backend.tiny import build_tiny_backend

        kwargs = {"prediction_type": prediction_type} if prediction_type else {}
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
        raise InputFileError(path, "model not found (give a diffusers folder, a .ckpt/.safetensors file, or 'tiny')")
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
