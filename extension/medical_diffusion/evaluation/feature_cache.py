"""Per-image feature cache keyed by the file's content hash and the extractor's identity.

Layout: ``ROOT/<extractor key>/<sha[:2]>/<sha>.npz``. The extractor key covers the network, its
weights file hash and the preprocessing mode, so a changed weight file or mode never reuses
stale features. Each entry stores the features with a sha256 digest of (extractor key, image
hash, feature bytes); an entry whose digest, shape or dtype does not check out (damaged, edited,
or moved to another key) is treated as missing, so it is recomputed and rewritten. Writes are
atomic. The digest catches corruption, not a deliberate forger with write access to the cache.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from medical_diffusion.atomic_io import atomic_path


class FeatureCache:
    """Feature vectors stored per (extractor key, image content hash)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, extractor_key: str, sha: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor_key)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / safe / sha[:2] / f"{sha}.npz"

    @staticmethod
    def digest(extractor_key: str, sha: str, features: np.ndarray) -> str:
        """sha256 over what an entry claims: its key, its image and its float32 feature bytes."""
        h = hashlib.sha256(f"{extractor_key}\0{sha}\0{features.shape}\0".encode())
        h.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
        return h.hexdigest()

    def get(self, extractor_key: str, sha: str) -> Optional[np.ndarray]:
        """The cached features, or None when absent or when the entry fails its digest check."""
        p = self._path(extractor_key, sha)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as data:
                features, stored = data["features"], str(data["digest"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if features.dtype != np.dtype("<f4") or features.ndim != 1:
            return None
        if not hmac.compare_digest(stored, self.digest(extractor_key, sha, features)):
            return None
        return features

    def put(self, extractor_key: str, sha: str, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype="<f4").reshape(-1)
        with atomic_path(self._path(extractor_key, sha)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=features, digest=np.array(self.digest(extractor_key, sha, features)))
