"""Inpainting with a plain (non-inpainting) SD1, SD2 or SDXL model, the A1111 img2img way.

Steps as in ``StableDiffusionProcessingImg2Img``: mask blur (separable Gaussian, kernel
``2 * int(2.5 * blur + 0.5) + 1``), optional "only masked" crop around the mask with padding
expanded to the output aspect ratio, masked-content fill ("fill", "original", "latent noise",
"latent nothing"), VAE encode, Euler ancestral from ``denoising_strength`` with the denoised
estimate blended with the original latent outside the mask at every step, and finally the result
pasted back through an overlay of the original image whose alpha is the inverted (blurred) mask,
so pixels outside the blurred mask are exactly the original ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.guidance import encode_composable
from medical_diffusion.generation.sampling import (
    Progress,
    latent_shape,
    latents_to_images,
    resolve_seed,
    sample_latents,
    seed_noise,
)

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A1111's kernel size ``2 * int(2.5 * sigma + 0.5) + 1`` with Gaussian weights (like OpenCV)."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur_mask(mask: np.ndarray, blur_x: float, blur_y: float | None = None) -> np.ndarray:
    """uint8 mask blurred along x then y, borders reflected (OpenCV ``BORDER_REFLECT_101``)."""
    blur_y = blur_x if blur_y is None else blur_y
    out = mask.astype(np.float64)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma <= 0:
            continue
        k = gaussian_kernel(sigma)
        r = len(k) // 2
        n = out.shape[axis]
        if n > 1:
            idx = np.arange(-r, n + r)
            period = 2 * (n - 1)
            idx = np.abs(np.mod(idx, period))
            idx = np.where(idx >= n, period - idx, idx)
        else:
            idx = np.zeros(n + 2 * r, dtype=int)
        padded = np.take(out, idx, axis=axis)
        acc = np.zeros_like(out)
        for j, w in enumerate(k):
            sl = [slice(None), slice(None)]
            sl[axis] = slice(j, j + n)
            acc += w * padded[tuple(sl)]
        out = np.clip(np.round(acc), 0, 255)
    return out.astype(np.uint8)


def get_crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-zero mask grown by ``pad`` (A1111 ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]), min(y2 + pad, mask.size[1])


def _grow_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` by ``diff`` around its centre, shifted back inside ``[0, limit]``."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_crop_region(crop, width: int, height: int, image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow the crop to the processing aspect ratio (A1111 ``expand_crop_region``)."""
    x1, y1, x2, y2 = crop
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_proc = width / height
    if ratio_crop > ratio_proc:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_proc - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_proc - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Replace the masked area with blurred surrounding colours (A1111 ``masking.fill``)."""
    image_mod = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


@dataclass
class InpaintResult:
    image: Image.Image  # final image, pasted back onto the original
    raw: Image.Image  # what the model produced at the processing size (before paste-back)
    mask_for_overlay: Image.Image  # the blurred mask that decided the paste-back
    crop_region: tuple[int, int, int, int] | None
    seed: int


def inpaint(
    backend: ModelBackend,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 100,
    cfg_scale: float = 2.0,
    denoising_strength: float = 0.75,
    fill: str = "original",
    mask_blur: int = 4,
    invert_mask: bool = False,
    only_masked: bool = True,
    padding: int = 32,
    width: int = 512,
    height: int = 512,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> InpaintResult:
    """Repaint the white part of ``mask`` on ``image`` with ``prompt`` (A1111 img2img inpainting).

    ``fill``: "original" keeps the image under the mask, "fill" paints blurred surroundings,
    "latent noise" puts the seed's noise in the masked latents, "latent nothing" zeros them.
    With ``only_masked`` the mask's box plus ``padding`` px is processed at ``width x height``
    and the result is scaled back into place; otherwise the whole image is resized to it.
    ``should_stop()`` is asked before every sampler step (True: :class:`~medical_diffusion.errors.Cancelled`).
    """
    if fill not in FILL_MODES:
        raise MedDiffError(f"unknown fill mode {fill!r} (choose from {', '.join(FILL_MODES)})")
    latent_shape(backend, width, height)
    seed = resolve_seed(seed)
    image = image.convert("RGB")
    mask = mask.convert("L")
    if mask.size != image.size:
        raise MedDiffError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")
    if invert_mask:
        mask = ImageOps.invert(mask)
    if mask_blur > 0:
        mask = Image.fromarray(blur_mask(np.asarray(mask), mask_blur))
    if mask.getbbox() is None:
        raise MedDiffError("the mask is empty (nothing to repaint)")

    crop = None
    if only_masked:
        mask_for_overlay = mask
        crop = expand_crop_region(get_crop_region(mask, padding), width, height, mask.width, mask.height)
        work_mask = mask.crop(crop).resize((width, height), Image.LANCZOS)
        base = image
        work_image = image.crop(crop).resize((width, height), Image.LANCZOS)
    else:
        work_mask = mask.resize((width, height), Image.LANCZOS)
        mask_for_overlay = Image.fromarray(np.clip(np.asarray(work_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8))
        base = image.resize((width, height), Image.LANCZOS)
        work_image = base
    overlay = Image.new("RGBa", base.size)
    overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay))
    overlay = overlay.convert("RGBA")

    if fill != "original":
        work_image = fill_masked(work_image, work_mask)
    with torch.no_grad():
        init_latent = backend.encode_images(pil_to_pixels(work_image).to(backend.device, backend.dtype)).float().cpu()
    h_lat, w_lat = init_latent.shape[-2:]
    latmask = np.asarray(work_mask.convert("RGB").resize((w_lat, h_lat)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.around(latmask))[None, None]
    if fill == "latent noise":
        init_latent = init_latent * (1 - nmask) + seed_noise([seed], init_latent.shape[1:]) * nmask
    elif fill == "latent nothing":
        init_latent = init_latent * (1 - nmask)

    cond = encode_composable(backend, prompt, negative_prompt, embeddings)
    latents = sample_latents(
        backend, cond, seeds=[seed], steps=steps, cfg_scale=cfg_scale, width=width, height=height,
        init_latent=init_latent, denoising_strength=denoising_strength, nmask=nmask, progress=progress,
        should_stop=should_stop,
    )
    raw = latents_to_images(backend, latents)[0]
    result = raw
    if crop is not None:
        x1, y1, x2, y2 = crop
        canvas = Image.new("RGBA", base.size)
        canvas.paste(raw.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        result = canvas
    result = result.convert("RGBA")
    result.alpha_composite(overlay)
    return InpaintResult(result.convert("RGB"), raw, mask_for_overlay, crop, seed)


def inpaint_grid(
    original: Image.Image,
    results: Sequence[InpaintResult],
    labels: Sequence[str],
    title: str | None = None,
    cell: int = 256,
) -> Image.Image:
    """Figure-4 style sheet: top row the original and each mask on it, bottom row the original and
    each inpainted result, every tile shown at ``cell`` px."""
    from medical_diffusion.image_grid import make_grid

    overlays = []
    for res in results:
        base = np.asarray(original.convert("RGB").resize(res.mask_for_overlay.size), dtype=np.float64)
        alpha = (np.asarray(res.mask_for_overlay, dtype=np.float64) / 255.0)[..., None] * 0.45
        overlays.append(Image.fromarray(np.clip(base * (1 - alpha) + np.array([255.0, 40, 40]) * alpha, 0, 255)
                                        .astype(np.uint8)))
    top = [original.convert("RGB")] + overlays
    bottom = [original.convert("RGB")] + [r.image for r in results]
    captions = ["original"] + [f"mask {label}" for label in labels] + ["original"] + [f"inpainted {label}" for label in labels]
    return make_grid(top + bottom, captions, cols=len(results) + 1, cell=cell, title=title)
