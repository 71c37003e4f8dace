"""A tiny random-weight, SD2-shaped model for tests and workflow demos.

Same structure as Stable Diffusion 2 (OpenCLIP-style text encoder with SD2's tokenizer, linear-
projection cross-attention UNet, 8x-downsampling 4-channel VAE, SD2 noise schedule) but a few
hundred thousand random weights, so it runs in milliseconds on a CPU. It produces noise, not
images: a WORKFLOW DEMO only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medical_diffusion.backend.diffusers_backend import DiffusersBackend

TINY_LABEL = "tiny random-weight SD2-shaped model (workflow demo, not a real model)"
#: SD2's noise schedule (``prediction_type`` filled in per model)
SD2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_text_config(width: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def build_tiny_backend(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    text_width: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "auto",
) -> DiffusersBackend:
    """A tiny SD2-shaped :class:`DiffusersBackend` with random weights fixed by ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_width,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(tiny_text_config(text_width))
    sched = dict(SD2_SCHEDULER, prediction_type=prediction_type)
    return DiffusersBackend(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_sd2_tokenizer(),
        scheduler_config=sched,
        device=device,
        dtype=dtype,
        label=TINY_LABEL,
        attention=attention,
    )


def save_tiny_model(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write the tiny model as a diffusers folder (loadable by ``load_backend`` and diffusers)."""
    return build_tiny_backend(seed, prediction_type=prediction_type).save_pretrained(folder)
