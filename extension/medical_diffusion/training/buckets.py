"""Aspect-ratio bucketing (an option): non-square training images keep their shape.

The paper's path resizes every image to ``resolution`` x ``resolution``. With bucketing, each image
goes to the bucket of a fixed grid whose aspect ratio is closest to its own, and batches are drawn
from one bucket at a time (kohya sd-scripts / diffusers style).

The grid for a ``resolution``:

- the square bucket ``resolution`` x ``resolution`` (so a square image is resized exactly as on the
  square path, by the same call);
- for each width ``w`` that is a multiple of ``step`` (64 by default), the tallest height ``h``, a
  multiple of ``step`` too, with ``w * h <= resolution**2``; each non-square pair whose aspect lies
  within ``1/max_aspect .. max_aspect`` (1:2 .. 2:1 by default) is kept with its transpose, so both
  orientations have the same buckets (as kohya's ``make_bucket_resolutions``). No bucket has more
  pixels than the square one, so bucketing costs no more memory per image.

An image goes to the bucket nearest in ``|log(aspect)|`` (ties: the larger bucket, then the
narrower). It is resized to the bucket as the square path resizes (bicubic; small images are scaled
up to the bucket as they would be to the square); when its aspect differs from the bucket's, the
largest centred region with the bucket's aspect is what is resized (cover, then centre crop: only
the sliver that makes up the aspect difference is lost). Masks get the same region, as fractions of
their own size, so they stay aligned with the image.

Each bucket's latents are cached once (:class:`BucketedLatentCache`); :class:`BucketBatchOrder`
makes every batch from a single bucket, with the order derived from ``(seed, batch number)`` alone so
a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.training.dataset import (
    Placement,
    TrainImage,
    encode_views,
    load_images,
    loss_weights,
)
from medical_diffusion.training.seeds import mix

log = logging.getLogger(__name__)

#: bucket sides are multiples of this (pixels): 64 keeps SD latents a multiple of 8
DEFAULT_STEP = 64
#: the widest bucket is this many times wider than tall (and the tallest the reverse)
DEFAULT_MAX_ASPECT = 2.0
MAX_ASPECT_LIMIT = 4.0
#: the seed tag of the per-epoch shuffles: the square path's data order uses the same one, so one
#: bucket holding every image (all square, say) gives the square path's order
_ORDER_TAG = 1

Size = tuple[int, int]  # (width, height) in pixels


def _aspect_key(size: Size) -> tuple[float, int]:
    return size[0] / size[1], size[0]


def bucket_grid(resolution: int, *, step: int = DEFAULT_STEP, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[Size]:
    """The buckets ``(width, height)`` for ``resolution``, portrait first (see the module docstring)."""
    if resolution < 8 or resolution % 8:
        raise MedDiffError(f"resolution must be a positive multiple of 8, got {resolution}")
    if step < 8 or step % 8:
        raise MedDiffError(f"bucket step must be a positive multiple of 8, got {step}")
    if not 1.0 <= max_aspect <= MAX_ASPECT_LIMIT:
        raise MedDiffError(f"bucket max aspect must be between 1 and {MAX_ASPECT_LIMIT:g}, got {max_aspect}")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    w = step
    while w * step <= area:
        h = area // w // step * step
        if w != h and 1.0 / max_aspect <= w / h <= max_aspect:
            sizes.update(((w, h), (h, w)))
        w += step
    return sorted(sizes, key=_aspect_key)


def nearest_bucket(width: int, height: int, grid: Sequence[Size]) -> int:
    """Index in ``grid`` of the bucket whose aspect ratio is closest to ``width / height`` (in log ratio)."""
    if width < 1 or height < 1:
        raise MedDiffError(f"image size must be positive, got {width}x{height}")
    own = math.log(width / height)
    return min(
        range(len(grid)),
        key=lambda k: (abs(math.log(grid[k][0] / grid[k][1]) - own), -grid[k][0] * grid[k][1], grid[k][0]),
    )


def placement_for(width: int, height: int, bucket: Size) -> Placement:
    """Resize a ``width`` x ``height`` image to ``bucket``: whole when the aspect matches, else its centred
    region with the bucket's aspect (the largest one: cover, then centre crop)."""
    bw, bh = bucket
    if width * bh == height * bw:
        return Placement((bw, bh))
    if width * bh > height * bw:  # wider than the bucket: keep the full height, trim the sides
        keep = height * bw / bh / width
        left = (1.0 - keep) / 2
        return Placement((bw, bh), (left, 0.0, left + keep, 1.0))
    keep = width * bh / bw / height  # taller than the bucket: keep the full width, trim top and bottom
    top = (1.0 - keep) / 2
    return Placement((bw, bh), (0.0, top, 1.0, top + keep))


def image_size(image: TrainImage) -> Size:
    """``(width, height)`` of a loaded image's pixels (its bucket, once bucketed)."""
    return int(image.pixels.shape[-1]), int(image.pixels.shape[-2])


def bucket_counts(images: Sequence[TrainImage]) -> dict[Size, int]:
    """Images per bucket ``(width, height)``, portrait first."""
    counts = Counter(image_size(im) for im in images)
    return {size: counts[size] for size in sorted(counts, key=_aspect_key)}


def bucket_summary(images: Sequence[TrainImage]) -> str:
    """``"448x576: 30, 512x512: 10"`` (width x height: images), for logs and the UI."""
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in bucket_counts(images).items())


def load_bucketed_images(
    data_dir: str | Path,
    resolution: int,
    mask: str | None = None,
    *,
    step: int | None = None,
    max_aspect: float | None = None,
    what: str = "training",
) -> list[TrainImage]:
    """Like :func:`~medical_diffusion.training.dataset.load_training_images` (same checks, same order), but each
    image (and its mask) is resized to its aspect bucket instead of the square.

    ``step`` and ``max_aspect`` default to :data:`DEFAULT_STEP` and :data:`DEFAULT_MAX_ASPECT` (read at call time).
    """
    grid = bucket_grid(resolution, step=DEFAULT_STEP if step is None else step,
                       max_aspect=DEFAULT_MAX_ASPECT if max_aspect is None else max_aspect)

    def place(size: Size) -> Placement:
        return placement_for(size[0], size[1], grid[nearest_bucket(size[0], size[1], grid)])

    images = load_images(data_dir, mask, place, what)
    log.info("aspect buckets (width x height: images): %s", bucket_summary(images))
    return images


class BucketedLatentCache:
    """:class:`~medical_diffusion.training.dataset.LatentCache` for images of several sizes: one latent tensor
    per bucket (the images' pixel size), computed once; a batch comes from one bucket.

    Image ``i`` keeps its index (file order), so ``captions[i]`` and the indices of
    :class:`BucketBatchOrder` mean what they mean for the square cache.
    """

    def __init__(
        self,
        backend: ModelBackend,
        images: list[TrainImage],
        *,
        sample: bool = False,
        hflip: bool = False,
        mask_weight: float = 1.0,
        seed: int = 0,
        encode_batch: int = 4,
    ):
        if not images:
            raise MedDiffError("no training images to cache")
        self.hflip = hflip
        #: bucket sizes ``(width, height)``, portrait first
        self.buckets: list[Size] = sorted({image_size(im) for im in images}, key=_aspect_key)
        #: the bucket (index into :attr:`buckets`) of each image
        self.bucket_of: list[int] = [self.buckets.index(image_size(im)) for im in images]
        self._slot: list[int] = []  # image i is row _slot[i] of its bucket's tensors
        members: list[list[int]] = [[] for _ in self.buckets]
        for i, b in enumerate(self.bucket_of):
            self._slot.append(len(members[b]))
            members[b].append(i)
        generator = torch.Generator().manual_seed(seed)  # consumed bucket by bucket, in bucket order
        with_masks = any(im.mask is not None for im in images)
        #: per bucket, ``(views, n, C, h, w)``; view 1 is the flipped image
        self.latents: list[torch.Tensor] = []
        #: per bucket, ``(views, n, 1, h, w)``, or None without masks
        self.weights: list[torch.Tensor] | None = [] if with_masks else None
        for rows in members:
            pixels = torch.stack([images[i].pixels for i in rows])
            lat = encode_views(backend, pixels, hflip=hflip, sample=sample, generator=generator,
                               encode_batch=encode_batch, paths=[images[i].path for i in rows])
            self.latents.append(lat)
            if self.weights is not None:
                masks = torch.stack([images[i].mask for i in rows])
                self.weights.append(loss_weights(masks, tuple(lat.shape[-2:]), mask_weight, hflip))
        self.captions = [im.caption for im in images]

    def __len__(self) -> int:
        return len(self.bucket_of)

    def latent(self, index: int, flipped: bool = False) -> torch.Tensor:
        """The cached latent ``(C, h, w)`` of image ``index`` (its flipped view when ``flipped`` and hflip is on)."""
        return self.latents[self.bucket_of[index]][1 if flipped and self.hflip else 0, self._slot[index]]

    def batch(self, indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents ``(B, C, h, w)`` and weights ``(B, 1, h, w)`` or None; all ``indices`` must share a bucket.

        ``flips`` may be longer than ``indices`` (a bucket's last, smaller batch): its first ``B`` are used.
        """
        if not indices:
            raise ValueError("an empty batch")
        if len(flips) < len(indices):
            raise ValueError(f"{len(indices)} images but only {len(flips)} flip flags")
        found = sorted({self.bucket_of[i] for i in indices})
        if len(found) != 1:
            sizes = ", ".join(f"{self.buckets[b][0]}x{self.buckets[b][1]}" for b in found)
            raise ValueError(f"a batch must come from one aspect bucket; images {list(indices)} span {sizes}")
        b = found[0]
        views = [1 if f and self.hflip else 0 for f in flips[: len(indices)]]
        rows = [self._slot[i] for i in indices]
        lat = torch.stack([self.latents[b][v, r] for v, r in zip(views, rows)])
        if self.weights is None:
            return lat, None
        return lat, torch.stack([self.weights[b][v, r] for v, r in zip(views, rows)])


class BucketBatchOrder:
    """Batch ``n`` of the run (``step * grad_accumulation + micro``), every batch from one bucket.

    Each epoch: the images of each bucket are shuffled and cut into batches of ``batch_size``; a bucket's
    last batch keeps the remainder (smaller, as kohya does), so every image is seen exactly once per
    epoch; then, with more than one bucket, the order of the batches is shuffled. Everything is drawn
    from ``seed`` and the epoch alone. With a single bucket the order is the square path's
    (``loop._DataOrder``) whenever the number of images is a multiple of ``batch_size``.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int):
        if batch_size < 1:
            raise MedDiffError(f"batch size must be at least 1, got {batch_size}")
        if not bucket_of:
            raise MedDiffError("no training images to order")
        self.batch_size, self.seed = batch_size, seed
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_of):
            groups.setdefault(int(b), []).append(i)
        self._members = [groups[b] for b in sorted(groups)]
        #: batches in one epoch (every image once)
        self.batches_per_epoch = sum(-(-len(m) // batch_size) for m in self._members)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``, in order."""
        g = torch.Generator().manual_seed(mix(self.seed, _ORDER_TAG, epoch))
        batches: list[list[int]] = []
        for members in self._members:
            shuffled = [members[p] for p in torch.randperm(len(members), generator=g).tolist()]
            batches += [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        if len(self._members) > 1:
            batches = [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def indices(self, batch_number: int) -> list[int]:
        """The image indices of batch ``batch_number`` (0-based over the whole run)."""
        if batch_number < 0:
            raise ValueError(f"batch number must be >= 0, got {batch_number}")
        epoch, pos = divmod(batch_number, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        return list(self._epoch[1][pos])
