"""One training run at a time in a background thread, shared by the Train tab and the API.

It needs only the few host services of :class:`TrainingHost` (which
:class:`~medical_diffusion.ui.context.UIContext` provides), so it imports nothing from the UI: the
context holds the one runner of its host (``ctx.trainer``), not the other way round.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

from medical_diffusion.errors import MedDiffError
from medical_diffusion.training.progress import format_duration

#: how the tab and the API replace a different embedding of the same name, in refusals
REPLACE_HINT = ("use another name, or tick 'Replace a different embedding of the same name' in the Train tab "
                "(API: send \"replace_published\": true), or remove that file")


class TrainingHost(Protocol):
    """What a run needs from its host (:class:`~medical_diffusion.ui.context.UIContext`)."""

    work_dir: Path
    embeddings_dir: Path
    training_session: Callable[[str, int], ContextManager[Callable[[], bool]]]
    on_training_step: Callable[[object], None]
    on_embedding_saved: Callable[[Path], None]

    def path(self, value: str | os.PathLike, *, must_exist: bool = False, kind: str = "path",
             label: str = "path") -> Path: ...

    def model_work(self) -> ContextManager: ...


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
    it_per_s: float | None = None  # training steps per second (previews and checkpoints excluded)
    device: str = ""  # where the model runs, e.g. "cuda (NVIDIA ..., 8.0 GiB), weights float16"
    preview: str | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: with validation: the last validation loss, best.pt's step and loss, and every (step, val loss)
    val_loss: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    best: str | None = None  # best.pt in the run folder, once finished
    ema: str | None = None  # <name>-ema.pt in the run folder, once finished
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    #: what it trains on: ``100 images from /abs/OUT/embedding/neg``
    data: str = ""
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
            d.pop("val_losses")
        return d


class TrainingRunner:
    """Start, stop and watch a training run; the final embedding is published into ``ctx.embeddings_dir``."""

    def __init__(self, ctx: TrainingHost):
        self.ctx = ctx
        self.state = RunState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config, run_dir: str | Path | None = None, resume: bool = False,
              replace_published: bool = False) -> RunState:
        """Validate ``config`` (a :class:`TrainConfig` or a dict of its fields) and start it; raise if a
        run is going. Every path goes through the allowed-roots resolver; ``resume`` keeps the run's
        own name, vectors, data ... (:func:`~medical_diffusion.training.run_folder.resume_config`).
        ``replace_published``: the final embedding may replace a different one of its name in
        ``ctx.embeddings_dir`` (otherwise that is refused, before training)."""
        from medical_diffusion.training.data_folder import training_images

        config, folder = self.prepare(config, run_dir, resume, replace_published)
        data = training_images(config.data_dir).describe()
        with self._lock:
            if self.running:
                raise MedDiffError(f"a training run ({self.state.name}) is already going; stop it first")
            self._stop.clear()
            self.state = RunState(name=config.name, run_dir=str(folder), running=True, total=config.steps,
                                  data=data, message=f"starting {config.name} in {folder}: training on {data}",
                                  started_at=time.time())
            self._thread = threading.Thread(target=self._work, args=(config, folder, resume, replace_published),
                                            name=f"meddiff-train-{config.name}", daemon=True)
            self._thread.start()
        return self.state

    def _training_folder(self, data_dir, data_class) -> Path:
        """The folder of training images ``data_dir`` (a class of a prepare output) means, inside the roots."""
        from medical_diffusion.training.data_folder import resolve_data_folder

        ctx = self.ctx
        root = ctx.path(data_dir, must_exist=True, kind="folder", label="training images folder")
        return ctx.path(resolve_data_folder(root, data_class), must_exist=True, kind="folder",
                        label="training images folder")

    def prepare(self, config, run_dir: str | Path | None = None, resume: bool = False,
                replace_published: bool = False):
        """``(config, run folder)`` of a run about to start, checked; raises :class:`MedDiffError`.
        The config names the folder of training images itself (a prepare output's class resolved)."""
        from medical_diffusion.training.config import CONFIG_FILE, TrainConfig
        from medical_diffusion.training.publish import check_publishable
        from medical_diffusion.training.run_folder import resume_config

        ctx = self.ctx
        requested = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
        if resume and isinstance(requested.get("data_dir"), str) and requested["data_dir"].strip():
            requested["data_dir"] = str(self._training_folder(requested["data_dir"], requested.get("data_class")))
            requested["data_class"] = None
        if run_dir is not None and not isinstance(run_dir, (str, Path)):
            raise MedDiffError(f"run folder must be a path, got {type(run_dir).__name__}")
        if run_dir is not None and str(run_dir).strip():
            folder = ctx.path(run_dir, kind="folder", label="run folder")
        else:
            name = requested.get("name")
            if not isinstance(name, str) or not name.strip():
                raise MedDiffError("give the embedding name (or the run folder)")
            folder = ctx.path(ctx.work_dir / "runs" / name, kind="folder", label="run folder")
        if resume:
            if not (folder / CONFIG_FILE).is_file():
                raise MedDiffError(f"{folder}: no training run to resume here ({CONFIG_FILE} is missing)")
            config = resume_config(folder, requested)
        else:
            config = TrainConfig.from_dict(requested)
        config.validate()
        from medical_diffusion.training.tb_logging import check_log_with

        check_log_with(config.log_with)
        config.data_dir, config.data_class = str(self._training_folder(config.data_dir, config.data_class)), None
        if config.mask not in (None, "alpha"):
            config.mask = str(ctx.path(config.mask, must_exist=True, kind="folder", label="mask folder"))
        if config.val_data is not None and config.val_data.strip().lower() != "auto":
            from medical_diffusion.training.data_folder import resolve_data_folder

            val = ctx.path(config.val_data, must_exist=True, kind="folder", label="validation images folder")
            config.val_data = str(resolve_data_folder(val, what="validation", flag="validation folder"))
        if config.template_file is not None:
            config.template_file = str(ctx.path(config.template_file, must_exist=True, kind="file",
                                                label="template file"))
        check_publishable(ctx.embeddings_dir, config.name, folder, force=replace_published, hint=REPLACE_HINT)
        return config, folder

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
        if getattr(event, "validation_only", False):  # step 0: the untrained vectors' validation loss
            s.val_loss, s.best_step, s.best_val_loss = event.val_loss, event.best_step, event.best_val_loss
            s.val_losses.append((event.step, event.val_loss))
            s.message = f"step 0/{event.total}: validation loss {event.val_loss:.4f} before training"
            return
        s.step, s.total, s.loss, s.lr, s.eta_seconds = event.step, event.total, event.loss, event.lr, event.eta_seconds
        s.it_per_s = getattr(event, "it_per_s", None)
        s.losses.append((event.step, event.loss))
        if getattr(event, "val_loss", None) is not None:
            s.val_loss, s.best_step, s.best_val_loss = event.val_loss, event.best_step, event.best_val_loss
            s.val_losses.append((event.step, event.val_loss))
        if event.preview is not None:
            s.preview = str(event.preview)
        eta = f", ETA {format_duration(event.eta_seconds)}" if event.eta_seconds is not None else ""
        speed = f", {s.it_per_s:.2f} it/s" if s.it_per_s else ""
        s.message = (f"step {event.step}/{event.total}, loss {event.loss:.4f}{_val_text(s)}, lr {event.lr:g}"
                     f"{speed}{eta}")
        self.ctx.on_training_step(event)

    def _work(self, config, folder: Path, resume: bool, replace_published: bool = False) -> None:
        from medical_diffusion.training.loop import train
        from medical_diffusion.training.publish import publish_embedding

        ctx, s = self.ctx, self.state
        try:
            with ctx.training_session(f"train {config.name}", config.steps) as host_stop:
                with ctx.model_work() as backend:
                    s.device = _describe_backend(backend)
                    result = train(config, backend, folder, resume=resume, progress=self._on_event,
                                   stop=lambda: self._stop.is_set() or host_stop())
            # the run's file in its family's format (SDXL: clip_l + clip_g .safetensors), copied as it is
            ctx.path(ctx.embeddings_dir / result.embedding_path.name)  # the home is inside the allowed roots
            target = publish_embedding(result.embedding_path, ctx.embeddings_dir, config.name, result.run_dir,
                                       force=replace_published, hint=REPLACE_HINT)
            ctx.on_embedding_saved(target)
            s.embedding, s.interrupted = str(target), result.interrupted
            loss = f" (loss {result.last_loss:.4f})" if result.last_loss is not None else ""
            verb = "stopped" if result.interrupted else "finished"
            extras = ""
            if result.best_path is not None:
                s.best, s.best_step, s.best_val_loss = str(result.best_path), result.best_step, result.best_val_loss
                extras += (f"; best validation loss {result.best_val_loss:.4f} at step {result.best_step} "
                           f"in {result.best_path}")
            if result.ema_path is not None:
                s.ema = str(result.ema_path)
                extras += f"; EMA in {result.ema_path}"
            s.message = (f"{verb} at step {result.steps_done}{loss}; saved {target}, usable in prompts now "
                         f"(run folder {result.run_dir}){extras}")
        except Exception as exc:  # reported to the tab / API, not lost in a thread
            s.error = str(exc) or exc.__class__.__name__
            s.message = f"failed: {s.error}"
        finally:
            s.finished_at = time.time()
            s.running = False


def _val_text(s: RunState) -> str:
    """``, val 0.1234 (best 0.1200 at step 500)`` once a validation ran, else empty."""
    if s.val_loss is None:
        return ""
    best = f" (best {s.best_val_loss:.4f} at step {s.best_step})" if s.best_step is not None else ""
    return f", val {s.val_loss:.4f}{best}"


def _describe_backend(backend) -> str:
    """``cuda (GPU name, GiB), weights float16`` for the status (empty when it cannot be told)."""
    from medical_diffusion.devices import describe

    try:
        return describe(backend.device, getattr(backend, "dtype", None))
    except Exception:  # a fake or half-built backend: the status goes on without it
        return str(getattr(backend, "device", ""))
