"""Tiny random-weight models of each family's shape for tests and workflow demos.

``"tiny"`` has the structure of Stable Diffusion 2 (OpenCLIP-style text encoder with SD2's
tokenizer, linear-projection cross-attention UNet, 8x-downsampling 4-channel VAE, SD2 noise
schedule) but a few hundred thousand random weights, so it runs in milliseconds on a CPU.
``"tiny-sd1"`` is SD1-shaped (CLIP ViT-L-style ``quick_gelu`` encoder, end-token padding, SD1's
UNet attention) and ``"tiny-sdxl"`` SDXL-shaped (two text encoders 32 + 48 wide, the second with a
projection, a ``text_time`` UNet conditioned on pooled text and size ids, VAE scaling 0.13025).
They produce noise, not images: WORKFLOW DEMOS only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medical_diffusion.backend.diffusers_backend import DiffusersBackend

TINY_LABEL = "tiny random-weight SD2-shaped model (workflow demo, not a real model)"
#: label of each family's tiny model
TINY_LABELS = {
    "SD1": "tiny random-weight SD1-shaped model (workflow demo, not a real model)",
    "SD2": TINY_LABEL,
    "SDXL": "tiny random-weight SDXL-shaped model (workflow demo, not a real model)",
}
#: text-encoder widths of tiny-sdxl (CLIP-L-like, then OpenCLIP-bigG-like with projection)
TINY_SDXL_WIDTHS = (32, 48)
#: tiny-sdxl's ``addition_time_embed_dim`` (SDXL: 256)
TINY_SDXL_TIME_DIM = 8
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


def tiny_text_config(width: int = 32, hidden_act: str = "gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
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
    family: str = "SD2",
) -> DiffusersBackend:
    """A tiny :class:`DiffusersBackend` of ``family``'s shape with random weights fixed by ``seed``
    (``text_width``: the SD1/SD2 encoder width; tiny-sdxl has :data:`TINY_SDXL_WIDTHS`)."""
    from transformers import CLIPTextModel

    from medical_diffusion.backend.clip_tokenizer import load_sd2_tokenizer

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    if family == "SD1":
        return _build_tiny_sd1(seed, prediction_type, text_width, device, dtype, attention)
    if family == "SDXL":
        return _build_tiny_sdxl(seed, prediction_type, device, dtype, attention)
    if family != "SD2":
        raise ValueError(f"family must be 'SD1', 'SD2' or 'SDXL', not {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(text_width, linear_projection=True)
        vae = _tiny_vae(0.18215)
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


def _tiny_unet(text_width: int, linear_projection: bool):
    """The SD1/SD2-shaped tiny UNet (SD2: linear cross-attention projections, SD1: 1x1 convolutions)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=(2, 4),
        use_linear_projection=linear_projection,
        norm_num_groups=16,
    )


def _tiny_vae(scaling_factor: float, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _build_tiny_sd1(seed, prediction_type, text_width, device, dtype, attention) -> DiffusersBackend:
    """SD1's shape: CLIP ViT-L-like encoder (``quick_gelu``), conv-projection UNet attention."""
    from transformers import CLIPTextModel

    from medical_diffusion.backend.clip_tokenizer import load_sd1_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(text_width, linear_projection=False)
        vae = _tiny_vae(0.18215)
        text_encoder = CLIPTextModel(tiny_text_config(text_width, hidden_act="quick_gelu"))
    return DiffusersBackend(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_sd1_tokenizer(),
        scheduler_config=dict(SD2_SCHEDULER, prediction_type=prediction_type), device=device, dtype=dtype,
        label=TINY_LABELS["SD1"], attention=attention, family="SD1",
    )


def _build_tiny_sdxl(seed, prediction_type, device, dtype, attention) -> DiffusersBackend:
    """SDXL's shape: CLIP-L-like + bigG-like (with projection) encoders, ``text_time`` UNet."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from medical_diffusion.backend.clip_tokenizer import load_sd1_tokenizer, load_sd2_tokenizer

    width_l, width_g = TINY_SDXL_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width_l + width_g,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=16,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=width_g + 6 * TINY_SDXL_TIME_DIM,
        )
        vae = _tiny_vae(0.13025)
        text_encoder = CLIPTextModel(tiny_text_config(width_l, hidden_act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(width_g))
    return DiffusersBackend(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_sd1_tokenizer(),
        scheduler_config=dict(SD2_SCHEDULER, prediction_type=prediction_type), device=device, dtype=dtype,
        label=TINY_LABELS["SDXL"], attention=attention, family="SDXL",
        text_encoder_2=text_encoder_2, tokenizer_2=load_sd2_tokenizer(),
    )


def save_tiny_model(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon", family: str = "SD2") -> Path:
    """Write a tiny model as a diffusers folder (loadable by ``load_backend`` and diffusers)."""
    return build_tiny_backend(seed, prediction_type=prediction_type, family=family).save_pretrained(folder)
