"""The Medical Diffusion top-level tab inside the webui (``on_ui_tabs``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path


def forget_cached_conditioning() -> None:
    """Drop A1111's cached prompt conditioning so a retrained embedding takes effect (A1111 #11993)."""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]


def reload_embeddings(_path: Path | None = None) -> None:
    """Make a newly written embedding usable in txt2img at once."""
    from modules import sd_hijack

    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    forget_cached_conditioning()


def bind_send_to_txt2img(button, prompt_box) -> None:
    from modules import infotext_utils

    infotext_utils.register_paste_params_button(
        infotext_utils.ParamBinding(paste_button=button, tabname="txt2img", source_text_component=prompt_box)
    )


@contextlib.contextmanager
def training_session(job: str, steps: int):
    """Around a training run in the webui: no cross-attention optimisations (they give weak
    embeddings, A1111 #6483/#7618), the webui's progress state, its Interrupt button as a stop flag."""
    from modules import sd_hijack, shared

    shared.state.begin(job="medical-diffusion-train")
    shared.state.job_count = steps
    shared.state.textinfo = job
    apply_optimizations = getattr(shared.opts, "training_xattention_optimizations", False)
    if not apply_optimizations:
        sd_hijack.undo_optimizations()
    try:
        yield lambda: bool(shared.state.interrupted)
    finally:
        if not apply_optimizations:
            sd_hijack.apply_optimizations()
        shared.state.end()
        forget_cached_conditioning()


@contextlib.contextmanager
def job_session(job: str):
    """Around a long job of the tabs (FID, classifier, a grid): the webui's Interrupt button as a stop
    flag. The webui's state is only read, never begun or ended (an FID run may overlap the webui's own
    txt2img, whose progress it must not reset), so an Interrupt still set from before the job counts
    only once a webui job has cleared it."""
    from modules import shared

    state = shared.state
    stale = [bool(state.interrupted)]

    def interrupted() -> bool:
        now = bool(state.interrupted)
        if stale[0] and not now:  # cleared by a job's begin() since: a later press is new
            stale[0] = False
        return now and not stale[0]

    yield interrupted


class SettingsDefaults(Mapping):
    """The tabs' defaults read from the webui's settings at each use, so a changed setting applies
    without a UI reload (an empty weights box uses the current setting)."""

    #: UIContext.defaults key -> webui option (declared with its default in ``callbacks.SETTINGS``)
    KEYS = {"vectors": "medical_diffusion_default_vectors", "learning_rate": "medical_diffusion_default_lr",
            "steps": "medical_diffusion_default_steps", "inception_weights": "medical_diffusion_inception_weights",
            "radimagenet_weights": "medical_diffusion_radimagenet_weights",
            "resnet18_weights": "medical_diffusion_resnet18_weights"}

    def __getitem__(self, key: str):
        from modules import shared

        from medical_diffusion.webui.callbacks import SETTINGS

        option = self.KEYS[key]
        fallback = next(default for name, default, _ in SETTINGS if name == option)
        return getattr(shared.opts, option, fallback)

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


def report_training_step(event) -> None:
    """The webui's progress bar and status line follow a training run (as its own TI training does)."""
    from modules import shared

    if getattr(event, "validation_only", False):
        return
    shared.state.job_no = event.step
    shared.state.textinfo = f"Medical Diffusion: step {event.step}/{event.total}, loss {event.loss:.4f}"


def loaded_text_width() -> int | None:
    """The loaded checkpoint's text width as A1111's ``EmbeddingDatabase.get_expected_shape`` reads it
    (SDXL: 768 + 1280 = 2048, which the embedding lists match to clip_l/clip_g pair files), or None
    while none is loaded or the model has no A1111 text encoder (never starts a load)."""
    from modules import sd_models

    model = sd_models.model_data.sd_model
    encode = getattr(getattr(model, "cond_stage_model", None), "encode_embedding_init_text", None)
    if encode is None:
        return None
    return int(encode(",", 1).shape[-1])


def webui_device():
    """The webui's torch device (``modules.devices.device``), read when evaluation starts."""
    from modules import devices

    return devices.device


def make_context():
    from modules import call_queue, shared

    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.webui import generation, inpaint_upload
    from medical_diffusion.webui.backend import WebuiBackend

    def opt(key, default=""):
        return getattr(shared.opts, f"medical_diffusion_{key}", default)

    work_dir = opt("data_dir") or Path(shared.data_path) / "medical_diffusion"
    return UIContext(
        backend_factory=WebuiBackend,
        work_dir=Path(work_dir),
        embeddings_dir=Path(shared.cmd_opts.embeddings_dir),
        model_label="",
        on_embedding_saved=reload_embeddings,
        work_lock=lambda: call_queue.queue_lock,
        cache_backend=False,
        training_session=training_session,
        job_session=job_session,
        on_training_step=report_training_step,
        loaded_text_width=loaded_text_width,
        model_id="webui",
        txt2img=generation.txt2img,
        inpaint=generation.inpaint,
        send_to_txt2img=bind_send_to_txt2img,
        send_to_inpaint=inpaint_upload.bind,
        defaults=SettingsDefaults(),
        evaluation_device=webui_device,  # FID and the classifier run where the webui runs its model
    )


_CONTEXT = None


def shared_context():
    """One context per webui process, so the tab and the API see the same training run."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = make_context()
    return _CONTEXT


def on_ui_tabs():
    from medical_diffusion.ui.app import build_blocks

    blocks = build_blocks(shared_context())
    return [(blocks, "Medical Diffusion", "medical_diffusion")]
