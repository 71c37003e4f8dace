"""Progress reporting: one event per optimizer step, shown by the CLI as a tqdm bar."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class ProgressEvent:
    """State after an optimizer step (``step`` counts steps done, 1-based)."""

    step: int
    total: int
    loss: float
    lr: float
    eta_seconds: float | None = None
    #: training steps per second over the last host sync (previews and checkpoints excluded)
    it_per_s: float | None = None
    preview: Path | None = None
    checkpoint: Path | None = None
    message: str = ""
    #: validation loss, on the steps where it was computed (``val_every``)
    val_loss: float | None = None
    #: step and validation loss of ``best.pt`` after this validation
    best_step: int | None = None
    best_val_loss: float | None = None
    #: the validation of the untrained vectors at step 0: no training step yet (``loss`` is NaN)
    validation_only: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


class TqdmProgress:
    """A :data:`ProgressCallback` drawing a tqdm bar (loss and lr in the postfix)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
        self.val: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.val_loss is not None:
            best = f" (best {event.best_val_loss:.4f} @ {event.best_step})" if event.best_step is not None else ""
            self.val = f"{event.val_loss:.4f}{best}"
        extra = {"val": self.val} if self.val is not None else {}
        if event.validation_only:
            self.bar.set_postfix(**extra, refresh=True)
            return
        self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2g}", **extra, refresh=False)
        self.bar.update(event.step - self.bar.n)
        if event.checkpoint is not None:
            self.bar.write(f"step {event.step}: saved {event.checkpoint}")
        if event.preview is not None:
            self.bar.write(f"step {event.step}: preview {event.preview}")
        if event.message:
            self.bar.write(event.message)

    def close(self) -> None:
        self.bar.close()


class EtaEstimator:
    """Seconds left, from an exponential moving average of the step time."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.step_time: float | None = None

    def update(self, seconds: float, steps_left: int) -> float:
        if self.step_time is None:
            self.step_time = seconds
        else:
            self.step_time += self.smoothing * (seconds - self.step_time)
        return self.step_time * max(steps_left, 0)


def format_duration(seconds: float) -> str:
    """The project's one duration format (ETAs, estimates, timings): under a minute seconds (``43 s``), then
    ``h:mm:ss`` (``59213`` -> ``16:26:53``), from a day on days, hours and minutes (``3 d 23 h 00 min``)."""
    total = max(0, int(round(seconds)))
    if total < 60:
        return f"{total} s"
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days} d {hours} h {minutes:02d} min" if days else f"{hours}:{minutes:02d}:{secs:02d}"
