"""The interface the training loop, samplers and inpainting use to reach a Stable Diffusion model.

Conventions shared by every implementation:

- pixels are float tensors ``(B, 3, H, W)`` in ``[-1, 1]``;
- latents are already multiplied by the VAE scaling factor (0.18215 for SD1/SD2, 0.13025 SDXL);
- ``timesteps`` are the model's discrete training timesteps as a float tensor ``(B,)``
  (fractional values are allowed: k-diffusion style samplers interpolate between them);
- ``family`` is ``"SD1"``, ``"SD2"`` or ``"SDXL"``;
- ``text_widths`` are the blocks of one token vector, in order: ``{"vectors": W}`` for SD1/SD2,
  ``{"clip_l": 768, "clip_g": 1280}`` for SDXL (smaller for the tiny test models); ``text_width``
  is their sum, so an SDXL embedding is ONE tensor ``(n, 768 + 1280)``, the CLIP-L block first
  (as A1111's ``encode_embedding_init_text`` concatenates them);
- conditioning is ``(B, cond_prefix_rows + 77 * chunks, text_width)``: the first
  ``cond_prefix_rows`` rows (0 for SD1/SD2; 1 for SDXL: its pooled CLIP-G embedding, zero-padded)
  carry per-prompt vector conditioning that :meth:`ModelBackend.predict` unpacks, the rest are
  token rows. An embedding's vectors are spliced in wherever its name appears in the prompt, A1111
  style, and gradients flow into them. Code that batches conditionings of different chunk counts
  pads the token rows only (:meth:`ModelBackend.pad_conditionings`); padding by repeating the last
  row (A1111's ``stack_conds``) keeps the prefix rows in front as well.
"""

from __future__ import annotations

import abc
from typing import Mapping

import torch
import torch.nn.functional as F


class ModelBackend(abc.ABC):
    """A frozen Stable Diffusion model seen through the few operations this project needs."""

    #: width of one token vector (768 SD1, 1024 SD2)
    text_width: int
    #: channels of a latent (4)
    latent_channels: int
    #: pixels per latent cell along each axis (8)
    vae_scale_factor: int
    #: ``"epsilon"`` or ``"v_prediction"``
    prediction_type: str
    #: cumulative product of alphas over the training timesteps, float32 on CPU
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    #: leading conditioning rows that are not token rows (SDXL: 1, the pooled text embedding)
    cond_prefix_rows: int = 0
    #: an empty negative prompt conditions on zeros (SDXL in A1111 and diffusers), not on ""'s encoding
    zero_empty_negative: bool = False

    @property
    def family(self) -> str:
        """``"SD1"``, ``"SD2"`` or ``"SDXL"`` (implementations set it; else told from ``text_width``)."""
        return getattr(self, "_family", None) or ("SD1" if int(self.text_width) == 768 else "SD2")

    @family.setter
    def family(self, value: str) -> None:
        self._family = value

    @property
    def text_widths(self) -> dict[str, int]:
        """The blocks of one token vector in order (``{"vectors": text_width}`` unless set)."""
        return dict(getattr(self, "_text_widths", None) or {"vectors": int(self.text_width)})

    @text_widths.setter
    def text_widths(self, value: dict[str, int]) -> None:
        self._text_widths = dict(value)

    @property
    def vae_device(self) -> torch.device:
        """Where the VAE is (implementations that can move it override this and :meth:`place_vae`)."""
        return self.device

    def place_vae(self, device: str | torch.device) -> None:
        """Move the VAE to ``device`` (a no-op for a backend whose host manages its memory)."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    # -- text -----------------------------------------------------------------------------
    @abc.abstractmethod
    def text_to_vectors(self, text: str) -> torch.Tensor:
        """Token embedding rows ``(k, text_width)`` of ``text`` without start/end tokens."""

    @abc.abstractmethod
    def token_embedding_norm(self) -> float:
        """Mean L2 norm of the vocabulary's token vectors (the scale trained vectors should have)."""

    @abc.abstractmethod
    def encode_prompt(self, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Conditioning ``(1, 77 * chunks, text_width)`` for ``prompt``.

        ``embeddings`` maps a name to its vectors ``(n, text_width)``; each occurrence of the
        name in the prompt is replaced by those vectors (which may require grad).
        """

    def pad_conditionings(self, conds: list[torch.Tensor]) -> torch.Tensor:
        """Batch conditionings ``(1, prefix + 77 * chunks, width)`` of different chunk counts into one
        tensor, padding the token rows with the empty prompt's chunks (A1111); the prefix rows stay first."""
        length = max(c.shape[1] for c in conds)
        if all(c.shape[1] == length for c in conds):
            return torch.cat(conds)
        empty = self.encode_prompt("")[:, self.cond_prefix_rows :]
        return torch.cat([torch.cat([c] + [empty] * ((length - c.shape[1]) // empty.shape[1]), 1) for c in conds])

    # -- images ---------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents of ``pixels``: the posterior mean, or one sample when ``sample``."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` from scaled latents."""

    # -- denoiser -------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw model output (epsilon or v, per ``prediction_type``) for noisy ``latents``."""

    def predict_eps(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise, converting from v-prediction where needed."""
        out = self.predict(latents, timesteps, cond)
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = self._alpha_sigma(timesteps, latents)
        return sigma * latents + alpha * out

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``q(x_t | x_0)``."""
        alpha, sigma = self._alpha_sigma(timesteps, latents)
        return alpha * latents + sigma * noise

    def diffusion_loss(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        weight: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error of the model's prediction against its training target.

        ``weight`` (``(B, 1, h, w)`` at latent resolution) scales the per-element error,
        e.g. to make a lesion region count more; the result is a weighted mean. ``sample_weight``
        ``(B,)`` scales each sample's error (min-SNR-gamma): ``sum(s_b * w * err^2) / sum(w)``, or
        ``mean(s_b * err^2)`` without ``weight``. Both None: the plain MSE.
        """
        noisy = self.add_noise(latents, noise, timesteps)
        pred = self.predict(noisy, timesteps, cond).float()
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            alpha, sigma = self._alpha_sigma(timesteps, latents)
            target = alpha * noise - sigma * latents
        else:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")
        target = target.float()
        if sample_weight is not None:
            err = (pred - target) ** 2 * sample_weight.to(pred).view((-1,) + (1,) * (pred.ndim - 1))
            if weight is None:
                return err.mean()
            weight = weight.to(pred).expand_as(pred)
            return (err * weight).sum() / weight.sum().clamp_min(1e-12)
        if weight is None:
            return F.mse_loss(pred, target)
        weight = weight.to(pred).expand_as(pred)
        return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1e-12)

    def _alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), interpolated for fractional t."""
        abar = alpha_bar_at(self.alphas_cumprod, timesteps.to(like.device))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)


def alpha_bar_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar at ``timesteps`` (float32, on their device), linearly interpolated for fractional t."""
    acp = alphas_cumprod.to(timesteps.device, torch.float32)
    t = timesteps.to(torch.float32).clamp(0, acp.shape[0] - 1)
    lo = t.floor().long()
    hi = t.ceil().long()
    frac = t - lo.float()
    return acp[lo] * (1 - frac) + acp[hi] * frac
