"""FID / MFID between a real and a generated image set: the API behind ``meddiff fid`` and the webui."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.evaluation.bootstrap import RESAMPLE_MODES, bootstrap_frechet
from medical_diffusion.evaluation.feature_cache import FeatureCache
from medical_diffusion.evaluation.features import (FeatureExtractor, StageProgress, collect_images,
                                                   extract_features, load_extractor)
from medical_diffusion.evaluation.frechet import GaussianStats, frechet_distance, frechet_distance_from_stats
from medical_diffusion.evaluation.limits import check_confidence, check_limit
from medical_diffusion.evaluation.preprocessing import MODE_DESCRIPTIONS, check_mode

METRIC_NAMES = {"inception": "FID", "radimagenet": "MFID"}


@dataclass
class FidResult:
    """One distance with everything needed to reproduce it."""

    metric: str
    value: float
    extractor: str
    weights: str
    preprocessing: str
    preprocessing_detail: str
    n_real: int
    n_generated: int
    real: str
    generated: str
    method: str
    bootstrap: Optional[dict] = None
    failures: List[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = f"{self.metric} = {self.value:.4f}"
        if self.bootstrap:
            b = self.bootstrap
            text += (f"  {int(b['confidence'] * 100)}% CI ({b['low']:.4f}, {b['high']:.4f}), "
                     f"{b['reps']} bootstrap reps, resampled: {b['resampled']}")
        return text + f"  [{self.n_real} real vs {self.n_generated} generated; preprocessing={self.preprocessing}]"


def _features_or_stats(source, extractor, mode, batch_size, cache, progress, label):
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        stats = GaussianStats.load(p)
        made_with = stats.meta.get("extractor_key")
        if made_with and made_with != extractor.key(mode):
            raise InputFileError(p, f"statistics were made with {made_with}, not {extractor.key(mode)} "
                                    "(other network, weights or preprocessing)")
        return stats, None
    files = collect_images(p)
    fs = extract_features(files, extractor, mode, batch_size, cache, progress, f"features: {label}")
    if fs.features.shape[0] < 2:
        raise MedDiffError(f"{p}: fewer than 2 readable images")
    return None, fs


def check_sources(real: str | os.PathLike, generated: str | os.PathLike) -> None:
    """Fail fast, before any weights load: ``real`` is a folder of images or an ``.npz``,
    ``generated`` a folder of images."""
    p = Path(real)
    if p.suffix == ".npz":
        if not p.is_file():
            raise InputFileError(p, "statistics file not found")
    else:
        collect_images(p)
    collect_images(generated)


def compute_fid(
    real: str | os.PathLike,
    generated: str | os.PathLike,
    extractor: str | FeatureExtractor = "inception",
    weights: str | os.PathLike | None = None,
    mode: str = "paper",
    bootstrap_reps: int = 0,
    resample: str = "both",
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    progress: Optional[StageProgress] = None,
) -> FidResult:
    """FID (``extractor="inception"``) or MFID (``"radimagenet"``) between two folders of images.

    ``real`` may also be an ``.npz`` of stored mean/covariance (then no bootstrap). Sub-folders
    (``neg/``, ``pos/``) are included. ``bootstrap_reps > 0`` adds a percentile CI.
    """
    t0 = time.time()
    check_mode(mode)
    bootstrap_reps = check_limit("bootstrap_reps", bootstrap_reps)
    batch_size = check_limit("batch_size", batch_size)
    seed = check_limit("seed", seed)
    confidence = check_confidence(confidence)
    if resample not in RESAMPLE_MODES:
        raise MedDiffError(f"resample must be one of {', '.join(RESAMPLE_MODES)}, got {resample!r}")
    check_sources(real, generated)
    ext = extractor if isinstance(extractor, FeatureExtractor) else load_extractor(extractor, weights)
    cache = FeatureCache(cache_dir) if cache_dir else None
    stats_r, fs_r = _features_or_stats(real, ext, mode, batch_size, cache, progress, "real")
    stats_g, fs_g = _features_or_stats(generated, ext, mode, batch_size, cache, progress, "generated")
    if fs_g is None:
        raise MedDiffError(f"{generated}: the generated set must be a folder of images")
    boot = None
    if fs_r is not None:
        n_real = fs_r.features.shape[0]
        if bootstrap_reps > 0:
            cb = (lambda d, t: progress("bootstrap", d, t)) if progress else None
            b = bootstrap_frechet(fs_r.features, fs_g.features, bootstrap_reps, confidence, resample, seed, cb)
            value, boot, method = b.point, b.to_dict(), "features (nuclear norm)"
        else:
            value, method = frechet_distance(fs_r.features, fs_g.features), "features (nuclear norm)"
    else:
        if bootstrap_reps > 0:
            raise MedDiffError(f"{real}: bootstrap needs the real images, not stored statistics")
        n_real = stats_r.n
        value = frechet_distance_from_stats(stats_r, GaussianStats.from_features(fs_g.features))
        method = "statistics (eigenvalues)"
    failures = (fs_r.failures if fs_r else []) + fs_g.failures
    return FidResult(
        metric=METRIC_NAMES.get(ext.name, ext.name), value=float(value), extractor=ext.name,
        weights=ext.weights_path, preprocessing=mode, preprocessing_detail=MODE_DESCRIPTIONS[mode],
        n_real=n_real, n_generated=fs_g.features.shape[0], real=str(real), generated=str(generated),
        method=method, bootstrap=boot, failures=failures, seconds=round(time.time() - t0, 2),
    )


def save_real_stats(real: str | os.PathLike, out: str | os.PathLike, extractor: str | FeatureExtractor = "inception",
                    weights: str | os.PathLike | None = None, mode: str = "paper", batch_size: int = 32,
                    cache_dir: str | os.PathLike | None = None, progress: Optional[StageProgress] = None) -> Path:
    """Store mean/covariance of a real set as ``.npz`` for later ``compute_fid(real=that_file, ...)``."""
    check_mode(mode)
    batch_size = check_limit("batch_size", batch_size)
    collect_images(real)  # a missing or empty folder fails before any weights load
    ext = extractor if isinstance(extractor, FeatureExtractor) else load_extractor(extractor, weights)
    cache = FeatureCache(cache_dir) if cache_dir else None
    fs = extract_features(collect_images(real), ext, mode, batch_size, cache, progress, "features: real")
    if fs.features.shape[0] < 2:
        raise MedDiffError(f"{real}: fewer than 2 readable images")
    stats = GaussianStats.from_features(np.asarray(fs.features, np.float64))
    stats.meta = {"extractor_key": ext.key(mode), "extractor": ext.name, "weights": ext.weights_path,
                  "preprocessing": mode, "images": str(real), "failures": len(fs.failures)}
    return stats.save(out)
