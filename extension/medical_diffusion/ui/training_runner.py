"""One training run at a time in a background thread, shared by the Train tab and the API."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medical_diffusion.errors import MedDiffError
from medical_diffusion.ui.context import UIContext


@dataclass
class RunState:
    """What a client may ask about the current (or last) run."""

    name: str = ""
    run_dir: str = ""
    running: bool = False
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    eta_seconds: float | None = None
    preview: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    error: str | None = None
    embedding: str | None = None  # the saved embedding, once finished
    interrupted: bool = False
    started_at: float | None = None  # Unix time the run was accepted
    finished_at: float | None = None  # Unix time it ended (finished, stopped or failed)

    def to_dict(self, with_losses: bool = True) -> dict[str, Any]:
        d = dict(self.__dict__)
        if not with_losses:
            d.pop("losses")
        return d


class TrainingRunner:
    """Start, stop and watch a training run; the final embedding lands in ``ctx.embeddings_dir``."""

    def __init__(self, ctx: UIContext):
        self.ctx = ctx
        self.state = RunState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config, run_dir: str | Path | None = None, resume: bool = False) -> RunState:
        """Validate ``config`` (a :class:`TrainConfig`) and start it; raise if a run is going."""
        from medical_diffusion.training.config import TrainConfig

        if not isinstance(config, TrainConfig):
            config = TrainConfig.from_dict(dict(config))
        config.validate()
        config.data_dir = str(self.ctx.path(config.data_dir, must_exist=True)) if config.data_dir else ""
        folder = self.ctx.path(run_dir) if run_dir else self.ctx.path(self.ctx.work_dir / "runs" / config.name)
        with self._lock:
            if self.running:
                raise MedDiffError(f"a training run ({self.state.name}) is already going; stop it first")
            self._stop.clear()
            self.state = RunState(name=config.name, run_dir=str(folder), running=True, total=config.steps,
                                  message=f"starting {config.name} in {folder}", started_at=time.time())
            self._thread = threading.Thread(target=self._work, args=(config, folder, resume),
                                            name=f"meddiff-train-{config.name}", daemon=True)
            self._thread.start()
        return self.state

    def stop(self) -> RunState:
        if self.running:
            self._stop.set()
            self.state.message = "stopping after this step; a checkpoint will be saved"
        return self.state

    def wait(self, timeout: float | None = None) -> RunState:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    def _on_event(self, event) -> None:
        s = self.state
        s.step, s.total, s.loss, s.lr, s.eta_seconds = event.step, event.total, event.loss, event.lr, event.eta_seconds
        s.losses.append((event.step, event.loss))
        if event.preview is not None:
            s.preview = str(event.preview)
        eta = f", ETA {event.eta_seconds:.0f} s" if event.eta_seconds is not None else ""
        s.message = f"step {event.step}/{event.total}, loss {event.loss:.4f}, lr {event.lr:g}{eta}"
        self.ctx.on_training_step(event)

    def _work(self, config, folder: Path, resume: bool) -> None:
        from medical_diffusion.embeddings import load_embedding, save_embedding
        from medical_diffusion.training.loop import train

        ctx, s = self.ctx, self.state
        try:
            with ctx.training_session(f"train {config.name}", config.steps) as host_stop:
                with ctx.model_work() as backend:
                    result = train(config, backend, folder, resume=resume, progress=self._on_event,
                                   stop=lambda: self._stop.is_set() or host_stop())
                    width = backend.text_width
            final = load_embedding(result.embedding_path, expected_width=width)
            target = save_embedding(final, ctx.path(ctx.embeddings_dir / f"{config.name}.pt"), force=True)
            ctx.on_embedding_saved(target)
            s.embedding, s.interrupted = str(target), result.interrupted
            loss = f" (loss {result.last_loss:.4f})" if result.last_loss is not None else ""
            verb = "stopped" if result.interrupted else "finished"
            s.message = (f"{verb} at step {result.steps_done}{loss}; saved {target}, usable in prompts now "
                         f"(run folder {result.run_dir})")
        except Exception as exc:  # reported to the tab / API, not lost in a thread
            s.error = str(exc) or exc.__class__.__name__
            s.message = f"failed: {s.error}"
        finally:
            s.finished_at = time.time()
            s.running = False
