"""Euler ancestral sampling, equivalent to k-diffusion's ``sample_euler_ancestral`` as the A1111
webui runs it ("Euler a"): sigmas from the model's ``alphas_cumprod`` at ``linspace`` timesteps,
a ``CompVisDenoiser``/``CompVisVDenoiser`` wrapper, composable CFG, one RNG per image seed (so an
image depends on its seed only, not on the batch it was made in), and A1111's img2img/inpainting
start (``denoising_strength``) and masked latent blending.
"""

from __future__ import annotations

import random
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import Cancelled, MedDiffError
from medical_diffusion.generation.guidance import (
    ComposableConditioning,
    batched_model_inputs,
    combine_composable,
    encode_composable,
    run_model,
)

Progress = Callable[[int, int], None]
#: asked before every sampler step; True stops the work with :class:`~medical_diffusion.errors.Cancelled`
ShouldStop = Callable[[], bool]


def check_stop(should_stop: ShouldStop | None) -> None:
    """Raise :class:`Cancelled` when a stop was asked for."""
    if should_stop is not None and should_stop():
        raise Cancelled("stopped before the image was finished")


def get_sigmas(
    alphas_cumprod: torch.Tensor, steps: int, interpolation: str = "log"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)`` for ``steps`` steps: ``steps + 1`` sigmas ending in 0 and the
    ``steps`` (fractional) training timesteps they belong to, evenly spaced from the last one to 0.

    ``interpolation="log"`` interpolates log-sigma between training timesteps (k-diffusion
    ``CompVisDenoiser.get_sigmas``, what A1111 uses); ``"linear"`` interpolates sigma itself
    (diffusers ``EulerAncestralDiscreteScheduler(timestep_spacing="linspace")``).
    """
    if steps < 1:
        raise MedDiffError(f"steps must be at least 1, got {steps}")
    acp = alphas_cumprod.detach().to("cpu", torch.float32)
    train_sigmas = ((1 - acp) / acp) ** 0.5
    n = acp.shape[0]
    if interpolation == "log":
        t = torch.linspace(n - 1, 0, steps)
        log_sigmas = train_sigmas.log()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    elif interpolation == "linear":
        t_np = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        sig_np = np.interp(t_np, np.arange(0, n), train_sigmas.numpy().astype(np.float64))
        t, sigmas = torch.from_numpy(t_np), torch.from_numpy(sig_np.astype(np.float32))
    else:
        raise MedDiffError(f"unknown sigma interpolation {interpolation!r} (use 'log' or 'linear')")
    return torch.cat([sigmas, sigmas.new_zeros(1)]), t


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion ``get_ancestral_step``: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class ImageRNG:
    """One ``torch.Generator`` per image seed (A1111's per-seed noise, CPU generator)."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        self.shape = tuple(shape)
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def next(self) -> torch.Tensor:
        """The next noise tensor ``(B, *shape)``, one draw from each image's generator."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The first noise tensor of fresh per-seed generators (A1111 ``create_random_tensors``)."""
    return ImageRNG(seeds, shape).next()


def sample_euler_ancestral(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    noise: Callable[[], torch.Tensor],
    eta: float = 1.0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """k-diffusion's Euler ancestral loop. ``denoise(x, sigma, t)`` returns the denoised estimate;
    ``x`` starts at noise level ``sigmas[0]``; ``noise()`` draws fresh unit noise like ``x``;
    ``should_stop()`` is asked before each step (True: raise :class:`Cancelled`)."""
    total = len(sigmas) - 1
    for i in range(total):
        check_stop(should_stop)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma, timesteps[i])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise().to(x) * sigma_up
        if progress is not None:
            progress(i + 1, total)
    return x


def to_denoised(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Denoised estimate from the raw model output at noise level ``sigma`` (k-diffusion
    ``CompVisDenoiser`` for epsilon, ``CompVisVDenoiser`` for v-prediction)."""
    sigma = sigma.to(x).reshape(-1, *([1] * (x.ndim - 1)))
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    raise MedDiffError(f"unknown prediction type {prediction_type!r}")


class ComposableDenoiser:
    """``denoise(x, sigma, t)`` for the sampler: all AND parts and the uncond in one model call,
    combined with composable CFG; optional A1111 inpainting blend of the denoised estimate
    ``denoised * nmask + init_latent * (1 - nmask)``."""

    def __init__(
        self,
        backend: ModelBackend,
        cond: ComposableConditioning,
        cfg_scale: float,
        init_latent: torch.Tensor | None = None,
        nmask: torch.Tensor | None = None,
    ):
        self.backend = backend
        self.cond = cond
        self.cfg_scale = float(cfg_scale)
        self.init_latent = init_latent
        self.nmask = nmask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        sigma_b = sigma.reshape(1).expand(batch).float()
        t_b = t.reshape(1).expand(batch).float()
        c_in = 1 / (sigma_b**2 + 1) ** 0.5
        x_in, t_in, cond_rows, uncond_rows, conds_list = batched_model_inputs(
            x * c_in.view(-1, 1, 1, 1), t_b, self.cond
        )
        out = run_model(self.backend, x_in, t_in, cond_rows, uncond_rows).to(x)
        # the same rows of x and sigma, unscaled, to turn outputs into denoised estimates
        n_parts = len(self.cond.parts)
        x_rows = torch.cat([x.repeat_interleave(n_parts, dim=0), x])
        sigma_rows = torch.cat([sigma_b.repeat_interleave(n_parts), sigma_b])
        denoised = combine_composable(
            to_denoised(out, x_rows, sigma_rows, self.backend.prediction_type), conds_list, self.cfg_scale
        )
        if self.nmask is not None and self.init_latent is not None:
            denoised = denoised * self.nmask + self.init_latent * (1 - self.nmask)
        return denoised


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or a fresh random seed for ``None``/negative values (A1111's -1)."""
    if seed is None or int(seed) < 0:
        return random.randrange(0, 2**32 - 1)
    return int(seed)


def latent_shape(backend: ModelBackend, width: int, height: int) -> tuple[int, int, int]:
    """``(channels, height / 8, width / 8)``; sizes must be multiples of the VAE factor."""
    f = int(backend.vae_scale_factor)
    if width <= 0 or height <= 0 or width % f or height % f:
        raise MedDiffError(f"width and height must be positive multiples of {f}, got {width}x{height}")
    return (int(backend.latent_channels), height // f, width // f)


def sample_latents(
    backend: ModelBackend,
    cond: ComposableConditioning,
    *,
    seeds: Sequence[int],
    steps: int = 100,
    cfg_scale: float = 2.0,
    width: int = 512,
    height: int = 512,
    init_latent: torch.Tensor | None = None,
    denoising_strength: float = 1.0,
    nmask: torch.Tensor | None = None,
    eta: float = 1.0,
    interpolation: str = "log",
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """Latents for one image per seed (txt2img, or img2img/inpainting when ``init_latent`` is given).

    img2img follows A1111 (``img2img_fix_steps`` off): of the ``steps``-step schedule the last
    ``int(min(strength, 0.999) * steps) + 1`` sigmas are used and the start is
    ``init_latent + noise * sigma_start``. ``nmask`` (1 = repaint, latent resolution) blends the
    denoised estimate with ``init_latent`` each step and the final latents once more.
    """
    shape = latent_shape(backend, width, height)
    rng = ImageRNG(seeds, shape)
    sigmas, timesteps = get_sigmas(backend.alphas_cumprod, steps, interpolation)
    first_noise = rng.next()
    if init_latent is None:
        x = first_noise * sigmas[0]
    else:
        if not 0 < denoising_strength <= 1:
            raise MedDiffError(f"denoising strength must be in (0, 1], got {denoising_strength}")
        init_latent = init_latent.detach().float().cpu().expand(len(seeds), *shape)
        t_enc = int(min(denoising_strength, 0.999) * steps)
        sigmas = sigmas[steps - t_enc - 1 :]
        timesteps = timesteps[steps - t_enc - 1 :]
        x = init_latent + first_noise * sigmas[0]
    if nmask is not None:
        nmask = nmask.detach().float().cpu()
    denoiser = ComposableDenoiser(backend, cond, cfg_scale, init_latent, nmask)
    with torch.no_grad():
        x = sample_euler_ancestral(denoiser, x, sigmas, timesteps, rng.next, eta=eta, progress=progress,
                                   should_stop=should_stop)
    if nmask is not None and init_latent is not None:
        x = x * nmask + init_latent * (1 - nmask)
    return x


def latents_to_images(backend: ModelBackend, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents one at a time into 8-bit RGB images (A1111 clamps and truncates)."""
    images = []
    with torch.no_grad():
        for latent in latents:
            pixels = backend.decode_latents(latent[None].to(backend.device, backend.dtype))[0].float().cpu()
            array = (torch.clamp((pixels + 1) / 2, 0, 1) * 255).permute(1, 2, 0).numpy().astype(np.uint8)
            images.append(Image.fromarray(array[..., :3] if array.shape[2] >= 3 else array[..., 0]).convert("RGB"))
    return images


def sample_images(
    backend: ModelBackend,
    prompt: str,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 100,
    cfg_scale: float = 2.0,
    width: int = 512,
    height: int = 512,
    batch_size: int = 1,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> list[Image.Image]:
    """``batch_size`` images for ``prompt`` (A1111 composable syntax) with Euler ancestral; image
    ``i`` uses seed ``seed + i`` and does not depend on ``batch_size``. ``should_stop`` is asked
    before every step (True: :class:`~medical_diffusion.errors.Cancelled`)."""
    if batch_size < 1:
        raise MedDiffError(f"batch size must be at least 1, got {batch_size}")
    seed = resolve_seed(seed)
    cond = encode_composable(backend, prompt, negative_prompt, embeddings)
    latents = sample_latents(
        backend, cond, seeds=[seed + i for i in range(batch_size)], steps=steps, cfg_scale=cfg_scale,
        width=width, height=height, progress=progress, should_stop=should_stop,
    )
    check_stop(should_stop)
    return latents_to_images(backend, latents)
