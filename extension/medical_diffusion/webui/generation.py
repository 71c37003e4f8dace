"""Generation inside the webui through ``modules.processing``, so tab results equal txt2img/img2img."""

from __future__ import annotations

from typing import Any

#: our fill-mode names -> A1111's ``inpainting_fill`` values (fill, original, latent noise, latent nothing)
INPAINTING_FILL = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}
SAMPLER = "Euler a"  # the paper's ancestral Euler


def _common(prompt: str, negative_prompt: str, seed: int, steps: int, cfg_scale: float, width: int,
            height: int) -> dict[str, Any]:
    from modules import shared

    return dict(sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed),
                sampler_name=SAMPLER, steps=int(steps), cfg_scale=float(cfg_scale), width=int(width),
                height=int(height), do_not_save_samples=True, do_not_save_grid=True)


def _run(p) -> list:
    from modules import processing

    try:
        processed = processing.process_images(p)
    finally:
        p.close()
    return list(processed.images)


def txt2img(prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = 100, cfg_scale: float = 2.0,
            width: int = 512, height: int = 512, batch_size: int = 1) -> list:
    """``batch_size`` images with the webui's own txt2img (composable ``AND`` prompts included)."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(
        batch_size=int(batch_size), **_common(prompt, negative_prompt, seed, steps, cfg_scale, width, height))
    return _run(p)[: int(batch_size)]


def inpaint(image, mask, prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = 100,
            cfg_scale: float = 2.0, denoising_strength: float = 0.75, fill: str = "original", mask_blur: int = 4,
            only_masked: bool = True, padding: int = 32, width: int = 512, height: int = 512):
    """One image from the webui's img2img inpainting (white = repaint)."""
    from modules import processing

    if fill not in INPAINTING_FILL:
        raise ValueError(f"unknown fill mode {fill!r} (choose from {', '.join(INPAINTING_FILL)})")
    p = processing.StableDiffusionProcessingImg2Img(
        init_images=[image.convert("RGB")], mask=mask.convert("L"), mask_blur=int(mask_blur),
        inpainting_fill=INPAINTING_FILL[fill], inpaint_full_res=bool(only_masked),
        inpaint_full_res_padding=int(padding), denoising_strength=float(denoising_strength), batch_size=1,
        **_common(prompt, negative_prompt, seed, steps, cfg_scale, width, height))
    return _run(p)[0]
