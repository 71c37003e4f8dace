"""The Textual Inversion training loop (model frozen; AdamW over the ``(N, width)`` vectors only).

Randomness is derived from ``(seed, step)`` alone (data order per epoch, noise, timesteps, flips),
so a run resumed from a checkpoint continues exactly as an uninterrupted run would.

Options that are off by default and leave the paper's run bit for bit unchanged when off: validation
on held-out images with ``best.pt`` (:mod:`.validation`), min-SNR-gamma loss weighting
(:mod:`.loss_weighting`), an EMA of the vectors (:mod:`.ema`) and TensorBoard logging (:mod:`.tb_logging`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.backend.numerics import NAN_HINT, nan_message
from medical_diffusion.devices import configure_for_speed, release_cached_memory
from medical_diffusion.errors import Cancelled, MedDiffError
from medical_diffusion.training import tb_logging
from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.buckets import BucketBatchOrder, BucketedLatentCache, load_bucketed_images
from medical_diffusion.training.data_folder import training_images
from medical_diffusion.training.dataset import LatentCache, load_training_images
from medical_diffusion.training.ema import VectorEma
from medical_diffusion.training.embedding_init import initial_vectors
from medical_diffusion.training.loss_weighting import min_snr_weights, snr_at, weighted_diffusion_loss
from medical_diffusion.training.progress import EtaEstimator, ProgressCallback, ProgressEvent
from medical_diffusion.training.prompts import PromptSource
from medical_diffusion.training.run_folder import RunFolder, resume_config
from medical_diffusion.training.seeds import mix as _mix
from medical_diffusion.training.validation import BestTracker, Validator, resolve_val_dir

log = logging.getLogger(__name__)

StopFlag = Callable[[], bool]


@dataclass
class TrainResult:
    run_dir: Path
    embedding_path: Path
    steps_done: int
    last_loss: float | None
    interrupted: bool
    #: with validation: ``best.pt``, its step and validation loss, and the last validation loss
    best_path: Path | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    #: with an EMA: ``<name>-ema.pt``
    ema_path: Path | None = None


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


def _preview(backend, config: TrainConfig, vectors: torch.Tensor, path: Path,
             should_stop: StopFlag | None = None, vae_home: torch.device | None = None) -> Path | None:
    """A preview image; an offloaded VAE comes back to ``vae_home`` for the decode only."""
    try:
        from medical_diffusion.generation.sampling import sample_images
    except ImportError as exc:
        log.info("previews skipped: generation module not available (%s)", exc)
        return None
    from medical_diffusion.png_io import save_png

    prompt = config.preview_prompt or config.name
    parked = getattr(backend, "vae_device", backend.device)
    try:
        if vae_home is not None:
            backend.place_vae(vae_home)
        with torch.no_grad():
            images = sample_images(
                backend, prompt, embeddings={config.name: vectors.detach().clone()}, seed=config.preview_seed,
                steps=config.preview_steps, cfg_scale=config.preview_cfg, width=config.resolution,
                height=config.resolution, batch_size=1, should_stop=should_stop,
            )
    finally:
        if vae_home is not None:
            backend.place_vae(parked)
        release_cached_memory(backend.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(images[0], path)
    return path


def offload_vae_wanted(config: TrainConfig, device: torch.device) -> bool:
    """Whether training parks the VAE on the CPU after caching (default: on CUDA only)."""
    return bool(config.offload_vae) if config.offload_vae is not None else device.type == "cuda"


def sync_interval(config: TrainConfig, device: torch.device) -> int:
    """Steps between host reads of the loss: every step off the GPU (free there), 10 on CUDA."""
    if config.sync_every:
        return int(config.sync_every)
    return 10 if device.type == "cuda" else 1


@dataclass
class _Pending:
    step: int  # steps done after this one
    loss: torch.Tensor  # 0-d, on the device
    grad_ok: torch.Tensor  # 0-d bool, on the device
    lr: float
    norm: torch.Tensor | None = None  # 0-d mean L2 norm of the vectors (only when a logger wants it)


class _GoodState:
    """The vectors, optimizer state (and EMA) at the last step whose loss and gradient were checked finite."""

    def __init__(self, step: int, param: torch.Tensor, optimizer: torch.optim.Optimizer,
                 ema: VectorEma | None = None):
        self.ema = ema
        self.save(step, param, optimizer)

    def save(self, step: int, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.step = step
        self.vectors = param.detach().clone()
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        if self.ema is not None:
            self.ema_vectors = self.ema.copy()

    def restore(self, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> int:
        with torch.no_grad():
            param.copy_(self.vectors)
        optimizer.load_state_dict(self.optimizer)
        if self.ema is not None:
            self.ema.restore(self.ema_vectors)
        return self.step


def _make_optimizer(param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """AdamW over the fp32 vectors; the fused CUDA kernel (no host sync under a grad scaler) on CUDA."""
    if param.device.type == "cuda":
        try:
            return torch.optim.AdamW([param], lr=lr, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):  # an old torch without the fused kernel
            pass
    return torch.optim.AdamW([param], lr=lr, weight_decay=0.0)


def _make_scaler(enabled: bool):
    """A dynamic loss scaler for fp16 backward passes on CUDA (as A1111's training uses); None when off."""
    if not enabled:
        return None
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # torch < 2.3 (the webui's pins)


#: the loss scale below which fp16 gradients are taken as broken rather than briefly overflowing
MIN_LOSS_SCALE = 2.0 ** -8


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
    """Train ``config.name`` on ``config.data_dir`` into ``run_dir`` (resuming from its last checkpoint).

    The frozen model stays in its own dtype (fp16 on CUDA by default); the vectors, their gradient,
    AdamW's state and the loss are fp32 (the vectors are cast to the text encoder's dtype inside the
    forward pass only). On CUDA the loss is read back every :func:`sync_interval` steps, not each
    step; a NaN/inf loss or gradient stops the run with a hint, keeping the last finite state.
    """
    config.validate()
    schedule = config.schedule()
    total = config.total_steps()
    run = RunFolder(run_dir, config.name, text_widths=getattr(backend, "text_widths", None))
    name = config.name
    device = backend.device
    configure_for_speed(device)

    if resume and run.config_path.is_file():  # the run's identity stays; only steps, lr, previews ... may change
        resume_config(run.root, config)
    tb_logging.check_log_with(config.log_with)
    load = load_bucketed_images if config.bucketing else load_training_images
    data = training_images(config.data_dir, config.data_class)  # never a prepare output's contact sheet
    log.debug("training on %s", data.describe())  # the CLI prints it, the tab shows it
    images = load(data.folder, config.resolution, config.mask)  # before touching the run folder
    val_dir = resolve_val_dir(config.val_data, data.folder)
    val_images = load(val_dir, config.resolution, what="validation") if val_dir is not None else None
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
        run.truncate_val_losses(start_step if start_step > 0 else -1)  # step 0 is validated again
    else:
        run.create(config, force=force)

    #: SDXL in the webui: its size conditioning, baked into the encoded prompt, describes the training images
    #: (per micro-batch with bucketing; the standalone backend reads the size off the latents itself)
    set_size = getattr(backend, "set_image_size", None)
    if set_size is not None:
        set_size(config.resolution, config.resolution)
    vae_home = getattr(backend, "vae_device", device)
    cache = (BucketedLatentCache if config.bucketing else LatentCache)(
        backend, images, sample=config.latents == "sample", hflip=config.hflip, mask_weight=config.mask_weight,
        seed=_mix(config.seed, 2),
    )
    prompts = PromptSource(name, config.template_file)
    validator = None
    if val_images is not None:
        validator = Validator(backend, val_images, name=name, prompts=prompts, seed=config.seed,
                              timesteps_per_image=config.val_timesteps, sample_latents=config.latents == "sample",
                              bucketing=config.bucketing)
        log.info("validation: %d images x %d fixed timesteps every %s steps", len(validator),
                 config.val_timesteps, config.val_every or "(start and end)")
    offload = offload_vae_wanted(config, device)
    if offload:  # the latents are cached: the VAE is needed again only for previews
        backend.place_vae("cpu")
        release_cached_memory(device)
    if config.bucketing:
        order = BucketBatchOrder(cache.bucket_of, config.batch_size, config.seed)
    else:
        order = _DataOrder(len(cache), config.seed)

    if state is not None:
        vectors = state["vectors"].float()
    else:
        vectors = initial_vectors(backend, config.n_vectors, config.init, config.init_text,
                                  seed=_mix(config.seed, 3), random_scale=config.init_random_scale)
    param = torch.nn.Parameter(vectors.to(device, torch.float32).clone())
    optimizer = _make_optimizer(param, schedule.rate_at(start_step))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    ema = VectorEma(param, config.ema_decay) if config.ema_decay is not None else None
    if ema is not None and state is not None:
        if "ema" in state:
            ema.load_state_dict(state["ema"], str(ck.state_path))
        else:
            log.warning("%s holds no EMA state: the EMA restarts from the resumed vectors", ck.state_path)
    snr_weighting = None
    if config.min_snr_gamma is not None:
        snr_weighting = min_snr_weights(snr_at(backend.alphas_cumprod, torch.arange(backend.num_train_timesteps)),
                                        config.min_snr_gamma, backend.prediction_type)

    set_ckpt = getattr(backend, "set_gradient_checkpointing", None)
    if config.gradient_checkpointing:
        if set_ckpt is None:
            log.warning("this backend has no gradient checkpointing; ignored")
        else:
            set_ckpt(True)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "")
    compute_dtype = autocast_dtype or getattr(backend, "dtype", torch.float32)
    scaler = _make_scaler(device.type == "cuda" and compute_dtype == torch.float16)
    if scaler is not None and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    last_plot = [time.monotonic()]
    model_id = dict(checkpoint_name=getattr(backend, "label", None) or config.model,
                    checkpoint_hash=getattr(backend, "checkpoint_hash", None))

    def checkpoint(step: int, final: bool = False) -> Path:
        extra = {"optimizer": optimizer.state_dict()}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        if ema is not None:
            extra["ema"] = ema.state_dict()
        if best is not None and best.step is not None:  # so a resume knows the best of the steps it keeps
            extra["best"] = best.state_dict()
        ck = run.save_checkpoint(param, step, extra, **model_id)
        if ema is not None:
            run.write_embedding(ema.shadow, run.ema_path, step, **model_id)
        if final or time.monotonic() - last_plot[0] > 60:  # the curve costs ~0.5 s: at most once a minute
            run.plot_losses()
            last_plot[0] = time.monotonic()
        return ck.embedding_path

    every = sync_interval(config, device)
    eta = EtaEstimator()
    step = start_step
    last_loss: float | None = None
    interrupted = False
    saved_step = start_step if state is not None else -1
    good = _GoodState(start_step, param, optimizer, ema)
    pending: list[_Pending] = []
    clock = [time.perf_counter()]
    failed = False
    tb = None
    if config.log_with == "tensorboard":
        tb = tb_logging.TrainLogger(tb_logging.open_tensorboard(run.tensorboard_dir,
                                                                purge_step=start_step + 1 if resume else None))
    best = None
    last_val: float | None = None
    if validator is not None:
        best = BestTracker()
        kept = state.get("best") if state is not None else None
        if kept is not None:  # the best of the steps this run keeps (best.* may be from a later, abandoned step)
            best = BestTracker(int(kept["step"]), float(kept["val_loss"]), kept["vectors"].float())
            if run.read_best() != (best.step, best.loss):
                log.warning("%s is not the best of the resumed run's steps: rewritten from step %d", run.best_path,
                            best.step)
                run.save_best(best.vectors, best.step, best.loss, **model_id)
        elif run.remove_best():
            log.warning("%s was from steps after the resumed step %d: removed", run.best_path, start_step)

    def validate(step: int) -> float:
        """Validation loss of the current vectors: logged, and ``best.pt`` when it is a new best."""
        nonlocal last_val
        value = validator.loss(param.detach(), autocast)
        run.append_val_loss(step, value)
        if best.offer(step, value, param):
            run.save_best(best.vectors, step, value, **model_id)
        if tb is not None:
            tb.validation(step, value)
        last_val = value
        return value

    def flush() -> list[ProgressEvent]:
        """Read the pending losses back (one host sync), check them, log them; events for the caller."""
        nonlocal last_loss, step, failed
        if not pending:
            return []
        checks = [torch.stack([p.loss.float(), p.grad_ok.float()]) for p in pending]
        values = torch.stack(checks).cpu().tolist()
        norms = [None] * len(pending)
        if tb is not None:
            norms = torch.stack([p.norm for p in pending]).cpu().tolist()
        scale = float(scaler.get_scale()) if scaler is not None else None
        now = time.perf_counter()
        seconds = (now - clock[0]) / len(pending)
        clock[0] = now
        for p, (loss, grad_ok) in zip(pending, values):
            problem = None
            if not math.isfinite(loss):
                problem = "the loss"
            elif not grad_ok and scaler is None:  # under a scaler an overflow only skips the step
                problem = "the gradient"
            if problem is not None:
                pending.clear()
                failed = True
                step = good.restore(param, optimizer)
                raise MedDiffError(f"step {p.step}: {nan_message(problem, compute_dtype)} "
                                   f"(the run keeps step {step})")
        if scale is not None and scale < MIN_LOSS_SCALE:
            last = pending[-1].step
            pending.clear()
            failed = True
            step = good.restore(param, optimizer)
            raise MedDiffError(f"step {last}: the fp16 gradients keep overflowing (loss scale {scale:g}). "
                               f"{NAN_HINT} (the run keeps step {step})")
        events = []
        for p, (loss, _ok), norm in zip(pending, values, norms):
            run.append_loss(p.step, loss, p.lr, seconds)
            if tb is not None:
                tb.step(p.step, loss, p.lr, norm)
            events.append(ProgressEvent(step=p.step, total=total, loss=loss, lr=p.lr,
                                        eta_seconds=eta.update(seconds, total - p.step),
                                        it_per_s=1.0 / seconds if seconds > 0 else None))
            last_loss = loss
        good.save(pending[-1].step, param, optimizer)
        pending.clear()
        return events

    with _ctrl_c_as_stop() as ctrl_c:

        def should_stop() -> bool:
            return bool((stop is not None and stop()) or ctrl_c())

        try:
            if validator is not None and start_step == 0:
                value = validate(0)
                log.info("step 0: validation loss %.4f", value)
                if progress is not None:  # the curve starts at the untrained vectors
                    progress(ProgressEvent(step=0, total=total, loss=math.nan, lr=schedule.rate_at(0),
                                           val_loss=value, best_step=best.step, best_val_loss=best.loss,
                                           validation_only=True))
                clock[0] = time.perf_counter()
            while step < total:
                if should_stop():
                    interrupted = True
                    break
                lr = schedule.rate_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for micro in range(config.grad_accumulation):
                    gen = torch.Generator().manual_seed(_mix(config.seed, 4, step, micro))
                    first = (step * config.grad_accumulation + micro) * config.batch_size
                    if config.bucketing:  # one aspect bucket per micro-batch; a bucket's last one may be smaller
                        idx = order.indices(step * config.grad_accumulation + micro)
                    else:
                        idx = [order.index(first + j) for j in range(config.batch_size)]
                    flips = (torch.rand(config.batch_size, generator=gen) < 0.5).tolist()
                    latents, weight = cache.batch(idx, flips)
                    latents = latents.to(device, non_blocking=True)
                    noise = torch.randn(latents.shape, generator=gen).to(latents)
                    timesteps = torch.randint(0, backend.num_train_timesteps, (len(idx),), generator=gen).float()
                    if set_size is not None and config.bucketing:
                        set_size(latents.shape[-1] * backend.vae_scale_factor, latents.shape[-2] * backend.vae_scale_factor)
                    with autocast():
                        if prompts.constant:  # one text-encoder pass per micro-batch, shared by its images
                            cond = backend.encode_prompt(name, {name: param})
                            cond = cond.expand(len(idx), -1, -1)
                        else:
                            rng = random.Random(_mix(config.seed, 5, step, micro))
                            texts = prompts.prompts([cache.captions[i] for i in idx], rng)
                            conds = [backend.encode_prompt(t, {name: param}) for t in texts]
                            cond = backend.pad_conditionings(conds)
                        if snr_weighting is None:
                            loss = backend.diffusion_loss(latents, cond, noise, timesteps, weight)
                        else:
                            sample_weight = snr_weighting[timesteps.long()].to(device)
                            loss = weighted_diffusion_loss(backend, latents, cond, noise, timesteps, weight,
                                                           sample_weight)
                    scaled = loss.float() / config.grad_accumulation
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss.detach().float() / config.grad_accumulation
                clipping = config.clip_grad_value is not None or config.clip_grad_norm is not None
                if scaler is not None and clipping:
                    scaler.unscale_(optimizer)
                grad_ok = torch.isfinite(param.grad).all()
                if config.clip_grad_value is not None:
                    torch.nn.utils.clip_grad_value_([param], config.clip_grad_value)
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([param], config.clip_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if ema is not None:
                    ema.update(param)
                step += 1
                norm = param.detach().norm(dim=1).mean() if tb is not None else None
                pending.append(_Pending(step, step_loss, grad_ok, lr, norm))
                due_save = bool(config.save_every and step % config.save_every == 0)
                due_preview = bool(config.preview_every and step % config.preview_every == 0)
                due_val = validator is not None and (step >= total or bool(config.val_every and
                                                                           step % config.val_every == 0))
                if not (due_save or due_preview or due_val or len(pending) >= every or step >= total):
                    continue
                events = flush()
                event = events[-1]
                if due_val:
                    event.val_loss = validate(step)
                    event.best_step, event.best_val_loss = best.step, best.loss
                if due_save:
                    event.checkpoint = checkpoint(step)
                    saved_step = step
                    log.info("step %d: loss %.4f, %.2f it/s", step, event.loss, event.it_per_s or 0.0)
                if due_preview:
                    try:
                        event.preview = _preview(backend, config, param, run.preview_path(step), should_stop,
                                                 vae_home if offload else None)
                    except Cancelled:
                        log.info("preview at step %d skipped: stop requested", step)
                    except Exception as exc:  # a failed preview must not end a long run
                        log.warning("preview at step %d failed: %s", step, exc)
                    if tb is not None and event.preview is not None:
                        tb.preview(step, event.preview)
                if due_save or due_preview or due_val:
                    clock[0] = time.perf_counter()  # it/s counts training steps only
                if progress is not None:
                    for item in events:
                        progress(item)
        finally:
            if pending and not failed:
                try:  # an error or Ctrl-C mid-interval: keep the steps that are finite
                    for item in flush():
                        if progress is not None:
                            progress(item)
                except MedDiffError as exc:
                    log.warning("%s", exc)
                except Exception:  # the original error matters more
                    step = good.restore(param, optimizer)
            if step != good.step:
                step = good.restore(param, optimizer)
            if step != saved_step and step > 0:
                checkpoint(step, final=True)  # end of run, stop request, Ctrl-C or error: keep what was learned
            elif step > 0:
                run.plot_losses()
            run.close()
            if tb is not None:
                tb.close()
            if set_ckpt is not None and config.gradient_checkpointing:
                set_ckpt(False)
            if offload:
                backend.place_vae(vae_home)
    result = TrainResult(run.root, run.latest_path, step, last_loss, interrupted)
    if best is not None:
        result.best_path = run.best_path if run.best_path.is_file() else None
        result.best_step, result.best_val_loss, result.last_val_loss = best.step, best.loss, last_val
    if ema is not None:
        result.ema_path = run.ema_path
    return result


def run_training(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    backend: ModelBackend | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    progress: ProgressCallback | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """:func:`train` with the model loaded from ``config.model`` when no backend is given
    (frozen weights on ``device`` in ``dtype``: see :func:`medical_diffusion.devices.resolve_runtime`)."""
    if backend is None:
        from medical_diffusion.backend.diffusers_backend import load_backend

        config.validate()
        tb_logging.check_log_with(config.log_with)  # before the slow model load
        backend = load_backend(config.model, device=device, dtype=dtype, prediction_type=config.prediction_type,
                               attention=attention)
    return train(config, backend, run_dir, resume=resume, force=force, progress=progress, stop=stop)
