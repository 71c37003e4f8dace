"""Training images: loading, optional loss-weight masks and captions, and the latent cache.

Every image is VAE-encoded once (posterior mean, or one seeded sample) and kept in memory;
with horizontal flip on, the flipped image is encoded too, so no VAE runs during training.
Images are resized to the square ``resolution`` (the paper's path) or, with
:mod:`medical_diffusion.training.buckets`, to aspect-ratio buckets; both load through :func:`load_images`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medical_diffusion.allowed_roots import check_allowed
from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.png_io import load_image
from medical_diffusion.training.data_folder import image_files

log = logging.getLogger(__name__)

_LEADING_NUMBERS = re.compile(r"^[\d\s_\-.]+")


@dataclass
class TrainImage:
    path: Path
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor | None  # (1, H, W) in [0, 1]
    caption: str


def _inside_roots(path: Path, what: str) -> Path:
    """``path`` resolved; an :class:`InputFileError` when it (a symlink, say) leads outside the allowed roots."""
    try:
        return check_allowed(path)
    except MedDiffError:
        raise InputFileError(path, f"{what} leads outside the folders this extension may use") from None


def caption_for(path: Path) -> str:
    """``[filewords]`` text: ``<stem>.txt`` beside the image, else the file name without leading numbers."""
    txt = path.with_suffix(".txt")
    if txt.is_file():
        _inside_roots(txt, "caption file")
        try:
            return txt.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(txt, f"unreadable caption: {exc}") from None
    return _LEADING_NUMBERS.sub("", path.stem).replace("_", " ").strip()


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _find_mask(mask_dir: Path, image: Path, what: str = "training") -> Path:
    for candidate in sorted(mask_dir.glob(image.stem + ".*")):
        if candidate.is_file() and candidate.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
            return candidate
    raise InputFileError(mask_dir / f"{image.stem}.png", f"no mask for {what} image {image.name}")


@dataclass(frozen=True)
class Placement:
    """How one image becomes training pixels: resized to ``size`` ``(width, height)``.

    ``box`` is the part of the image that is resized, as fractions ``(left, top, right, bottom)`` of
    its width and height (None: the whole image). Masks get the same box in their own size, so they
    stay aligned with the image whatever their resolution.
    """

    size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None


def _place(img: Image.Image, placement: Placement, resample: int) -> Image.Image:
    if placement.box is None:
        return img.resize(placement.size, resample)
    w, h = img.size
    left, top, right, bottom = placement.box
    return img.resize(placement.size, resample, box=(left * w, top * h, right * w, bottom * h))


def load_images(
    data_dir: str | Path, mask: str | None, placement: Callable[[tuple[int, int]], Placement], what: str = "training"
) -> list[TrainImage]:
    """Load every image in ``data_dir`` (:func:`~.data_folder.image_files`: never a contact sheet), each
    resized as ``placement(its (width, height))`` says.

    Each file is resolved (symlinks followed) and refused when it lands outside the allowed roots;
    all problems are reported together. ``mask``: None, ``"alpha"`` or a folder of masks named like
    the images. ``what`` ("training", "validation") names the images in errors.
    """
    if not str(data_dir).strip():
        raise MedDiffError(f"no {what} images folder given")
    folder = Path(data_dir)
    paths = image_files(folder)
    if not paths:
        raise InputFileError(folder, f"no {what} images found (expected .png/.jpg/... files directly inside)")
    mask_dir = None
    if mask not in (None, "alpha"):
        mask_dir = Path(mask)
        _inside_roots(mask_dir, "mask folder")
        if not mask_dir.is_dir():
            raise InputFileError(mask_dir, "mask folder not found")
    images: list[TrainImage] = []
    failures: list[InputFileError] = []
    for path in paths:
        try:
            _inside_roots(path, f"{what} image")
            img = load_image(path, "RGBA" if mask == "alpha" else "RGB")
            where = placement(img.size)
            img = _place(img, where, Image.BICUBIC)
            tensor = _to_tensor(img)
            pixels = tensor[:3] * 2 - 1
            weight = None
            if mask == "alpha":
                weight = tensor[3:4]
            elif mask_dir is not None:
                mpath = _find_mask(mask_dir, path, what)
                _inside_roots(mpath, "mask")
                weight = _to_tensor(_place(load_image(mpath, "L"), where, Image.BILINEAR))
            images.append(TrainImage(path, pixels, weight, caption_for(path)))
        except InputFileError as exc:
            failures.append(exc)
        except (OSError, ValueError) as exc:
            failures.append(InputFileError(path, f"unreadable image: {exc}"))
    if len(failures) == 1:
        raise failures[0]
    if failures:
        listed = "; ".join(str(f) for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise MedDiffError(f"{len(failures)} {what} files are unusable: {listed}{more}")
    return images


def load_training_images(data_dir: str | Path, resolution: int, mask: str | None = None,
                         what: str = "training") -> list[TrainImage]:
    """Load every image in ``data_dir`` resized to ``resolution`` x ``resolution`` (the paper's square path).

    See :func:`load_images` for the checks; :func:`medical_diffusion.training.buckets.load_bucketed_images`
    keeps aspect ratios instead.
    """
    square = Placement((resolution, resolution))
    return load_images(data_dir, mask, lambda _size: square, what)


def encode_views(
    backend: ModelBackend,
    pixels: torch.Tensor,
    *,
    hflip: bool,
    sample: bool,
    generator: torch.Generator,
    encode_batch: int,
    paths: Sequence[Path] | None = None,
) -> torch.Tensor:
    """Latents ``(views, N, C, h, w)`` of ``pixels`` ``(N, 3, H, W)``; view 1 (with ``hflip``) is the flipped image.

    NaN/inf latents (an fp16 VAE that overflows, as SDXL's stock VAE can) raise :class:`MedDiffError`
    naming the images (``paths``), before anything is trained on them.
    """
    views = [pixels, pixels.flip(-1)] if hflip else [pixels]
    encoded = []
    with torch.no_grad():
        for view in views:
            parts = [
                backend.encode_images(view[i : i + encode_batch], sample=sample, generator=generator).float().cpu()
                for i in range(0, len(view), encode_batch)
            ]
            encoded.append(torch.cat(parts))
    latents = torch.stack(encoded)
    bad = (~torch.isfinite(latents)).flatten(2).any(-1).any(0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        names = [str(paths[i]) if paths is not None else f"image {i}" for i in rows[:3]]
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        raise MedDiffError(f"the VAE gave NaN/inf latents for {', '.join(names)}{more}: an fp16 VAE overflowing? "
                           "Use --precision fp32 (standalone), --no-half-vae in the webui, or an fp16-fix VAE")
    return latents


def loss_weights(masks: torch.Tensor, size: tuple[int, int], mask_weight: float, hflip: bool) -> torch.Tensor:
    """Loss weights ``(views, N, 1, h, w)`` per latent cell from masks ``(N, 1, H, W)``: 1 outside, ``mask_weight`` in."""
    small = F.adaptive_avg_pool2d(masks.float(), size)
    weight = 1.0 + (mask_weight - 1.0) * small
    return torch.stack([weight, weight.flip(-1)] if hflip else [weight])


class LatentCache:
    """Scaled latents (and latent-resolution loss weights) of every training image, computed once."""

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
        self.hflip = hflip
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.stack([im.pixels for im in images])
        #: (views, N, C, h, w): view 1 is the flipped image
        self.latents = encode_views(backend, pixels, hflip=hflip, sample=sample, generator=generator,
                                    encode_batch=encode_batch, paths=[im.path for im in images])
        self.weights: torch.Tensor | None = None
        if any(im.mask is not None for im in images):
            h, w = self.latents.shape[-2:]
            self.weights = loss_weights(torch.stack([im.mask for im in images]), (h, w), mask_weight, hflip)
        self.captions = [im.caption for im in images]

    def __len__(self) -> int:
        return int(self.latents.shape[1])

    def latent(self, index: int, flipped: bool = False) -> torch.Tensor:
        """The cached latent ``(C, h, w)`` of image ``index`` (its flipped view when ``flipped`` and hflip is on)."""
        return self.latents[1 if flipped and self.hflip else 0, index]

    def batch(self, indices: list[int], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents ``(B, C, h, w)`` and weights ``(B, 1, h, w)`` or None."""
        views = [1 if f and self.hflip else 0 for f in flips]
        lat = torch.stack([self.latents[v, i] for v, i in zip(views, indices)])
        if self.weights is None:
            return lat, None
        return lat, torch.stack([self.weights[v, i] for v, i in zip(views, indices)])
