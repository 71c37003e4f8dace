"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

Each sample's squared error is scaled by ``min(SNR(t), gamma) / SNR(t)`` for epsilon prediction and
``min(SNR(t), gamma) / (SNR(t) + 1)`` for v-prediction, where ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``.
The training loop calls :func:`weighted_diffusion_loss` only when the option is on; off, it keeps
:meth:`ModelBackend.diffusion_loss` (the paper's plain MSE, bit for bit).
"""

from __future__ import annotations

import torch

from medical_diffusion.backend.base import ModelBackend, alpha_bar_at

__all__ = ["min_snr_weights", "snr_at", "weighted_diffusion_loss"]


def snr_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``alpha_bar / (1 - alpha_bar)`` at ``timesteps`` ``(B,)`` (fractional ones interpolated), float32."""
    abar = alpha_bar_at(alphas_cumprod, timesteps)
    return abar / (1 - abar).clamp_min(1e-20)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights ``(B,)`` for ``snr`` ``(B,)``; an SNR of 0 gets weight 1 (epsilon) or 0 (v)."""
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction_type == "epsilon":
        return torch.where(snr > gamma, clipped / snr.clamp_min(1e-20), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def weighted_diffusion_loss(
    backend: ModelBackend,
    latents: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    weight: torch.Tensor | None,
    sample_weight: torch.Tensor,
) -> torch.Tensor:
    """:meth:`ModelBackend.diffusion_loss` with each sample's error scaled by ``sample_weight`` ``(B,)``."""
    return backend.diffusion_loss(latents, cond, noise, timesteps, weight, sample_weight=sample_weight)
