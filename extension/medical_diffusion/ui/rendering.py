"""Images for the tabs and the API from the host's generator: the webui's txt2img, or the core sampler."""

from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image

from medical_diffusion.ui.context import UIContext


def render_prompts(
    ctx: UIContext,
    prompts: Sequence[tuple[str, float | None]],
    *,
    seed: int,
    progress: Callable[[float], None] | None = None,
    **sample_kwargs,
) -> tuple[list[Image.Image], int]:
    """One image per ``(prompt, cfg_scale or None)``, all at one seed (-1: one random seed for all).

    Inside the webui this is its own txt2img (``modules.processing``), so a frame equals what the
    txt2img tab gives for that prompt and seed; standalone it is the core Euler-a sampler. The host's
    lock is held once for the whole set. Returns the images and the seed used.
    """
    from medical_diffusion.generation.loading import load_embedding_table, vectors_of
    from medical_diffusion.generation.sampling import resolve_seed, sample_images

    seed = resolve_seed(seed)
    n = len(prompts)
    images = []
    with ctx.work_lock():
        if ctx.txt2img is None:
            backend = ctx.backend()
            table = vectors_of(load_embedding_table(backend, str(ctx.embeddings_dir)))
        for j, (prompt, cfg_scale) in enumerate(prompts):
            kwargs = dict(sample_kwargs)
            if cfg_scale is not None:
                kwargs["cfg_scale"] = float(cfg_scale)
            if ctx.txt2img is not None:
                if progress is not None:
                    progress(j / n)
                (image,) = ctx.txt2img(prompt, seed=seed, **kwargs)
            else:
                step_progress = None if progress is None else (lambda i, total, j=j: progress((j + i / total) / n))
                (image,) = sample_images(backend, prompt, embeddings=table, seed=seed, batch_size=1,
                                         progress=step_progress, **kwargs)
            images.append(image)
    return images, seed
