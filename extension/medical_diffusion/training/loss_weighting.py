"""Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

Each sample's squared error is scaled by ``min(SNR(t), gamma) / SNR(t)`` for epsilon prediction and
``min(SNR(t), gamma) / (SNR(t) + 1)`` for v-prediction, where ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``.
The training loop calls :func:`weighted_diffusion_loss` only when the option is on; off, it keeps
:meth:`ModelBackend.diffusion_loss` (the paper's plain MSE, bit for bit).
"""

from __future__ import annotations

import torch

from medical_diffusion.backend.base import ModelBackend

__all__ = ["min_snr_weights", "snr_at", "weighted_diffusion_loss"]


def snr_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``alpha_bar / (1 - alpha_bar)`` at ``timesteps`` ``(B,)`` (fractional ones interpolated), float32."""
    acp = alphas_cumprod.to(timesteps.device, torch.float32)
    t = timesteps.to(torch.float32).clamp(0, acp.shape[0] - 1)
    lo, hi = t.floor().long(), t.ceil().long()
    frac = t - lo.float()
    abar = acp[lo] * (1 - frac) + acp[hi] * frac
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
    """:meth:`ModelBackend.diffusion_loss` with each sample's error scaled by ``sample_weight`` ``(B,)``.

    With a spatial ``weight`` ``(B, 1, h, w)`` the result is ``sum(s_b * w * err^2) / sum(w)`` (the plain
    weighted mean when every ``s_b`` is 1), else ``mean(s_b * err^2)``.
    """
    noisy = backend.add_noise(latents, noise, timesteps)
    pred = backend.predict(noisy, timesteps, cond).float()
    if backend.prediction_type == "epsilon":
        target = noise
    elif backend.prediction_type == "v_prediction":
        target = backend.add_noise(noise, -latents, timesteps)  # alpha * noise - sigma * x0
    else:
        raise ValueError(f"unknown prediction type {backend.prediction_type!r}")
    err = (pred - target.float()) ** 2
    s = sample_weight.to(err).view((-1,) + (1,) * (err.ndim - 1))
    if weight is None:
        return (err * s).mean()
    weight = weight.to(err).expand_as(err)
    return (err * weight * s).sum() / weight.sum().clamp_min(1e-12)
