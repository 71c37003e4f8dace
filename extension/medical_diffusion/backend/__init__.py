"""Model access behind one small interface (:class:`ModelBackend`).

Implementations: :mod:`medical_diffusion.backend.diffusers_backend` (standalone, Hugging Face
diffusers, optional extra) and :mod:`medical_diffusion.webui.backend` (the webui's loaded model).
"""

from medical_diffusion.backend.base import ModelBackend

__all__ = ["ModelBackend"]
