"""Train embedding tab: template-free Textual Inversion with a live loss plot, previews, stop, resume."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import gradio as gr

from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import shows_errors


class TrainingJob:
    """One training run in a background thread; the tab polls its events."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.result = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def build(ctx: UIContext) -> None:
    from medical_diffusion.embeddings import load_embedding, save_embedding
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    job_holder: dict[str, TrainingJob] = {}

    with gr.Row():
        name = gr.Textbox(label="Embedding name (lowercase; the prompt is this name alone)",
                          elem_id="md_train_name")
        data_dir = gr.Textbox(label="Training images folder", elem_id="md_train_data")
        run_dir = gr.Textbox(label="Run folder (default: WORK/runs/NAME)", elem_id="md_train_run")
    with gr.Row():
        vectors = gr.Slider(1, 75, value=64, step=1, label="Vectors (paper: 64)", elem_id="md_train_vectors")
        init_text = gr.Textbox(value="*", label="Initialisation text (empty: zeros)")
        lr = gr.Textbox(value="0.005", label="Learning rate or A1111 schedule (paper: 0.005)")
    with gr.Row():
        steps = gr.Number(value=50000, precision=0, label="Steps (paper: 50,000)", elem_id="md_train_steps")
        batch = gr.Number(value=1, precision=0, label="Batch size")
        accum = gr.Number(value=1, precision=0, label="Gradient accumulation")
        seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        resolution = gr.Number(value=512, precision=0, label="Resolution (px)", elem_id="md_train_resolution")
        save_every = gr.Number(value=500, precision=0, label="Checkpoint every N steps")
        preview_every = gr.Number(value=500, precision=0, label="Preview every N steps (0: off)",
                                  elem_id="md_train_preview_every")
        preview_steps = gr.Number(value=20, precision=0, label="Preview sampling steps",
                                  elem_id="md_train_preview_steps")
    with gr.Row():
        latents = gr.Radio(["mean", "sample"], value="mean", label="Cached VAE latents")
        hflip = gr.Checkbox(False, label="Horizontal flips (off: anatomy has a side)")
        resume = gr.Checkbox(False, label="Resume the run folder's last checkpoint", elem_id="md_train_resume")
    with gr.Row():
        start_btn = gr.Button("Train", variant="primary", elem_id="md_train_start")
        stop_btn = gr.Button("Stop (saves a checkpoint)", elem_id="md_train_stop")
    status = gr.Markdown(elem_id="md_train_status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", width=500, height=300,
                                elem_id="md_train_loss", tooltip=["step", "loss"])
        preview = gr.Image(label="Latest preview", type="filepath", interactive=False, elem_id="md_train_preview")

    def config_from(n, d, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip):
        return TrainConfig(
            name=(n or "").strip(), data_dir=str(ctx.path(d, must_exist=True)) if d else "", model=ctx.model_id or "webui",
            n_vectors=int(v), init="text" if (it or "").strip() else "zeros", init_text=(it or "*").strip() or "*",
            learning_rate=str(lr_).strip(), steps=int(st), batch_size=int(b), grad_accumulation=int(acc),
            seed=int(sd), resolution=int(res), save_every=int(se), preview_every=int(pe),
            preview_steps=int(ps), latents=lat, hflip=bool(flip),
        )

    def frame(points):
        import pandas as pd

        return pd.DataFrame(points or [(0, float("nan"))], columns=["step", "loss"])

    @shows_errors
    def start(n, d, r, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip, res_flag):
        old = job_holder.get("job")
        if old is not None and old.running:
            raise ValueError("a training run is already going; stop it first")
        if not (d or "").strip() and not res_flag:
            raise ValueError("give the training images folder")
        config = config_from(n, d, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip).validate()
        folder = ctx.path(r) if (r or "").strip() else ctx.path(ctx.work_dir / "runs" / config.name)
        job = TrainingJob()
        job_holder["job"] = job

        def work():
            try:
                with ctx.training_session(f"train {config.name}", config.steps) as host_stop:
                    with ctx.model_work() as backend:
                        job.result = train(config, backend, folder, resume=bool(res_flag), force=False,
                                           progress=job.events.put,
                                           stop=lambda: job.stop_requested.is_set() or host_stop())
                final = load_embedding(job.result.embedding_path, expected_width=ctx.backend().text_width)
                target = save_embedding(final, ctx.path(ctx.embeddings_dir / f"{config.name}.pt"), force=True)
                ctx.on_embedding_saved(target)
                job.events.put(("saved", target))
            except BaseException as exc:  # reported in the tab, not lost in a thread
                job.error = exc
            finally:
                job.events.put(None)

        job.thread = threading.Thread(target=work, name=f"meddiff-train-{config.name}", daemon=True)
        job.thread.start()

        points, last_preview, text = [], None, f"Starting `{config.name}` in `{folder}`…"
        yield text, frame(points), last_preview
        finished = False
        while not finished:
            time.sleep(0.5)
            changed = False
            while True:
                try:
                    event = job.events.get_nowait()
                except queue.Empty:
                    break
                changed = True
                if event is None:
                    finished = True
                    break
                if isinstance(event, tuple):
                    text = f"Saved the embedding to `{event[1]}`; it is usable in prompts now."
                    continue
                points.append((event.step, event.loss))
                if event.preview is not None:
                    last_preview = str(event.preview)
                eta = f", ETA {event.eta_seconds:.0f} s" if event.eta_seconds is not None else ""
                text = f"step {event.step}/{event.total}, loss {event.loss:.4f}, lr {event.lr:g}{eta}"
            if changed:
                yield text, frame(points), last_preview
        if job.error is not None:
            raise job.error if isinstance(job.error, Exception) else RuntimeError(str(job.error))
        res_ = job.result
        verb = "Stopped" if res_.interrupted else "Finished"
        loss_text = f" (loss {res_.last_loss:.4f})" if res_.last_loss is not None else ""
        yield (f"{verb} at step {res_.steps_done}{loss_text}. Checkpoint: `{res_.embedding_path}`. {text}",
               frame(points), last_preview)

    def stop():
        job = job_holder.get("job")
        if job is None or not job.running:
            return "No training run is going."
        job.stop_requested.set()
        return "Stopping after this step; a checkpoint will be saved…"

    start_btn.click(start, [name, data_dir, run_dir, vectors, init_text, lr, steps, batch, accum, seed, resolution,
                            save_every, preview_every, preview_steps, latents, hflip, resume],
                    [status, loss_plot, preview])
    stop_btn.click(stop, None, [status], queue=False)
