"""Healthy -> diseased in K steps at one seed (paper Figure 2/8).

Two ways: composable prompts ``healthy :(1-t) AND diseased :t`` (A1111, what the paper did), or
one blended embedding ``(1-t) * healthy + t * diseased`` (linear or slerp) in embedding space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from PIL import Image

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.prompts import build_prompt
from medical_diffusion.generation.sampling import sample_images

BLEND_NAME = "meddiff-blend"


@dataclass
class Frame:
    t: float
    prompt: str
    label: str
    image: Image.Image


def interpolation_steps(k: int) -> list[float]:
    """``k`` evenly spaced weights from 0 (healthy) to 1 (diseased)."""
    if k < 2:
        raise MedDiffError(f"interpolation needs at least 2 steps, got {k}")
    return [i / (k - 1) for i in range(k)]


def interpolation_prompts(healthy: str, diseased: str, k: int) -> list[tuple[float, str]]:
    """``(t, "healthy :(1-t) AND diseased :t")`` for ``k`` evenly spaced ``t`` (A1111 composable syntax)."""
    return [(t, build_prompt([(healthy, 1 - t), (diseased, t)])) for t in interpolation_steps(k)]


def frame_label(t: float) -> str:
    return f"{round(100 * (1 - t))}% healthy, {round(100 * t)}% dis."


def _progress_for(progress, k_index: int, k: int):
    if progress is None:
        return None
    return lambda step, total: progress(k_index * total + step, k * total)


def interpolate_prompts(
    backend: ModelBackend,
    healthy: str,
    diseased: str,
    k: int,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **sample_kwargs,
) -> list[Frame]:
    """One image per weight ``t``: prompt ``healthy :(1-t) AND diseased :t``, same seed throughout."""
    frames = []
    for j, (t, prompt) in enumerate(interpolation_prompts(healthy, diseased, k)):
        (image,) = sample_images(backend, prompt, embeddings=embeddings, seed=seed, batch_size=1,
                                 progress=_progress_for(progress, j, k), **sample_kwargs)
        frames.append(Frame(t, prompt, frame_label(t), image))
    return frames


def interpolate_embeddings(
    backend: ModelBackend,
    healthy,
    diseased,
    k: int,
    *,
    mode: str = "linear",
    template: str = "{}",
    embeddings: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **sample_kwargs,
) -> list[Frame]:
    """One image per ``t`` from a single blended embedding (``Embedding`` objects in, via
    ``medical_diffusion.embeddings.blend``); ``template`` places it in the prompt (``"{}"``)."""
    from medical_diffusion.embeddings.blend import blend_embeddings
    from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

    if "{}" not in template:
        raise MedDiffError(f"the prompt template {template!r} needs a {{}} where the blended embedding goes")
    frames = []
    for j, t in enumerate(interpolation_steps(k)):
        blended = blend_embeddings(healthy, diseased, t, mode=mode, name=BLEND_NAME)
        table = dict(embeddings or {})
        table[BLEND_NAME] = vectors_from_embedding(blended, getattr(backend, "text_widths", None))
        prompt = template.replace("{}", BLEND_NAME)
        (image,) = sample_images(backend, prompt, embeddings=table, seed=seed, batch_size=1,
                                 progress=_progress_for(progress, j, k), **sample_kwargs)
        frames.append(Frame(t, f"{mode} blend {healthy.name}->{diseased.name} t={t:.3f}: {prompt}",
                            frame_label(t), image))
    return frames


def frames_grid(frames: Sequence[Frame], title: str | None = None, cell: int = 256) -> Image.Image:
    """One labelled strip of the frames, each shown at ``cell`` px."""
    from medical_diffusion.image_grid import make_grid

    return make_grid([f.image for f in frames], [f.label for f in frames], cols=len(frames), cell=cell, title=title)
