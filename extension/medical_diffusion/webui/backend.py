""":class:`ModelBackend` on the webui's loaded model (``shared.sd_model``, ldm ``LatentDiffusion``).

Trainable vectors reach the conditioning through A1111's own prompt hijack: for the duration
of one ``encode_prompt`` call they are registered in the embedding database under their name,
so A1111's tokeniser/chunking splices them exactly as txt2img will later.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from medical_diffusion.backend.base import ModelBackend


class WebuiBackend(ModelBackend):
    """The currently loaded webui checkpoint seen through :class:`ModelBackend`."""

    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, sd_model=None):
        from modules import devices, sd_hijack, shared

        self.model = sd_model if sd_model is not None else shared.sd_model
        if self.model is None:
            raise RuntimeError("no Stable Diffusion checkpoint is loaded in the webui")
        info = getattr(self.model, "sd_checkpoint_info", None)
        #: what A1111 itself writes into an embedding it trained: the checkpoint's name and short hash
        self.label = getattr(info, "model_name", None) or "webui"
        self.checkpoint_hash = getattr(info, "shorthash", None)
        self.hijack = sd_hijack.model_hijack
        self.device = devices.device
        self.dtype = devices.dtype
        self.prediction_type = "v_prediction" if getattr(self.model, "parameterization", "eps") == "v" else "epsilon"
        self.alphas_cumprod = self.model.alphas_cumprod.detach().float().cpu()
        self.text_width = int(self.text_to_vectors(",").shape[-1])

    # -- text -----------------------------------------------------------------------------
    def text_to_vectors(self, text: str) -> torch.Tensor:
        return self.model.cond_stage_model.encode_embedding_init_text(text, 1).float()

    def _token_embedding_weight(self) -> torch.Tensor:
        wrapped = self.model.cond_stage_model.wrapped
        if hasattr(wrapped, "model"):  # OpenCLIP (SD2)
            module = wrapped.model.token_embedding
        else:  # HF CLIP (SD1)
            module = wrapped.transformer.text_model.embeddings.token_embedding
        return getattr(module, "wrapped", module).weight

    def token_embedding_norm(self) -> float:
        return float(self._token_embedding_weight().detach().float().norm(dim=1).mean())

    @contextlib.contextmanager
    def _registered(self, embeddings: Mapping[str, torch.Tensor]) -> Iterator[None]:
        from modules.textual_inversion.textual_inversion import Embedding

        db = self.hijack.embedding_db
        previous = {name: db.word_embeddings.get(name) for name in embeddings}
        try:
            for name, vectors in embeddings.items():
                emb = Embedding(vectors, name)
                emb.vectors, emb.shape = int(vectors.shape[0]), int(vectors.shape[-1])
                db.register_embedding_by_name(emb, self.model, name)
            yield
        finally:
            for name, old in previous.items():
                db.register_embedding_by_name(old, self.model, name)

    def _autocast(self):
        """The webui's autocast (fp16 weights with float32 inputs), as its own training loop uses."""
        from modules import devices

        return devices.autocast()

    def encode_prompt(self, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        with self._registered(embeddings or {}), self._autocast():
            return self.model.cond_stage_model([prompt])

    # -- images ---------------------------------------------------------------------------
    def encode_images(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        with self._autocast():
            posterior = self.model.encode_first_stage(pixels.to(self.device, self.dtype))
        latents = posterior.mean
        if sample:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            latents = latents + posterior.std * noise
        return self.model.scale_factor * latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.decode_first_stage(latents.to(self.device, self.dtype)).float().clamp(-1, 1)

    # -- denoiser -------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.apply_model(latents.to(self.device), timesteps.to(self.device), cond.to(self.device))
