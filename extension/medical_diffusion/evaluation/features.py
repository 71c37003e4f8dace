"""Feature extraction for a list of image files, with the per-image cache and per-item failures.

Images are decoded and resized by a :class:`~torch.utils.data.DataLoader` (``workers`` processes)
and go through the network in batches on ``device`` (CPU or GPU). Features are computed in full
fp32 on every device: TF32 is switched off for the extractor's convolutions and matrix products
while it runs (:func:`strict_fp32`), so a FID does not depend on the GPU it was computed on (GPU
features equal CPU features to about 1e-5 relative). The Fréchet distance itself is computed in
float64 on the CPU (``frechet.py``). Cached features are keyed by extractor, weights and
preprocessing, never by device.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation.feature_cache import FeatureCache
from medical_diffusion.file_digest import file_sha256
from medical_diffusion.evaluation.limits import check_limit, default_workers
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


@contextlib.contextmanager
def strict_fp32():
    """Full-fp32 convolutions and matrix products inside the block (TF32 off on CUDA), restored after.

    ``devices.configure_for_speed`` turns TF32 on for the diffusion model; a feature network under
    TF32 keeps only ~10 mantissa bits in its products, which moves FID by more than its reported
    precision, so the extractors run without it.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


class _NetworkInputs(torch.utils.data.Dataset):
    """``(position, tensor or None, problem)`` per file: decoding and resizing run in the loader's workers."""

    def __init__(self, paths: Sequence[str | os.PathLike], size: int, mode: str):
        self.paths, self.size, self.mode = [str(p) for p in paths], size, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int):
        try:
            return k, load_for_network(self.paths[k], self.size, self.mode), ""
        except MedDiffError as exc:
            return k, None, str(exc)


def _keep_items(items):
    """Collate: the batch's items as they are (unreadable files carry None)."""
    return items


def input_batches(paths: Sequence[str | os.PathLike], size: int, mode: str, batch_size: int, workers: int):
    """Batches of ``(position, tensor or None, problem)`` items for ``paths``, in order, decoded by ``workers``
    processes (0: in this process)."""
    return torch.utils.data.DataLoader(
        _NetworkInputs(paths, size, mode), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_keep_items, prefetch_factor=4 if workers else None,
    )


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
    device: str | torch.device | None = "cpu",
    workers: Optional[int] = 0,
) -> FeatureSet:
    """Features ``(n, d)`` for ``paths``; unreadable files are listed in ``failures`` and skipped.

    The network runs on ``device`` (``"auto"``: CUDA, then MPS, then the CPU) in fp32 without TF32;
    ``workers`` processes decode the images (None: ``min(4, CPUs)``; 0: this process).
    """
    from medical_diffusion.devices import resolve_device

    check_mode(mode)
    batch_size = check_limit("batch_size", batch_size)
    workers = default_workers() if workers is None else check_limit("workers", workers)
    dev = resolve_device(device)
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
    model = extractor.model.to(dev).float().eval()
    todo_paths = [paths[i] for i in todo]
    with strict_fp32():
        for items in input_batches(todo_paths, extractor.input_size, mode, batch_size, workers if todo else 0):
            idx, batch = [], []
            for k, tensor, problem in items:
                if tensor is None:
                    failures.append({"path": str(todo_paths[k]), "problem": problem})
                else:
                    idx.append(todo[k])
                    batch.append(tensor)
            if batch:
                x = torch.stack(batch)
                if dev.type == "cuda":
                    x = x.pin_memory()
                with torch.inference_mode():
                    out = model(x.to(dev, non_blocking=True)).float().cpu().numpy()
                for i, f in zip(idx, out):
                    feats[i] = f
                    if cache is not None:
                        cache.put(key, hashes[i], f)
            done += len(items)
            if progress:
                progress(stage, done, total)
    ok = [i for i in range(total) if feats[i] is not None]
    matrix = np.stack([feats[i] for i in ok]) if ok else np.zeros((0, 0), np.float32)
    return FeatureSet(matrix, [str(paths[i]) for i in ok], failures)
