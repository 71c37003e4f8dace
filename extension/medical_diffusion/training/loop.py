"""The Textual Inversion training loop (model frozen; AdamW over the ``(N, width)`` vectors only).

Randomness is derived from ``(seed, step)`` alone (data order per epoch, noise, timesteps, flips),
so a run resumed from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import Cancelled, MedDiffError
from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.dataset import LatentCache, load_training_images
from medical_diffusion.training.embedding_init import initial_vectors
from medical_diffusion.training.progress import EtaEstimator, ProgressCallback, ProgressEvent
from medical_diffusion.training.prompts import PromptSource
from medical_diffusion.training.run_folder import RunFolder, resume_config

log = logging.getLogger(__name__)

StopFlag = Callable[[], bool]


@dataclass
class TrainResult:
    run_dir: Path
    embedding_path: Path
    steps_done: int
    last_loss: float | None
    interrupted: bool


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class _DataOrder:
    """Sample ``k`` of the run: a fresh seeded permutation of the images every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(_mix(self.seed, 1, epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perms = {epoch: perm}
        return perm[pos]


@contextlib.contextmanager
def _ctrl_c_as_stop() -> Iterator[Callable[[], bool]]:
    """In the main thread, the first Ctrl-C asks for a clean stop; a second one aborts."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        log.warning("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_width(vectors: torch.Tensor, backend: ModelBackend, source: str) -> None:
    if vectors.ndim != 2 or int(vectors.shape[-1]) != backend.text_width:
        raise MedDiffError(
            f"{source}: embedding width {int(vectors.shape[-1])} does not match the model's token width "
            f"{backend.text_width} (an embedding trained for another model family?)"
        )


def _pad_chunks(backend: ModelBackend, conds: list[torch.Tensor]) -> torch.Tensor:
    """Batch conditionings of different chunk counts, padding with empty-prompt chunks (A1111)."""
    width = max(c.shape[1] for c in conds)
    if all(c.shape[1] == width for c in conds):
        return torch.cat(conds)
    empty = backend.encode_prompt("")
    return torch.cat([torch.cat([c] + [empty] * ((width - c.shape[1]) // empty.shape[1]), 1) for c in conds])


def _preview(backend, config: TrainConfig, vectors: torch.Tensor, path: Path,
             should_stop: StopFlag | None = None) -> Path | None:
    try:
        from medical_diffusion.generation.sampling import sample_images
    except ImportError as exc:
        log.info("previews skipped: generation module not available (%s)", exc)
        return None
    from medical_diffusion.png_io import save_png

    prompt = config.preview_prompt or config.name
    with torch.no_grad():
        images = sample_images(
            backend, prompt, embeddings={config.name: vectors.detach().clone()}, seed=config.preview_seed,
            steps=config.preview_steps, cfg_scale=config.preview_cfg, width=config.resolution,
            height=config.resolution, batch_size=1, should_stop=should_stop,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(images[0], path)
    return path


def train(
    config: TrainConfig,
    backend: ModelBackend,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train ``config.name`` on ``config.data_dir`` into ``run_dir`` (resuming from its last checkpoint)."""
    config.validate()
    schedule = config.schedule()
    total = config.total_steps()
    run = RunFolder(run_dir, config.name)
    name = config.name

    if resume and run.config_path.is_file():  # the run's identity stays; only steps, lr, previews ... may change
        resume_config(run.root, config)
    images = load_training_images(config.data_dir, config.resolution, config.mask)  # before touching the run folder
    start_step, state = 0, None
    if resume:
        found = run.load_latest()
        if found is not None:
            ck, state = found
            start_step = int(state["step"])
            _check_width(state["vectors"], backend, str(ck.state_path))
            log.info("resuming %s from step %d (%s)", name, start_step, ck.embedding_path)
        else:
            log.info("no checkpoint in %s: starting from step 0", run.root)
        run.write_config(config)
        run.truncate_losses(start_step)
    else:
        run.create(config, force=force)

    cache = LatentCache(
        backend, images, sample=config.latents == "sample", hflip=config.hflip, mask_weight=config.mask_weight,
        seed=_mix(config.seed, 2),
    )
    prompts = PromptSource(name, config.template_file)
    order = _DataOrder(len(cache), config.seed)

    if state is not None:
        vectors = state["vectors"].float()
    else:
        vectors = initial_vectors(backend, config.n_vectors, config.init, config.init_text,
                                  seed=_mix(config.seed, 3), random_scale=config.init_random_scale)
    param = torch.nn.Parameter(vectors.to(backend.device, torch.float32).clone())
    optimizer = torch.optim.AdamW([param], lr=schedule.rate_at(start_step), weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    set_ckpt = getattr(backend, "set_gradient_checkpointing", None)
    if config.gradient_checkpointing:
        if set_ckpt is None:
            log.warning("this backend has no gradient checkpointing; ignored")
        else:
            set_ckpt(True)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "")
    device_type = backend.device.type

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=autocast_dtype)

    last_plot = [time.monotonic()]

    def checkpoint(step: int, final: bool = False) -> Path:
        ck = run.save_checkpoint(param, step, {"optimizer": optimizer.state_dict()},
                                 checkpoint_name=getattr(backend, "label", None) or config.model,
                                 checkpoint_hash=getattr(backend, "checkpoint_hash", None))
        if final or time.monotonic() - last_plot[0] > 60:  # the curve costs ~0.5 s: at most once a minute
            run.plot_losses()
            last_plot[0] = time.monotonic()
        return ck.embedding_path

    eta = EtaEstimator()
    step = start_step
    last_loss: float | None = None
    interrupted = False
    saved_step = start_step if state is not None else -1
    with _ctrl_c_as_stop() as ctrl_c:

        def should_stop() -> bool:
            return bool((stop is not None and stop()) or ctrl_c())

        try:
            while step < total:
                if should_stop():
                    interrupted = True
                    break
                t0 = time.perf_counter()
                lr = schedule.rate_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for micro in range(config.grad_accumulation):
                    gen = torch.Generator().manual_seed(_mix(config.seed, 4, step, micro))
                    first = (step * config.grad_accumulation + micro) * config.batch_size
                    idx = [order.index(first + j) for j in range(config.batch_size)]
                    flips = (torch.rand(config.batch_size, generator=gen) < 0.5).tolist()
                    latents, weight = cache.batch(idx, flips)
                    latents = latents.to(backend.device)
                    noise = torch.randn(latents.shape, generator=gen).to(latents)
                    timesteps = torch.randint(0, backend.num_train_timesteps, (len(idx),), generator=gen).float()
                    with autocast():
                        if prompts.constant:
                            cond = backend.encode_prompt(name, {name: param})
                            cond = cond.expand(len(idx), -1, -1)
                        else:
                            rng = random.Random(_mix(config.seed, 5, step, micro))
                            texts = prompts.prompts([cache.captions[i] for i in idx], rng)
                            conds = [backend.encode_prompt(t, {name: param}) for t in texts]
                            cond = _pad_chunks(backend, conds)
                        loss = backend.diffusion_loss(latents, cond, noise, timesteps, weight)
                    (loss / config.grad_accumulation).backward()
                    step_loss += float(loss.detach()) / config.grad_accumulation
                if not torch.isfinite(param.grad).all():
                    raise MedDiffError(f"step {step + 1}: the gradient is not finite (try a lower learning rate)")
                if config.clip_grad_value is not None:
                    torch.nn.utils.clip_grad_value_([param], config.clip_grad_value)
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([param], config.clip_grad_norm)
                optimizer.step()
                step += 1
                last_loss = step_loss
                seconds = time.perf_counter() - t0
                run.append_loss(step, step_loss, lr, seconds)
                event = ProgressEvent(step=step, total=total, loss=step_loss, lr=lr,
                                      eta_seconds=eta.update(seconds, total - step))
                if config.save_every and step % config.save_every == 0:
                    event.checkpoint = checkpoint(step)
                    saved_step = step
                if config.preview_every and step % config.preview_every == 0:
                    try:
                        event.preview = _preview(backend, config, param, run.preview_path(step), should_stop)
                    except Cancelled:
                        log.info("preview at step %d skipped: stop requested", step)
                    except Exception as exc:  # a failed preview must not end a long run
                        log.warning("preview at step %d failed: %s", step, exc)
                if progress is not None:
                    progress(event)
        finally:
            if step != saved_step and step > 0:
                checkpoint(step, final=True)  # end of run, stop request, Ctrl-C or error: keep what was learned
            elif step > 0:
                run.plot_losses()
            run.close()
            if set_ckpt is not None and config.gradient_checkpointing:
                set_ckpt(False)
    return TrainResult(run.root, run.latest_path, step, last_loss, interrupted)


def run_training(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    backend: ModelBackend | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """:func:`train` with the model loaded from ``config.model`` when no backend is given."""
    if backend is None:
        from medical_diffusion.backend.diffusers_backend import load_backend

        config.validate()
        backend = load_backend(config.model, device=device, prediction_type=config.prediction_type)
    return train(config, backend, run_dir, resume=resume, force=force, progress=progress, stop=stop)
