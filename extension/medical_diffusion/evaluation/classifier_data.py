"""Image sets for the classifier experiments: ``neg/`` and ``pos/`` folders loaded as uint8 tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from medical_diffusion.errors import MedDiffError
from medical_diffusion.png_io import list_images, load_image

CLASSES = ("neg", "pos")  # label 0, 1


def labelled_files(folder: str | os.PathLike) -> List[Tuple[Path, int]]:
    """``(path, label)`` for ``folder/neg/*`` (0) and ``folder/pos/*`` (1), sorted; clear error if absent."""
    folder = Path(folder)
    out: List[Tuple[Path, int]] = []
    for label, cls in enumerate(CLASSES):
        sub = folder / cls
        if not sub.is_dir():
            raise MedDiffError(f"{sub}: folder not found (expected {folder}/neg/ and {folder}/pos/)")
        out += [(p, label) for p in list_images(sub)]
    return out


def balanced_subset(items: Sequence[Tuple[Path, int]], total: Optional[int], seed: int,
                    where: str = "") -> List[Tuple[Path, int]]:
    """``total`` items, half per class (negatives take an odd one), drawn with ``seed``; None = all."""
    if total is None:
        return list(items)
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen: List[Tuple[Path, int]] = []
    for label, want in ((0, total - total // 2), (1, total // 2)):
        pool = [it for it in items if it[1] == label]
        if want > len(pool):
            raise MedDiffError(f"{where}: asked for {want} '{CLASSES[label]}' images, only {len(pool)} available")
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=want, replace=False))]
    return chosen


@dataclass
class ImageSet:
    """``images`` uint8 ``(N, 3, S, S)``, ``labels`` int64 ``(N,)``, and files that could not be read."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: List[str]
    failures: List[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @classmethod
    def concat(cls, sets: Sequence["ImageSet"]) -> "ImageSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            raise MedDiffError("the training set is empty")
        return cls(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                   sum((s.paths for s in sets), []), sum((s.failures for s in sets), []))

    def check_both_classes(self, where: str) -> None:
        counts = torch.bincount(self.labels, minlength=2).tolist()
        if min(counts) == 0:
            raise MedDiffError(f"{where}: needs both neg and pos images (found {counts[0]} neg, {counts[1]} pos)")


def load_image_set(items: Sequence[Tuple[Path, int]], size: int) -> ImageSet:
    """Read and resize (PIL bilinear) each image as RGB; unreadable files are listed and skipped."""
    arrays, labels, paths, failures = [], [], [], []
    for path, label in items:
        try:
            im = load_image(path, "RGB").resize((size, size), Image.BILINEAR)
        except MedDiffError as exc:
            failures.append({"path": str(path), "problem": str(exc)})
            continue
        arrays.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        labels.append(label)
        paths.append(str(path))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), paths, failures)
