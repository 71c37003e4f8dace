"""Textual Inversion training: one embedding learned while the whole model stays frozen.

Entry points: :class:`TrainConfig` and :func:`train` (``run_training`` for a run folder with
resume). The model is reached only through :class:`medical_diffusion.backend.ModelBackend`.
"""

from __future__ import annotations

from medical_diffusion.training.config import TrainConfig
from medical_diffusion.training.loop import TrainResult, run_training, train
from medical_diffusion.training.progress import ProgressEvent

__all__ = ["ProgressEvent", "TrainConfig", "TrainResult", "run_training", "train"]
