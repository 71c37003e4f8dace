"""Train embedding tab: template-free Textual Inversion with a live loss plot, previews, stop, resume."""

from __future__ import annotations

import time

import gradio as gr

from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import reports_in_status, status_line


def quality_options(val_data, val_every, min_snr_gamma, ema_decay, log_with) -> dict:
    """The tab's validation / min-SNR / EMA / logging fields as :class:`TrainConfig` settings (0 or empty: off)."""
    def number(value):
        return None if value in (None, "") or float(value) == 0 else float(value)

    return dict(
        val_data=(val_data or "").strip() or None,
        val_every=int(val_every if val_every not in (None, "") else 500),
        min_snr_gamma=number(min_snr_gamma), ema_decay=number(ema_decay), log_with=log_with or "none",
    )


def size_defaults(ctx: UIContext) -> dict[str, int]:
    """Steps, resolution and the checkpoint/preview/validation intervals the tab offers for the host's model,
    told from its name without loading it: a quick run for a tiny demo model, else the paper's (the steps
    as the host's settings say)."""
    from medical_diffusion.backend.families import is_tiny_model
    from medical_diffusion.training.defaults import size_defaults as for_model

    sizes = for_model(ctx.model_id)
    if not is_tiny_model(ctx.model_id):
        sizes["steps"] = int(ctx.defaults.get("steps", sizes["steps"]))
    return sizes


def build(ctx: UIContext) -> dict:
    """Add the tab's widgets; returns its handlers (``start``, ``stop``). A run that cannot start or
    fails says why in the status line, under the loss plot and preview of that run (emptied first)."""
    from medical_diffusion.training.config import TrainConfig

    sizes = size_defaults(ctx)
    with gr.Row():
        name = gr.Textbox(label="Embedding name (lowercase; the prompt is this name alone)",
                          elem_id="md_train_name")
        data_dir = gr.Textbox(label="Training images folder (or a `meddiff prepare` output with a class)",
                              elem_id="md_train_data")
        data_class = gr.Textbox(label="Class (of a prepare output: trains on OUT/embedding/CLASS)",
                                elem_id="md_train_class")
        run_dir = gr.Textbox(label="Run folder (default: WORK/runs/NAME)", elem_id="md_train_run")
    with gr.Row():
        vectors = gr.Slider(1, 75, value=int(ctx.defaults.get("vectors", 64)), step=1, label="Vectors (paper: 64)", elem_id="md_train_vectors")
        init_text = gr.Textbox(value="*", label="Initialisation text (empty: zeros)")
        lr = gr.Textbox(value=str(ctx.defaults.get("learning_rate", "0.005")), label="Learning rate or A1111 schedule (paper: 0.005)")
    with gr.Row():
        steps = gr.Number(value=sizes["steps"], precision=0, label="Steps (paper: 50,000)",
                          elem_id="md_train_steps")
        batch = gr.Number(value=1, precision=0, label="Batch size")
        accum = gr.Number(value=1, precision=0, label="Gradient accumulation")
        seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        resolution = gr.Number(value=sizes["resolution"], precision=0,
                               label="Resolution (px; paper: 512)",
                               elem_id="md_train_resolution")
        save_every = gr.Number(value=sizes["save_every"], precision=0, label="Checkpoint every N steps")
        preview_every = gr.Number(value=sizes["preview_every"], precision=0, label="Preview every N steps (0: off)",
                                  elem_id="md_train_preview_every")
        preview_steps = gr.Number(value=20, precision=0, label="Preview sampling steps",
                                  elem_id="md_train_preview_steps")
    with gr.Row():
        latents = gr.Radio(["mean", "sample"], value="mean", label="Cached VAE latents")
        hflip = gr.Checkbox(False, label="Horizontal flips (off: anatomy has a side)")
        bucketing = gr.Checkbox(
            False, label="Aspect-ratio buckets (non-square images, e.g. chest X-rays)", elem_id="md_train_bucketing",
            info="Each image keeps its aspect: it goes to the size bucket (sides multiples of 64, 1:2 to 2:1, no "
                 "more pixels than resolution²) nearest its aspect; a batch comes from one bucket. Off: every "
                 "image is resized to resolution × resolution, as in the paper.")
        gckpt = gr.Checkbox(False, label="Gradient checkpointing (less GPU memory, slower)", elem_id="md_train_gckpt")
        resume = gr.Checkbox(False, label="Resume the run folder's last checkpoint", elem_id="md_train_resume")
    with gr.Accordion("Validation and training quality (all off: the paper's run)", open=False):
        with gr.Row():
            val_data = gr.Textbox(label="Validation images folder (empty: none; 'auto': the prepared val split)",
                                  elem_id="md_train_val_data")
            val_every = gr.Number(value=sizes["val_every"], precision=0,
                                  label="Validate every N steps (0: start and end)", elem_id="md_train_val_every")
        with gr.Row():
            min_snr = gr.Number(value=0, label="Min-SNR-gamma loss weighting (0: off; e.g. 5)",
                                elem_id="md_train_min_snr")
            ema_decay = gr.Number(value=0, label="EMA decay of the vectors (0: off; e.g. 0.999)",
                                  elem_id="md_train_ema")
            log_with = gr.Radio(["none", "tensorboard"], value="none", label="Also log with",
                                elem_id="md_train_log_with")
    with gr.Row():
        replace = gr.Checkbox(False, label="Replace a different embedding of the same name",
                              info=f"The finished embedding is published into {ctx.embeddings_dir}, where the "
                                   "other tabs find it; a different one of that name there is kept unless ticked.",
                              elem_id="md_train_replace")
    with gr.Row():
        start_btn = gr.Button("Train", variant="primary", elem_id="md_train_start")
        stop_btn = gr.Button("Stop (saves a checkpoint)", elem_id="md_train_stop")
    if ctx.device_label:
        gr.Markdown(f"Model on {ctx.device_label} (trained vectors and optimizer state in float32).",
                    elem_id="md_train_device")
    status = status_line(elem_id="md_train_status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", width=500, height=300,
                                elem_id="md_train_loss", tooltip=["step", "loss", "series"])
        preview = gr.Image(label="Latest preview", type="filepath", interactive=False, elem_id="md_train_preview")

    def config_from(n, d, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip, gc=False,
                    vd=None, ve=500, snr=0, ema=0, lw="none", bk=False, dc=""):
        return TrainConfig(
            name=(n or "").strip(), data_dir=(d or "").strip(), data_class=(dc or "").strip() or None,
            model=ctx.model_id or "webui",
            n_vectors=int(v), init="text" if (it or "").strip() else "zeros", init_text=(it or "*").strip() or "*",
            learning_rate=str(lr_).strip(), steps=int(st), batch_size=int(b), grad_accumulation=int(acc),
            seed=int(sd), resolution=int(res), save_every=int(se), preview_every=int(pe),
            preview_steps=int(ps), latents=lat, hflip=bool(flip), bucketing=bool(bk),
            gradient_checkpointing=bool(gc),
            **quality_options(vd, ve, snr, ema, lw),
        )

    def frame(points, val_points=()):
        import pandas as pd

        rows = [(s, v, "training") for s, v in points] + [(s, v, "validation") for s, v in val_points]
        return pd.DataFrame(rows or [(0, float("nan"), "training")], columns=["step", "loss", "series"])

    def status_text(state) -> str:
        """The run's message, and what it trains on under it."""
        return state.message + (f"  \nTraining on {state.data}." if state.data else "")

    # the first update empties the plot and preview, so what a failure leaves shown is this run's
    @reports_in_status(3, status=0, keep=[1, 2])
    def start(n, d, r, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip, gc, res_flag, vd, ve, snr, ema, lw,
              bk=False, dc="", replace_published=False):
        yield "Starting…", frame([]), None
        if not (d or "").strip() and not res_flag:
            raise ValueError("give the training images folder")
        config = config_from(n, d, v, it, lr_, st, b, acc, sd, res, se, pe, ps, lat, flip, gc, vd, ve, snr, ema, lw,
                             bk, dc)
        runner = ctx.trainer
        state = runner.start(config, (r or "").strip() or None, resume=bool(res_flag),
                             replace_published=bool(replace_published))
        shown = (-1, None)
        while True:
            snapshot = (len(state.losses), state.message)
            if snapshot != shown:
                shown = snapshot
                yield status_text(state), frame(list(state.losses), list(state.val_losses)), state.preview
            if not state.running:
                break
            time.sleep(0.5)
        if state.error:
            raise ValueError(state.error)
        yield status_text(state), frame(list(state.losses), list(state.val_losses)), state.preview

    def stop():
        if not ctx.trainer.running:
            return "No training run is going."
        return ctx.trainer.stop().message

    start_btn.click(start, [name, data_dir, run_dir, vectors, init_text, lr, steps, batch, accum, seed, resolution,
                            save_every, preview_every, preview_steps, latents, hflip, gckpt, resume,
                            val_data, val_every, min_snr, ema_decay, log_with, bucketing, data_class, replace],
                    [status, loss_plot, preview])
    stop_btn.click(stop, None, [status], queue=False)
    return {"start": start, "stop": stop}
