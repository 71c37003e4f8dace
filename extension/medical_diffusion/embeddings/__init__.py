"""Embedding files: read every format users meet, write what A1111, ComfyUI and diffusers load.

Public API: :class:`Embedding`, :func:`load_embedding`, :func:`save_embedding`,
:func:`load_embeddings_dir`.
"""

from __future__ import annotations

from medical_diffusion.embeddings.model import Embedding
from medical_diffusion.embeddings.readers import load_embedding, load_embeddings_dir
from medical_diffusion.embeddings.safe_pickle import UnsafePickleError
from medical_diffusion.embeddings.writers import FORMATS, save_embedding

__all__ = ["Embedding", "FORMATS", "UnsafePickleError", "load_embedding", "load_embeddings_dir", "save_embedding"]
