"""Training settings (defaults = de Wilde et al. 2024) and their JSON form in the run folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.limits import MAX_LEARNING_RATE, MAX_TRAIN_STEPS, MAX_VECTORS, TRAIN_BOUNDS, check_range
from medical_diffusion.training.lr_schedule import LearnRateSchedule

__all__ = ["CONFIG_FILE", "MAX_VECTORS", "TrainConfig"]
INIT_MODES = ("text", "zeros", "random")
LATENT_MODES = ("mean", "sample")
LOG_WITH = ("none", "tensorboard")
#: ``val_data`` value that picks the ``val`` split beside a ``meddiff prepare --splits`` training folder
VAL_AUTO = "auto"
CONFIG_FILE = "run_config.json"


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str, type(None)), "int": (int,), "bool": (bool,),
    "float": (int, float), "float | None": (int, float, type(None)), "dict[str, Any]": (dict,),
    "bool | None": (bool, type(None)),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``run_config.json`` to reproduce it."""

    name: str
    data_dir: str
    model: str = "tiny"
    #: a class of a ``meddiff prepare`` output ``data_dir``: trains on ``data_dir/embedding/<class>``
    data_class: str | None = None
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
    bucketing: bool = False  # aspect-ratio buckets of ~resolution^2 pixels instead of the paper's square resize
    mask: str | None = None  # None, "alpha", or a folder of masks named like the images
    mask_weight: float = 1.0  # loss weight inside the mask (outside: 1)
    template_file: str | None = None  # None: the prompt is the embedding name alone
    # validation (off unless val_data is given): loss on fixed noise and timesteps, best.pt
    val_data: str | None = None  # a folder of held-out images, or "auto": the prepared val split
    val_every: int = 500  # steps between validations (0: only at the start and the end)
    val_timesteps: int = 8  # fixed timesteps per validation image, stratified over [0, T)
    # loss and vector averaging (off: the paper's plain MSE and the raw vectors)
    min_snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023), e.g. 5
    ema_decay: float | None = None  # EMA of the vectors, saved as <name>-ema.pt, e.g. 0.999
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
    #: move the VAE off the GPU once the latents are cached (back only for previews); None: on for CUDA
    offload_vae: bool | None = None
    #: read the loss back to the host every N steps (a GPU sync); 0: every step on the CPU, every 10 on CUDA
    sync_every: int = 0
    #: "tensorboard": loss, val loss, lr, vector norm and previews under <run>/tensorboard/
    log_with: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raise :class:`MedDiffError` for impossible settings."""
        from medical_diffusion.embeddings.model import check_name

        self._check_types()
        try:
            check_name(self.name)
        except ValueError as exc:
            raise MedDiffError(str(exc)) from None
        for key, (low, high) in TRAIN_BOUNDS.items():
            value = getattr(self, key)
            if value is not None:
                check_range(key, value, low, high)
        if self.init not in INIT_MODES:
            raise MedDiffError(f"init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.latents not in LATENT_MODES:
            raise MedDiffError(f"latents must be one of {', '.join(LATENT_MODES)}, got {self.latents!r}")
        if self.resolution % 8:
            raise MedDiffError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.data_class is not None and self.data_class.strip():
            from medical_diffusion.datasets.layout import check_plain_name

            check_plain_name(self.data_class.strip(), "class")
        if self.mask is not None and not self.mask.strip():
            raise MedDiffError("mask: give 'alpha', a folder of masks, or null for none")
        if self.template_file is not None and not self.template_file.strip():
            raise MedDiffError("template file: give a file or null for none")
        if self.autocast not in (None, "bf16", "fp16"):
            raise MedDiffError(f"autocast must be bf16 or fp16, got {self.autocast!r}")
        check_range("sync_every", self.sync_every, 0, 10_000)
        if self.val_data is not None and not self.val_data.strip():
            raise MedDiffError(f"val data: give a folder of held-out images, {VAL_AUTO!r}, or null for none")
        if self.log_with not in LOG_WITH:
            raise MedDiffError(f"log_with must be one of {', '.join(LOG_WITH)}, got {self.log_with!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise MedDiffError(f"prediction type must be epsilon or v_prediction, got {self.prediction_type!r}")
        schedule = self.schedule()
        check_range("steps of the learning-rate schedule", schedule.total_steps(self.steps), 1, MAX_TRAIN_STEPS)
        for rate, _until in getattr(schedule, "pieces", ()):
            check_range("learning rate", rate, 0.0, MAX_LEARNING_RATE)
        return self

    def _check_types(self) -> None:
        """Each setting has its declared type (JSON from the API may carry anything)."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = (str, int, float) if f.name == "learning_rate" else _TYPES.get(str(f.type))
            if allowed is None:
                continue
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            if not ok:
                problems.append(f"{f.name} must be {str(f.type).replace(' | None', ' or null')}, "
                                f"got {type(value).__name__}")
        if problems:
            raise MedDiffError("; ".join(problems))

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
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise MedDiffError(f"missing training setting(s): {', '.join(missing)}")
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
