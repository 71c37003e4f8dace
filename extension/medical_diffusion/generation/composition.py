"""Add pathologies one by one to a healthy case at one seed (paper Figure 3).

Stage 0 is the base prompt alone; stage ``j`` adds the first ``j`` pathologies with their
strengths as composable parts (``base :w0 AND effusion :0.5 AND ...``). The paper used strength
0.5 each and CFG 3 for three pathologies, so a CFG per stage can be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.interpolation import Frame, _progress_for
from medical_diffusion.generation.prompts import build_prompt
from medical_diffusion.generation.sampling import sample_images


@dataclass
class Stage:
    label: str
    prompt: str
    cfg_scale: float


def composition_stages(
    base: str,
    additions: Sequence[tuple[str, float]],
    *,
    base_weight: float = 1.0,
    cfg_scale: float = 2.0,
    stage_cfg: Sequence[float] | None = None,
) -> list[Stage]:
    """The prompts of the strip. ``base_weight`` is the base's weight once pathologies are added
    (0 drops it); ``stage_cfg`` gives one CFG per stage (``len(additions) + 1`` values)."""
    if not additions:
        raise MedDiffError("give at least one pathology to add")
    n = len(additions) + 1
    if stage_cfg is not None and len(stage_cfg) != n:
        raise MedDiffError(f"{len(stage_cfg)} CFG values given for {n} stages (base + {n - 1} pathologies)")
    stages = [Stage("base", build_prompt([(base, 1.0)]), stage_cfg[0] if stage_cfg else cfg_scale)]
    for j in range(1, n):
        parts = ([(base, base_weight)] if base_weight else []) + list(additions[:j])
        name, weight = additions[j - 1]
        stages.append(Stage(f"+ {name} {weight:g}", build_prompt(parts), stage_cfg[j] if stage_cfg else cfg_scale))
    return stages


def compose(
    backend: ModelBackend,
    stages: Sequence[Stage],
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **sample_kwargs,
) -> list[Frame]:
    """One image per stage, all at ``seed``."""
    frames = []
    for j, stage in enumerate(stages):
        (image,) = sample_images(backend, stage.prompt, embeddings=embeddings, seed=seed, batch_size=1,
                                 cfg_scale=stage.cfg_scale, progress=_progress_for(progress, j, len(stages)),
                                 **sample_kwargs)
        frames.append(Frame(float(j), stage.prompt, f"{stage.label}, cfg {stage.cfg_scale:g}", image))
    return frames
