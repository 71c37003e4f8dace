"""What the tabs need from their host: a model, folders, path policy, a lock for long work."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from medical_diffusion.allowed_roots import resolve_user_path
from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.devices import Runtime, resolve_device
from medical_diffusion.ui.training_runner import TrainingRunner


@dataclass
class UIContext:
    """Host services for the tabs.

    ``backend_factory`` builds the model on first use (cached); ``work_dir`` is where tabs write
    by default; ``embeddings_dir`` is where trained or blended embeddings are saved and listed.
    """

    backend_factory: Callable[[], ModelBackend]
    work_dir: Path
    embeddings_dir: Path
    model_label: str = ""
    #: how the model is named in run configs (a path, "tiny", or the webui checkpoint)
    model_id: str = ""
    #: defaults the host's settings give the tabs: ``vectors``, ``learning_rate``, ``steps``,
    #: ``inception_weights``, ``radimagenet_weights``, ``resnet18_weights``
    defaults: dict = field(default_factory=dict)
    #: the host's own image generation, when it has one (the webui: ``modules.processing``):
    #: ``txt2img(prompt, negative_prompt=, seed=, steps=, cfg_scale=, width=, height=) -> [image]`` and
    #: ``inpaint(image, mask, prompt, ...) -> image``; None: the core sampler on :meth:`backend`
    txt2img: Callable | None = None
    inpaint: Callable | None = None
    #: ``send_to_txt2img(button, prompt_box)``: wire a button that puts the prompt into the host's txt2img
    send_to_txt2img: Callable | None = None
    #: ``send_to_inpaint(button, fn, inputs)``: wire a button whose ``fn(*inputs) -> (image, mask)`` fills the
    #: host's img2img "Inpaint upload" tab (the webui); None: the tab only inpaints locally
    send_to_inpaint: Callable | None = None
    #: called after an embedding file is written (the webui reloads its embedding database)
    on_embedding_saved: Callable[[Path], None] = lambda path: None
    #: lock held around model work (the webui's queue lock; a plain lock standalone)
    work_lock: Callable[[], ContextManager] = field(default=None)  # type: ignore[assignment]
    #: keep the first backend (standalone); the webui builds one per use since the user may switch models
    cache_backend: bool = True
    #: ``training_session(job_name, steps)``: a context manager around a training run that yields an
    #: extra stop flag (the webui: undo cross-attention optimisations, drive ``shared.state``)
    training_session: Callable[[str, int], ContextManager[Callable[[], bool]]] = field(default=None)  # type: ignore[assignment]
    #: the text width of the model when one is loaded, without loading one (None: not loaded yet);
    #: unset: the width of :meth:`backend` (standalone, where building the model at start is fine)
    loaded_text_width: Callable[[], int | None] | None = None
    #: device, weight dtype and attention the host's model runs with (None: the host decides, e.g. the webui)
    runtime: Runtime | None = None
    #: where FID and the classifier run when the host says (the webui: its ``modules.devices.device``); None: runtime's
    evaluation_device: Callable[[], object] | None = None
    #: called with each training step's event (the webui: its progress bar and status text)
    on_training_step: Callable[[object], None] = lambda event: None
    #: ``job_session(job_name)``: a context manager around a tab's long job (FID, classifier) that yields the
    #: host's own stop flag (the webui: its Interrupt button, read from ``shared.state``); None: no such flag
    job_session: Callable[[str], ContextManager[Callable[[], bool]]] | None = None
    _backend: ModelBackend | None = field(default=None, init=False, repr=False)
    _trainer: TrainingRunner | None = field(default=None, init=False, repr=False)
    _backend_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.embeddings_dir = Path(self.embeddings_dir)
        if self.work_lock is None:
            lock = threading.Lock()
            self.work_lock = lambda: lock
        if self.training_session is None:
            self.training_session = lambda job, steps: contextlib.nullcontext(lambda: False)

    def backend(self) -> ModelBackend:
        if not self.cache_backend:
            return self.backend_factory()
        with self._backend_lock:
            if self._backend is None:
                self._backend = self.backend_factory()
            return self._backend

    @property
    def device_label(self) -> str:
        """``cuda (GPU, GiB), weights float16`` for the tabs (empty when the host decides)."""
        if self.runtime is None:
            return ""
        try:
            return self.runtime.describe()
        except Exception:  # describing a CUDA device that went away must not break a tab
            return str(self.runtime.device)

    def text_width_if_ready(self) -> int | None:
        """The model's text width, or None while the host has no model yet (the webui at start-up:
        the tabs are built before its checkpoint has loaded, and must not wait for it or fail)."""
        if self.loaded_text_width is not None:
            return self.loaded_text_width()
        return self.backend().text_width

    @property
    def trainer(self) -> TrainingRunner:
        """The one :class:`~medical_diffusion.ui.training_runner.TrainingRunner` of this host."""
        with self._backend_lock:
            if self._trainer is None:
                self._trainer = TrainingRunner(self)
            return self._trainer

    def path(self, value: str | os.PathLike, *, must_exist: bool = False, kind: str = "path",
             label: str = "path") -> Path:
        """A user-typed path through :func:`~medical_diffusion.allowed_roots.resolve_user_path`
        (relative paths: under ``work_dir``; empty: an error)."""
        return resolve_user_path(value, must_exist=must_exist, kind=kind, label=label, base=self.work_dir)

    @contextlib.contextmanager
    def model_work(self):
        """Hold the host's lock while the model is in use."""
        with self.work_lock():
            yield self.backend()


def evaluation_device(ctx: UIContext) -> torch.device:
    """Where this host's evaluation networks run: the host's evaluation device (the webui's
    ``modules.devices.device``), else its model's runtime device, else ``auto``."""
    if ctx.evaluation_device is not None:
        return resolve_device(ctx.evaluation_device())
    if ctx.runtime is not None:
        return ctx.runtime.device
    return resolve_device("auto")
