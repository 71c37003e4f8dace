"""Fréchet distance between two Gaussian fits of feature sets, exact and fast.

FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2). With feature matrices at hand the
cross term needs no d x d matrix square root: the non-zero eigenvalues of S1 S2 are the squared
singular values of X1c X2c^T / sqrt((n1-1)(n2-1)) (X1c, X2c the centred features, n1 x d and
n2 x d), so tr sqrt(S1 S2) is that matrix's nuclear norm. Everything runs in float64. When only
means and covariances are stored, an eigenvalue method gives the same quantity:
tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medical_diffusion.atomic_io import atomic_path
from medical_diffusion.errors import InputFileError, MedDiffError


@dataclass
class GaussianStats:
    """Mean, covariance (ddof=1) and sample count of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    meta: dict = field(default_factory=dict)  # e.g. extractor key and preprocessing mode

    @classmethod
    def from_features(cls, features: np.ndarray) -> "GaussianStats":
        x = as_feature_matrix(features)
        return cls(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=x.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` with ``mu``, ``sigma`` and ``n`` atomically."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(self.meta)))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """Read an ``.npz`` holding ``mu`` and ``sigma`` (pytorch-fid's stats files work too)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
                n = int(data["n"]) if "n" in data.files else 0
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        except (OSError, ValueError, KeyError) as exc:
            raise InputFileError(path, f"not a statistics file with 'mu' and 'sigma' ({exc})") from exc
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise InputFileError(path, f"mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu=mu, sigma=sigma, n=n, meta=meta)


def as_feature_matrix(features: np.ndarray) -> np.ndarray:
    """A float64 ``(n, d)`` matrix with n >= 2; a clear error otherwise."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise MedDiffError(f"features must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[0] < 2:
        raise MedDiffError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise MedDiffError("features contain NaN or infinite values")
    return x


def trace_sqrt_product_features(x1c: np.ndarray, x2c: np.ndarray) -> float:
    """tr sqrt(S1 S2) from centred features: nuclear norm of ``x1c @ x2c.T / sqrt((n1-1)(n2-1))``."""
    n1, n2 = x1c.shape[0], x2c.shape[0]
    d = x1c.shape[1]
    if min(n1, n2) > d:
        # More samples than dimensions: with x1c = Q1 R1 and x2c = Q2 R2 (thin QR),
        # sv(x1c x2c^T) = sv(R1 R2^T), a d x d matrix, without forming the n1 x n2 product.
        r1 = np.linalg.qr(x1c, mode="r")  # (d, d): x1c = Q1 r1
        r2 = np.linalg.qr(x2c, mode="r")
        cross = r1 @ r2.T
    else:
        cross = x1c @ x2c.T
    s = np.linalg.svd(cross, compute_uv=False)
    return float(s.sum() / np.sqrt((n1 - 1) * (n2 - 1)))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Exact Fréchet distance between two ``(n, d)`` feature sets (float64, ddof=1 covariances)."""
    x1, x2 = as_feature_matrix(features1), as_feature_matrix(features2)
    if x1.shape[1] != x2.shape[1]:
        raise MedDiffError(f"feature sizes differ: {x1.shape[1]} vs {x2.shape[1]}")
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    x1c, x2c = x1 - mu1, x2 - mu2
    n1, n2 = x1.shape[0], x2.shape[0]
    tr1 = float(np.einsum("ij,ij->", x1c, x1c)) / (n1 - 1)
    tr2 = float(np.einsum("ij,ij->", x2c, x2c)) / (n2 - 1)
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * trace_sqrt_product_features(x1c, x2c))


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative eigenvalues clipped to 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product_cov(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) for PSD S1, S2."""
    h = psd_sqrt(np.asarray(sigma1, np.float64))
    m = h @ np.asarray(sigma2, np.float64) @ h
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance_from_stats(stats1: GaussianStats, stats2: GaussianStats) -> float:
    """Fréchet distance from means and covariances only (eigenvalue method, float64)."""
    mu1, mu2 = np.asarray(stats1.mu, np.float64), np.asarray(stats2.mu, np.float64)
    s1, s2 = np.asarray(stats1.sigma, np.float64), np.asarray(stats2.sigma, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MedDiffError(f"statistics differ in size: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product_cov(s1, s2))
