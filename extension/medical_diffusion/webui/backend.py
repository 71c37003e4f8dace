""":class:`ModelBackend` on the webui's loaded model (``shared.sd_model``): SD 1.x, SD 2.x and SDXL.

Trainable vectors reach the conditioning through A1111's own prompt hijack: for the duration
of one ``encode_prompt`` call they are registered in the embedding database under their name,
so A1111's tokeniser/chunking splices them exactly as txt2img will later.

SDXL (``sd_models_xl``): a token vector is one tensor ``(n, 768 + 1280)``, clip_l first, as the
conditioner's ``encode_embedding_init_text`` concatenates; it is registered as an A1111
``Embedding`` whose ``vec`` is ``{"clip_l": ..., "clip_g": ...}`` (views that keep gradients).
``encode_prompt`` returns one tensor: the conditioner's ``"vector"`` (pooled clip_g + size
embeddings, 2816 values) zero-padded into the first :attr:`cond_prefix_rows` rows, then the
``"crossattn"`` rows; :meth:`predict` unpacks it into the dict ``apply_model`` takes. The size
embeddings use :attr:`image_size` (the training resolution, see :meth:`set_image_size`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.webui import model_family

#: SDXL's native resolution, which A1111's ``get_learned_conditioning`` also assumes when a prompt
#: carries no width/height
SDXL_DEFAULT_SIZE = 1024


def split_blocks(vectors: torch.Tensor, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``(n, sum(widths))`` -> ``{block: (n, width)}`` views in ``widths`` order (gradients flow through)."""
    if int(vectors.shape[-1]) != sum(widths.values()):
        raise MedDiffError(f"vectors of width {int(vectors.shape[-1])} do not fit the model's blocks {dict(widths)}")
    out, start = {}, 0
    for key, width in widths.items():
        out[key] = vectors[..., start:start + width]
        start += width
    return out


def pack_cond(crossattn: torch.Tensor, vector: torch.Tensor, rows: int) -> torch.Tensor:
    """``(B, T, W)`` token rows and ``(B, D)`` vector conditioning -> ``(B, rows + T, W)``."""
    batch, _, width = crossattn.shape
    dtype = torch.promote_types(crossattn.dtype, vector.dtype)
    pad = vector.new_zeros(batch, rows * width - int(vector.shape[-1]), dtype=dtype)
    prefix = torch.cat([vector.to(dtype), pad], dim=1).view(batch, rows, width)
    return torch.cat([prefix, crossattn.to(dtype)], dim=1)


def unpack_cond(cond: torch.Tensor, rows: int, vector_dim: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_cond`: the ``{"crossattn", "vector"}`` dict SDXL's ``apply_model`` takes."""
    batch = cond.shape[0]
    return {"crossattn": cond[:, rows:], "vector": cond[:, :rows].reshape(batch, -1)[:, :vector_dim]}


class WebuiBackend(ModelBackend):
    """The currently loaded webui checkpoint seen through :class:`ModelBackend`."""

    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, sd_model=None):
        from modules import devices, sd_hijack, shared

        self.model = sd_model if sd_model is not None else shared.sd_model
        #: "SD1", "SD2" or "SDXL"; MedDiffError (shown in the Train tab) for what is not supported
        self.family = model_family.detect_family(self.model)
        info = getattr(self.model, "sd_checkpoint_info", None)
        #: what A1111 itself writes into an embedding it trained: the checkpoint's name and short hash
        self.label = getattr(info, "model_name", None) or "webui"
        self.checkpoint_hash = getattr(info, "shorthash", None)
        self.hijack = sd_hijack.model_hijack
        self.device = devices.device
        self.dtype = devices.dtype
        self.prediction_type = "v_prediction" if getattr(self.model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = self.model.alphas_cumprod.detach().float().cpu()
        self.text_widths = model_family.text_widths(self.model, self.family)
        self.text_width = int(self.text_to_vectors(",").shape[-1])
        if self.text_width != sum(self.text_widths.values()):
            raise model_family.model_error(self.model, f"text width {self.text_width} is not the sum of its blocks {self.text_widths}")
        self.cond_prefix_rows = 0
        self.vector_dim = 0
        #: (width, height) of the images the SDXL size conditioning describes
        self.image_size = (SDXL_DEFAULT_SIZE, SDXL_DEFAULT_SIZE)
        if self.family == "SDXL":
            with torch.no_grad():
                self.vector_dim = int(self._sdxl_conditioning("")["vector"].shape[-1])
            self.cond_prefix_rows = math.ceil(self.vector_dim / self.text_width)

    def set_image_size(self, width: int, height: int) -> None:
        """The image size SDXL's size conditioning describes (A1111 passes txt2img's width/height);
        prompts encoded before this call describe 1024x1024. No effect on SD 1.x/2.x."""
        self.image_size = (int(width), int(height))

    # -- text -----------------------------------------------------------------------------
    def text_to_vectors(self, text: str) -> torch.Tensor:
        return self.model.cond_stage_model.encode_embedding_init_text(text, 1).float()

    def _text_embedders(self) -> list:
        if self.family == "SDXL":
            return model_family.sdxl_text_embedders(self.model)
        return [self.model.cond_stage_model]

    def _token_embedding_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, embedder in zip(self.text_widths, self._text_embedders()):
            module = model_family.token_embedding_module(embedder, self.model)
            out[key] = getattr(module, "wrapped", module).weight
        return out

    def _token_embedding_weight(self) -> torch.Tensor:
        """The token-embedding matrix; SDXL: both vocabularies' rows side by side, clip_l first."""
        weights = list(self._token_embedding_weights().values())
        if len(weights) == 1:
            return weights[0]
        rows = {int(w.shape[0]) for w in weights}
        if len(rows) != 1:
            raise model_family.model_error(self.model, f"its text encoders' vocabularies differ in size {sorted(rows)}")
        return torch.cat([w.detach().float().to(weights[0].device) for w in weights], dim=1)

    def token_embedding_norm(self) -> float:
        """Mean L2 norm of the token vectors; SDXL: of the concatenated (clip_l, clip_g) rows, the
        width a trained vector has."""
        return float(self._token_embedding_weight().detach().float().norm(dim=1).mean())

    def block_token_norms(self) -> dict[str, float]:
        """Mean token-vector norm per block (``{"vectors": ...}`` or ``{"clip_l": ..., "clip_g": ...}``)."""
        return {k: float(w.detach().float().norm(dim=1).mean()) for k, w in self._token_embedding_weights().items()}

    def _webui_embedding(self, name: str, vectors: torch.Tensor):
        from modules.textual_inversion.textual_inversion import Embedding

        vec = split_blocks(vectors, self.text_widths) if self.family == "SDXL" else vectors
        emb = Embedding(vec, name)
        # as create_embedding_from_data sets them (SDXL: shape = clip_g + clip_l widths)
        emb.vectors, emb.shape = int(vectors.shape[0]), int(vectors.shape[-1])
        return emb

    @contextlib.contextmanager
    def _registered(self, embeddings: Mapping[str, torch.Tensor]) -> Iterator[None]:
        db = self.hijack.embedding_db
        previous = {name: db.word_embeddings.get(name) for name in embeddings}
        try:
            for name, vectors in embeddings.items():
                db.register_embedding_by_name(self._webui_embedding(name, vectors), self.model, name)
            yield
        finally:
            for name, old in previous.items():
                db.register_embedding_by_name(old, self.model, name)

    def _autocast(self):
        """The webui's autocast (fp16 weights with float32 inputs), as its own training loop uses."""
        from modules import devices

        return devices.autocast()

    @contextlib.contextmanager
    def _text_gradients(self) -> Iterator[None]:
        """sgm's ``GeneralConditioner.forward`` runs embedders whose ``is_trainable`` is False under
        ``torch.no_grad()``: mark the text embedders trainable for one call so gradients reach the
        spliced vectors (their own weights keep ``requires_grad=False``)."""
        embedders = model_family.sdxl_text_embedders(self.model)
        before = [getattr(e, "is_trainable", False) for e in embedders]
        try:
            for e in embedders:
                e.is_trainable = True
            yield
        finally:
            for e, flag in zip(embedders, before):
                e.is_trainable = flag

    def _sdxl_conditioning(self, prompt: str) -> dict[str, torch.Tensor]:
        from modules import prompt_parser

        width, height = self.image_size
        batch = prompt_parser.SdConditioning([prompt], width=width, height=height)
        with self._text_gradients(), self._autocast():
            return self.model.get_learned_conditioning(batch)

    def encode_prompt(self, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        with self._registered(embeddings or {}):
            if self.family == "SDXL":
                c = self._sdxl_conditioning(prompt)
                return pack_cond(c["crossattn"], c["vector"], self.cond_prefix_rows)
            with self._autocast():
                return self.model.cond_stage_model([prompt])

    # -- images ---------------------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        try:
            return next(self.model.first_stage_model.parameters()).dtype
        except (AttributeError, StopIteration):
            return self.dtype

    def _sdxl_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of SDXL's VAE posterior: sgm's ``encode_first_stage`` returns only a sample
        (``DiagonalGaussianRegularizer``), so read the moments as ``AutoencodingEngineLegacy.encode``
        makes them, without autocast (SDXL's config disables it for the VAE)."""
        vae = getattr(self.model, "first_stage_model", None)
        if not (hasattr(vae, "encoder") and hasattr(vae, "quant_conv")):
            raise model_family.model_error(self.model, "its VAE (first_stage_model) has no encoder/quant_conv to read the posterior from")
        with torch.no_grad():
            moments = vae.quant_conv(vae.encoder(pixels.to(self.device, self._vae_dtype()))).float()
        mean, logvar = moments.chunk(2, dim=1)  # as ldm's DiagonalGaussianDistribution
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def encode_images(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.family == "SDXL":
            latents, std = self._sdxl_posterior(pixels)
        else:
            with self._autocast():
                posterior = self.model.encode_first_stage(pixels.to(self.device, self.dtype))
            latents, std = posterior.mean, posterior.std
        if sample:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            latents = latents + std * noise
        return self.model.scale_factor * latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family == "SDXL":  # sgm's decode_first_stage divides by scale_factor, VAE autocast off
            return self.model.decode_first_stage(latents.to(self.device, self._vae_dtype())).float().clamp(-1, 1)
        with self._autocast():
            return self.model.decode_first_stage(latents.to(self.device, self.dtype)).float().clamp(-1, 1)

    # -- denoiser -------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = cond.to(self.device)
        if self.family == "SDXL":
            cond = unpack_cond(cond, self.cond_prefix_rows, self.vector_dim)
        with self._autocast():
            return self.model.apply_model(latents.to(self.device), timesteps.to(self.device), cond)
