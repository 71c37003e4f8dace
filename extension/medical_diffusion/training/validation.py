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
from medical_diffusion.training.data_folder import image_files, resolve_data_folder
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
        folder = resolve_data_folder(val_data, what="validation", flag="--val-data")
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
    if not image_files(folder):
        raise InputFileError(folder, "no validation images found (expected .png/.jpg/... files directly inside)")
    return folder


def stratified_timesteps(k: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` integer timesteps ``(k,)`` as floats, one uniformly in each of ``k`` equal bins of ``[0, T)``."""
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    t = ((torch.arange(k, dtype=torch.float64) + u) * num_train_timesteps / k).floor()
    return t.clamp(0, num_train_timesteps - 1).float()


#: most timesteps of one image in one forward pass (bounds validation memory on big models)
VAL_CHUNK = 8


class Validator:
    """The validation set's cached latents with its fixed noise, timesteps and prompts."""

    def __init__(self, backend: ModelBackend, images: list[TrainImage], *, name: str, prompts: PromptSource,
                 seed: int, timesteps_per_image: int, sample_latents: bool = False, bucketing: bool = False):
        if not images:
            raise MedDiffError("no validation images")
        self.backend, self.name = backend, name
        cache_type = BucketedLatentCache if bucketing else LatentCache
        self.cache = cache_type(backend, images, sample=sample_latents, seed=mix(seed, _LATENT_SEED))
        self.seed, self.k = seed, int(timesteps_per_image)
        #: the fixed timesteps of each image (its noise is drawn again from the same seed at each evaluation,
        #: so memory does not grow with the validation set)
        self.timesteps = [self._draws(i)[0] for i in range(len(self.cache))]
        self.constant = prompts.constant
        self.texts = [name] * len(self.cache) if prompts.constant else [
            prompts.prompts([caption], random.Random(mix(seed, _PROMPT_SEED, i)))[0]
            for i, caption in enumerate(self.cache.captions)
        ]

    def __len__(self) -> int:
        return len(self.cache)

    def _draws(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``i``'s fixed timesteps ``(k,)`` and noise ``(k, C, h, w)``: from ``(seed, i)`` alone."""
        gen = torch.Generator().manual_seed(mix(self.seed, _DRAW_SEED, i))
        t = stratified_timesteps(self.k, self.backend.num_train_timesteps, gen)
        return t, torch.randn((self.k,) + tuple(self.cache.latent(i).shape), generator=gen)

    @torch.no_grad()
    def loss(self, vectors: torch.Tensor,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
        """Mean validation loss of ``vectors`` over the images (one host read)."""
        backend, device = self.backend, self.backend.device
        set_size = getattr(backend, "set_image_size", None)  # the webui's SDXL: size conditioning per image
        losses, shared = [], {}
        for i in range(len(self.cache)):
            t_all, noise_all = self._draws(i)
            latent = self.cache.latent(i)
            size = tuple(int(s) * backend.vae_scale_factor for s in latent.shape[-2:])  # (h, w) in pixels
            if set_size is not None:
                set_size(size[1], size[0])
            with autocast():
                if self.constant:  # one encoding per image size (SDXL's conditioning holds the size)
                    if size not in shared:
                        shared[size] = backend.encode_prompt(self.name, {self.name: vectors})
                    cond = shared[size]
                else:
                    cond = backend.encode_prompt(self.texts[i], {self.name: vectors})
                total = torch.zeros((), device=device)
                for start in range(0, self.k, VAL_CHUNK):  # at most VAL_CHUNK rows per forward pass
                    t = t_all[start : start + VAL_CHUNK].to(device)
                    n = int(t.shape[0])
                    latents = latent.unsqueeze(0).expand(n, -1, -1, -1).to(device)
                    noise = noise_all[start : start + VAL_CHUNK].to(latents)
                    loss = backend.diffusion_loss(latents, cond.expand(n, -1, -1), noise, t)
                    total = total + loss.detach().float() * (n / self.k)
            losses.append(total)
        return math.fsum(torch.stack(losses).cpu().tolist()) / len(losses)


class BestTracker:
    """The lowest finite validation loss so far, its step (ties keep the earlier step) and its vectors."""

    def __init__(self, step: int | None = None, loss: float | None = None, vectors: torch.Tensor | None = None):
        self.step, self.loss, self.vectors = step, loss, vectors

    def offer(self, step: int, loss: float, vectors: torch.Tensor | None = None) -> bool:
        """True when ``loss`` is a new best (then it is recorded, with a float32 CPU copy of ``vectors``)."""
        if not math.isfinite(loss) or (self.loss is not None and not loss < self.loss):
            return False
        self.step, self.loss = step, loss
        self.vectors = vectors.detach().to("cpu", torch.float32).clone() if vectors is not None else None
        return True

    def state_dict(self) -> dict | None:
        """What a checkpoint's state file keeps, so a resume knows the best of the steps it continues from."""
        if self.step is None:
            return None
        return {"step": self.step, "val_loss": self.loss, "vectors": self.vectors}
