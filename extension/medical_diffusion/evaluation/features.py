"""Feature extraction for a list of image files, with the per-image cache and per-item failures."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation.feature_cache import FeatureCache, file_sha256
from medical_diffusion.evaluation.limits import check_limit
from medical_diffusion.evaluation.preprocessing import check_mode, load_for_network
from medical_diffusion.png_io import IMAGE_SUFFIXES

#: ``progress(stage, done, total)``; stage is e.g. "features: real".
StageProgress = Callable[[str, int, int], None]
EXTRACTORS = ("inception", "radimagenet")


@dataclass
class FeatureExtractor:
    """A feature network with its input size and an identity string for caching and reports."""

    name: str
    model: nn.Module
    input_size: int
    weights_id: str
    weights_path: str = ""

    def key(self, mode: str) -> str:
        return f"{self.name}-{self.weights_id[:16]}-{mode}"


def load_extractor(name: str, weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Build ``inception`` (FID) or ``radimagenet`` (MFID) from local weights (see ``weights.py``)."""
    from medical_diffusion.evaluation import weights as w

    if name == "inception":
        path = w.find_inception_weights(weights)  # a missing file fails before the network code loads
        from medical_diffusion.evaluation.inception import INPUT_SIZE, build_inception

        return FeatureExtractor("inception", build_inception(path), INPUT_SIZE, file_sha256(path), str(path))
    if name == "radimagenet":
        path = w.find_radimagenet_weights(weights)
        from medical_diffusion.evaluation.radimagenet import INPUT_SIZE, build_radimagenet

        return FeatureExtractor("radimagenet", build_radimagenet(path), INPUT_SIZE, file_sha256(path), str(path))
    raise MedDiffError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")


def collect_images(folder: str | os.PathLike) -> List[Path]:
    """Image files in ``folder`` and its sub-folders (e.g. ``neg/``, ``pos/``), sorted, hidden ones skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedDiffError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise MedDiffError(f"{folder}: no images found")
    return files


@dataclass
class FeatureSet:
    """Features of the images that could be read, and the ones that could not."""

    features: np.ndarray
    paths: List[str]
    failures: List[dict] = field(default_factory=list)


def extract_features(
    paths: Sequence[str | os.PathLike],
    extractor: FeatureExtractor,
    mode: str = "paper",
    batch_size: int = 32,
    cache: Optional[FeatureCache] = None,
    progress: Optional[StageProgress] = None,
    stage: str = "features",
) -> FeatureSet:
    """Features ``(n, d)`` for ``paths``; unreadable files are listed in ``failures`` and skipped."""
    check_mode(mode)
    batch_size = check_limit("batch_size", batch_size)
    key = extractor.key(mode)
    total = len(paths)
    feats: List[Optional[np.ndarray]] = [None] * total
    hashes: List[Optional[str]] = [None] * total
    failures: List[dict] = []
    todo: List[int] = []
    for i, p in enumerate(paths):
        try:
            hashes[i] = file_sha256(p)
        except OSError as exc:
            failures.append({"path": str(p), "problem": f"unreadable ({exc})"})
            continue
        cached = cache.get(key, hashes[i]) if cache is not None else None
        if cached is not None:
            feats[i] = cached
        else:
            todo.append(i)
    done = total - len(todo)
    if progress:
        progress(stage, done, total)
    model = extractor.model.eval()
    for start in range(0, len(todo), batch_size):
        idx, batch = [], []
        for i in todo[start:start + batch_size]:
            try:
                batch.append(load_for_network(paths[i], extractor.input_size, mode))
                idx.append(i)
            except MedDiffError as exc:
                failures.append({"path": str(paths[i]), "problem": str(exc)})
        if batch:
            with torch.inference_mode():
                out = model(torch.stack(batch)).float().numpy()
            for i, f in zip(idx, out):
                feats[i] = f
                if cache is not None:
                    cache.put(key, hashes[i], f)
        done += len(todo[start:start + batch_size])
        if progress:
            progress(stage, done, total)
    ok = [i for i in range(total) if feats[i] is not None]
    matrix = np.stack([feats[i] for i in ok]) if ok else np.zeros((0, 0), np.float32)
    return FeatureSet(matrix, [str(paths[i]) for i in ok], failures)
