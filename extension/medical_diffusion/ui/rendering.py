"""Images for the tabs and the API from the host's generator: the webui's txt2img, or the core sampler."""

from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image

from medical_diffusion.errors import Cancelled
from medical_diffusion.limits import check_sampling
from medical_diffusion.ui.context import UIContext

#: ``progress(fraction, desc=text)``: gr.Progress, or anything called like it
Progress = Callable[..., None]


def render_prompts(
    ctx: UIContext,
    prompts: Sequence[tuple[str, float | None]],
    *,
    seed: int,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    **sample_kwargs,
) -> tuple[list[Image.Image], int]:
    """One image per ``(prompt, cfg_scale or None)``, all at one seed (-1: one random seed for all).

    Inside the webui this is its own txt2img (``modules.processing``), so a frame equals what the
    txt2img tab gives for that prompt and seed; standalone it is the core Euler-a sampler. The host's
    lock is held once for the whole set. ``should_stop()`` is asked before every sampler step (the
    webui's txt2img is interrupted within one step); True raises :class:`Cancelled`. ``progress`` gets
    the fraction done and a ``desc`` with the step count and an ETA from this job's pace. ``seed``, the
    ``cfg_scale`` of each prompt and ``sample_kwargs`` must lie within
    :data:`~medical_diffusion.limits.SAMPLING_BOUNDS` (:class:`~medical_diffusion.errors.OutOfRangeError`
    before any work otherwise). Returns the images and the seed used.
    """
    from medical_diffusion.generation.loading import load_embedding_table, vectors_of
    from medical_diffusion.generation.sampling import resolve_seed, sample_images
    from medical_diffusion.ui.stopping import StepClock

    # the tabs' sliders bound nothing on the server: every request is checked here, before the lock
    sample_kwargs = check_sampling(**sample_kwargs)
    for _, cfg_scale in prompts:
        check_sampling(cfg_scale=cfg_scale)
    seed = resolve_seed(check_sampling(seed=seed)["seed"])
    n = len(prompts)
    images = []
    clock = StepClock("steps")

    def step_progress(j: int):
        if progress is None:
            return None

        def report(i: int, total: int) -> None:
            label = f"image {j + 1}/{n}: " if n > 1 else ""
            progress((j + i / total) / n, desc=label + clock.text(j * total + i, n * total))

        return report

    with ctx.work_lock():
        if ctx.txt2img is None:
            backend = ctx.backend()
            table = vectors_of(load_embedding_table(backend, str(ctx.embeddings_dir)))
        for j, (prompt, cfg_scale) in enumerate(prompts):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped after {j} of {n} images")
            kwargs = dict(sample_kwargs)
            if cfg_scale is not None:
                kwargs["cfg_scale"] = float(cfg_scale)
            if ctx.txt2img is not None:
                (image,) = ctx.txt2img(prompt, seed=seed, should_stop=should_stop, progress=step_progress(j),
                                       **kwargs)
            else:
                (image,) = sample_images(backend, prompt, embeddings=table, seed=seed, batch_size=1,
                                         progress=step_progress(j), should_stop=should_stop, **kwargs)
            images.append(image)
    return images, seed
