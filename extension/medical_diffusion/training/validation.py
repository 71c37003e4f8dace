"""Validation loss on held-out images with FIXED noise and timesteps, and the best-so-far bookkeeping.

Every draw depends on ``(seed, a constant, image index)`` only: the same vectors give the same validation
loss in every evaluation, in every run and after a resume, so the curve is smooth and comparable, and
validating never touches the training draws. Each image is denoised at ``K`` timesteps stratified over
``[0, T)`` (one in each of ``K`` equal bins), as one batch of ``K``, with the training autocast and no
gradient. The loss is the plain (unweighted, unmasked) MSE of the model's training target, whatever
min-SNR weighting or mask the training uses, so runs with different options compare on one scale.

``val_data="auto"`` picks the ``val`` split that ``meddiff prepare --splits`` writes beside the training
folder: ``OUT/embedding/<class>/`` (or ``OUT/classifier/train/<class>/``) -> ``OUT/classifier/val/<class>/``
(patient-disjoint from the training split). It is only used when asked for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from pathlib import Path
from typing import Callable, ContextManager

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.training.config import VAL_AUTO
from medical_diffusion.training.buckets import BucketedLatentCache
from medical_diffusion.training.dataset import LatentCache, TrainImage
from medical_diffusion.training.prompts import PromptSource
from medical_diffusion.training.seeds import mix

log = logging.getLogger(__name__)

#: seed purposes (the training loop uses 1-5)
_LATENT_SEED, _DRAW_SEED, _PROMPT_SEED = 6, 7, 8


def resolve_val_dir(val_data: str | None, data_dir: str | Path) -> Path | None:
    """The validation folder for ``val_data`` (None: no validation); ``"auto"``: the prepared val split."""
    if val_data is None:
        return None
    train_dir = Path(data_dir).expanduser().resolve()
    if val_data.strip().lower() != VAL_AUTO:
        folder = Path(val_data).expanduser().resolve()
    else:
        from medical_diffusion.datasets.layout import CLASSIFIER_DIR, EMBEDDING_DIR

        label, parent = train_dir.name, train_dir.parent
        if parent.name == EMBEDDING_DIR:
            root = parent.parent
        elif parent.name == "train" and parent.parent.name == CLASSIFIER_DIR:
            root = parent.parent.parent
        else:
            root = None
        folder = root / CLASSIFIER_DIR / "val" / label if root is not None else None
        if folder is None or not folder.is_dir():
            raise MedDiffError(
                f"val data auto: {train_dir} is not a training folder of `meddiff prepare --splits` "
                f"(OUT/{EMBEDDING_DIR}/<class> with OUT/{CLASSIFIER_DIR}/val/<class> beside it); "
                "give the validation images folder instead"
            )
        log.info("validation images: %s (the prepared val split)", folder)
    if folder == train_dir:
        raise MedDiffError(f"val data {folder}: the validation images must not be the training images")
    if not folder.is_dir():
        raise InputFileError(folder, "validation images folder not found")
    from medical_diffusion.png_io import list_images

    if not list_images(folder):
        raise InputFileError(folder, "no validation images found (expected .png/.jpg/... files directly inside)")
    return folder


def stratified_timesteps(k: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` integer timesteps ``(k,)`` as floats, one uniformly in each of ``k`` equal bins of ``[0, T)``."""
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    t = ((torch.arange(k, dtype=torch.float64) + u) * num_train_timesteps / k).floor()
    return t.clamp(0, num_train_timesteps - 1).float()


class Validator:
    """The validation set's cached latents with its fixed noise, timesteps and prompts."""

    def __init__(self, backend: ModelBackend, images: list[TrainImage], *, name: str, prompts: PromptSource,
                 seed: int, timesteps_per_image: int, sample_latents: bool = False, bucketing: bool = False):
        if not images:
            raise MedDiffError("no validation images")
        self.backend, self.name = backend, name
        cache_type = BucketedLatentCache if bucketing else LatentCache
        self.cache = cache_type(backend, images, sample=sample_latents, seed=mix(seed, _LATENT_SEED))
        k, steps = int(timesteps_per_image), backend.num_train_timesteps
        self.noise: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        for i in range(len(self.cache)):
            gen = torch.Generator().manual_seed(mix(seed, _DRAW_SEED, i))
            self.timesteps.append(stratified_timesteps(k, steps, gen))
            self.noise.append(torch.randn((k,) + tuple(self.cache.latent(i).shape), generator=gen))
        self.constant = prompts.constant
        self.texts = [name] * len(self.cache) if prompts.constant else [
            prompts.prompts([caption], random.Random(mix(seed, _PROMPT_SEED, i)))[0]
            for i, caption in enumerate(self.cache.captions)
        ]

    def __len__(self) -> int:
        return len(self.cache)

    @torch.no_grad()
    def loss(self, vectors: torch.Tensor,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
        """Mean validation loss of ``vectors`` over the images (one host read)."""
        backend, device = self.backend, self.backend.device
        losses, shared = [], None
        for i in range(len(self.cache)):
            k = self.timesteps[i].shape[0]
            latents = self.cache.latent(i).unsqueeze(0).expand(k, -1, -1, -1).to(device)
            noise = self.noise[i].to(latents)
            t = self.timesteps[i].to(device)
            with autocast():
                if self.constant:
                    if shared is None:
                        shared = backend.encode_prompt(self.name, {self.name: vectors})
                    cond = shared
                else:
                    cond = backend.encode_prompt(self.texts[i], {self.name: vectors})
                loss = backend.diffusion_loss(latents, cond.expand(k, -1, -1), noise, t)
            losses.append(loss.detach().float())
        return math.fsum(torch.stack(losses).cpu().tolist()) / len(losses)


class BestTracker:
    """The lowest finite validation loss so far and its step (ties keep the earlier step)."""

    def __init__(self, step: int | None = None, loss: float | None = None):
        self.step, self.loss = step, loss

    def offer(self, step: int, loss: float) -> bool:
        """True when ``loss`` is a new best (then it is recorded)."""
        if not math.isfinite(loss) or (self.loss is not None and not loss < self.loss):
            return False
        self.step, self.loss = step, loss
        return True
