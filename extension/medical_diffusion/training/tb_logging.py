"""Optional experiment logging (``log_with="tensorboard"``): scalars and previews under ``<run>/tensorboard/``.

The loop talks to a :class:`ScalarWriter` (the few methods of ``torch.utils.tensorboard.SummaryWriter``
it uses), so tests pass a fake one; ``loss.csv`` stays the run's own record either way.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

from medical_diffusion.errors import MedDiffError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install tensorboard"


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...

    def add_image(self, tag: str, img_tensor: Any, global_step: int, dataformats: str = "CHW") -> Any: ...

    def flush(self) -> Any: ...

    def close(self) -> Any: ...


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_log_with(log_with: str) -> None:
    """Raise :class:`MedDiffError` before any data loads when the chosen logger is not installed."""
    if log_with == "tensorboard" and not tensorboard_available():
        raise MedDiffError(f"log_with tensorboard: the tensorboard package is not installed ({INSTALL_HINT}), "
                           "or train with log_with none")


def open_tensorboard(log_dir: Path, purge_step: int | None = None) -> ScalarWriter:
    """A ``SummaryWriter`` in ``log_dir``; ``purge_step`` drops events a resumed run will write again."""
    check_log_with("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class TrainLogger:
    """What the loop logs: per-step loss, lr and vector norm; validation; preview images."""

    def __init__(self, writer: ScalarWriter):
        self.writer = writer

    def step(self, step: int, loss: float, lr: float, vector_norm: float | None = None) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        if vector_norm is not None:
            self.writer.add_scalar("train/vector_norm", vector_norm, step)

    def validation(self, step: int, val_loss: float) -> None:
        self.writer.add_scalar("val/loss", val_loss, step)

    def preview(self, step: int, path: Path) -> None:
        try:
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            self.writer.add_image("preview", pixels, step, dataformats="HWC")
        except Exception as exc:  # a log entry must not end a run
            log.warning("tensorboard: preview %s not logged (%s)", path, exc)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception as exc:
            log.warning("tensorboard writer did not close cleanly: %s", exc)
