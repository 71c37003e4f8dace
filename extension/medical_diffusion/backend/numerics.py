"""Half-precision safety: which dtype the VAE runs in, and a clear stop when fp16 makes NaN.

SD 2.x in fp16 has two known failure modes: attention logits overflowing in the 768-v UNet
(diffusers' ``upcast_attention``; A1111's ``--upcast-sampling``) and the VAE overflowing at
512-768 px (diffusers' ``AutoencoderKL.config.force_upcast``, honoured by its SDXL pipelines).
"""

from __future__ import annotations

import torch

from medical_diffusion.errors import MedDiffError

NAN_HINT = "NaN in fp16: use --precision fp32 or bf16, or a UNet config with upcast_attention"


def vae_dtype_for(weights: torch.dtype, vae_config=None) -> torch.dtype:
    """The VAE's dtype: fp32 when the weights are fp16 and the VAE's config asks to be upcast
    (``force_upcast``, True unless a fixed fp16 VAE says otherwise), else the weights' dtype.

    bf16 has fp32's range, so only fp16 is upcast (as diffusers does).
    """
    if weights != torch.float16:
        return weights
    force = True if vae_config is None else bool(getattr(vae_config, "force_upcast", True))
    return torch.float32 if force else weights


def nan_message(what: str, dtype: torch.dtype) -> str:
    """``what`` is not finite, with the fp16 hint when ``dtype`` is fp16."""
    if dtype == torch.float16:
        return f"{what} is not finite. {NAN_HINT}"
    return f"{what} is not finite (try a lower learning rate, or --precision fp32)"


def check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Raise :class:`MedDiffError` (with :data:`NAN_HINT` for fp16) when ``tensor`` holds NaN/inf.

    This reads the tensor on the host: call it once per image or per logged step, not per kernel.
    """
    if not bool(torch.isfinite(tensor).all()):
        raise MedDiffError(nan_message(what, dtype))
