"""Per-image feature cache keyed by the file's content hash and the extractor's identity.

Layout: ``ROOT/<extractor key>/<sha[:2]>/<sha>.npy``. The extractor key covers the network, its
weights file hash and the preprocessing mode, so a changed weight file or mode never reuses
stale features. Writes are atomic; a damaged entry is treated as missing.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from medical_diffusion.atomic_io import atomic_path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Feature vectors stored per (extractor key, image content hash)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, extractor_key: str, sha: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor_key)
        return self.root / safe / sha[:2] / f"{sha}.npy"

    def get(self, extractor_key: str, sha: str) -> Optional[np.ndarray]:
        p = self._path(extractor_key, sha)
        if not p.is_file():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, extractor_key: str, sha: str, features: np.ndarray) -> None:
        with atomic_path(self._path(extractor_key, sha)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(features, dtype=np.float32), allow_pickle=False)
