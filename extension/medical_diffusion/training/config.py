"""Training settings (defaults = de Wilde et al. 2024) and their JSON form in the run folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.training.lr_schedule import LearnRateSchedule

MAX_VECTORS = 75
INIT_MODES = ("text", "zeros", "random")
LATENT_MODES = ("mean", "sample")
CONFIG_FILE = "run_config.json"


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``run_config.json`` to reproduce it."""

    name: str
    data_dir: str
    model: str = "tiny"
    prediction_type: str | None = None  # None: as the model says
    # embedding
    n_vectors: int = 64
    init: str = "text"  # "text" (A1111: init tokens spread over the vectors), "zeros", "random"
    init_text: str = "*"
    init_random_scale: float = 0.01  # random init: std relative to the vocabulary's mean norm
    # optimisation
    learning_rate: str = "0.005"
    steps: int = 50_000
    batch_size: int = 1
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    seed: int = 0
    # data
    resolution: int = 512
    latents: str = "mean"  # VAE posterior "mean" or one "sample", encoded once and cached
    hflip: bool = False  # anatomy has a side: off by default
    mask: str | None = None  # None, "alpha", or a folder of masks named like the images
    mask_weight: float = 1.0  # loss weight inside the mask (outside: 1)
    template_file: str | None = None  # None: the prompt is the embedding name alone
    # outputs
    save_every: int = 500
    preview_every: int = 500
    preview_steps: int = 20
    preview_cfg: float = 2.0
    preview_seed: int = 0
    preview_prompt: str | None = None  # None: the embedding name
    # speed / memory
    autocast: str | None = None  # None, "bf16" or "fp16"
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raise :class:`MedDiffError` for impossible settings."""
        from medical_diffusion.embeddings.model import check_name

        try:
            check_name(self.name)
        except ValueError as exc:
            raise MedDiffError(str(exc)) from None
        if not 1 <= self.n_vectors <= MAX_VECTORS:
            raise MedDiffError(
                f"number of vectors must be 1..{MAX_VECTORS} (one prompt chunk holds 75 tokens), got {self.n_vectors}"
            )
        if self.init not in INIT_MODES:
            raise MedDiffError(f"init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.latents not in LATENT_MODES:
            raise MedDiffError(f"latents must be one of {', '.join(LATENT_MODES)}, got {self.latents!r}")
        for label, value in (("steps", self.steps), ("batch size", self.batch_size),
                             ("gradient accumulation", self.grad_accumulation)):
            if value < 1:
                raise MedDiffError(f"{label} must be at least 1, got {value}")
        if self.resolution < 8 or self.resolution % 8:
            raise MedDiffError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.save_every < 0 or self.preview_every < 0:
            raise MedDiffError("save/preview intervals must be >= 0 (0 turns them off)")
        if self.mask_weight <= 0:
            raise MedDiffError(f"mask weight must be positive, got {self.mask_weight}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise MedDiffError(f"autocast must be bf16 or fp16, got {self.autocast!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise MedDiffError(f"prediction type must be epsilon or v_prediction, got {self.prediction_type!r}")
        self.schedule()
        return self

    def schedule(self) -> LearnRateSchedule:
        return LearnRateSchedule.parse(self.learning_rate)

    def total_steps(self) -> int:
        return self.schedule().total_steps(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedDiffError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise InputFileError(path, "missing: not a training run folder") from None
        except (OSError, ValueError) as exc:
            raise InputFileError(path, f"unreadable run config: {exc}") from None
        if not isinstance(data, dict):
            raise InputFileError(path, "run config must be a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, MedDiffError) as exc:
            raise InputFileError(path, str(exc)) from None
