"""Generation inside the webui through ``modules.processing``, so tab results equal txt2img/img2img."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

#: our fill-mode names -> A1111's ``inpainting_fill`` values (fill, original, latent noise, latent nothing)
INPAINTING_FILL = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}
SAMPLER = "Euler a"  # the paper's ancestral Euler


def _common(prompt: str, negative_prompt: str, seed: int, steps: int, cfg_scale: float, width: int,
            height: int) -> dict[str, Any]:
    from modules import shared

    return dict(sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed),
                sampler_name=SAMPLER, steps=int(steps), cfg_scale=float(cfg_scale), width=int(width),
                height=int(height), do_not_save_samples=True, do_not_save_grid=True)


#: how often a running txt2img looks at our stop flag and reports the webui's sampling step (seconds)
WATCH_INTERVAL_S = 0.1


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool] | None = None,
                  progress: Callable[[int, int], None] | None = None, state=None) -> Iterator[None]:
    """Around one ``process_images``: a stop asked for (``should_stop()``) interrupts the webui's
    sampler within one step (``shared.state.interrupt()``, what its Interrupt button does), the webui's
    own Interrupt (``shared.state.interrupted``) ends our job with :class:`Cancelled`, and
    ``progress(step, steps)`` follows ``shared.state.sampling_step``."""
    from medical_diffusion.errors import Cancelled

    if state is None:
        from modules import shared

        state = shared.state
    state.begin(job="medical-diffusion")  # also clears an Interrupt pressed before this job began
    done = threading.Event()

    def watch() -> None:
        last = None
        while not done.wait(WATCH_INTERVAL_S):
            if should_stop is not None and not state.interrupted and should_stop():
                state.interrupt()
            if progress is not None:
                step, steps = int(getattr(state, "sampling_step", 0)), int(getattr(state, "sampling_steps", 0))
                if steps > 0 and (step, steps) != last:
                    last = (step, steps)
                    progress(min(step, steps), steps)

    watcher = threading.Thread(target=watch, name="md-webui-stop", daemon=True)
    watcher.start()
    try:
        yield
        if state.interrupted or (should_stop is not None and should_stop()):
            raise Cancelled("stopped before the image was finished")
    finally:
        done.set()
        watcher.join()
        state.end()


def _run(p, should_stop=None, progress=None) -> list:
    from modules import processing

    try:
        with interruptible(should_stop, progress):
            processed = processing.process_images(p)
    finally:
        p.close()
    return list(processed.images)


def txt2img(prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = 100, cfg_scale: float = 2.0,
            width: int = 512, height: int = 512, batch_size: int = 1, should_stop: Callable[[], bool] | None = None,
            progress: Callable[[int, int], None] | None = None) -> list:
    """``batch_size`` images with the webui's own txt2img (composable ``AND`` prompts included);
    ``should_stop``/``progress`` as in :func:`interruptible`."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(
        batch_size=int(batch_size), **_common(prompt, negative_prompt, seed, steps, cfg_scale, width, height))
    return _run(p, should_stop, progress)[: int(batch_size)]


def inpaint(image, mask, prompt: str, *, negative_prompt: str = "", seed: int = 0, steps: int = 100,
            cfg_scale: float = 2.0, denoising_strength: float = 0.75, fill: str = "original", mask_blur: int = 4,
            only_masked: bool = True, padding: int = 32, width: int = 512, height: int = 512,
            should_stop: Callable[[], bool] | None = None, progress: Callable[[int, int], None] | None = None):
    """One image from the webui's img2img inpainting (white = repaint); ``should_stop``/``progress`` as
    in :func:`interruptible` (the Inpaint tab's Stop hook)."""
    from modules import processing

    if fill not in INPAINTING_FILL:
        raise ValueError(f"unknown fill mode {fill!r} (choose from {', '.join(INPAINTING_FILL)})")
    p = processing.StableDiffusionProcessingImg2Img(
        init_images=[image.convert("RGB")], mask=mask.convert("L"), mask_blur=int(mask_blur),
        inpainting_fill=INPAINTING_FILL[fill], inpaint_full_res=bool(only_masked),
        inpaint_full_res_padding=int(padding), denoising_strength=float(denoising_strength), batch_size=1,
        **_common(prompt, negative_prompt, seed, steps, cfg_scale, width, height))
    return _run(p, should_stop, progress)[0]
