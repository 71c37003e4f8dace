"""Model access behind one small interface (:class:`ModelBackend`).

Implementations: :mod:`medical_diffusion.backend.diffusers_backend` (standalone, Hugging Face
diffusers, optional extra) and :mod:`medical_diffusion.webui.backend` (the webui's loaded model).
``load_backend`` and ``DiffusersBackend`` are imported lazily (diffusers is heavy).
"""

from __future__ import annotations

from medical_diffusion.backend.base import ModelBackend

__all__ = ["ModelBackend", "DiffusersBackend", "load_backend"]


def __getattr__(name: str):
    if name in ("DiffusersBackend", "load_backend"):
        from medical_diffusion.backend import diffusers_backend

        return getattr(diffusers_backend, name)
    raise AttributeError(name)
