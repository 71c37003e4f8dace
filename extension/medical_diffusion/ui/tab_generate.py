"""Interpolate & compose tab: weight sliders per embedding, healthy -> diseased, grids."""

from __future__ import annotations

import logging

import gradio as gr

from medical_diffusion.errors import MedDiffError
from medical_diffusion.limits import MAX_INTERPOLATION_FRAMES, MIN_INTERPOLATION_FRAMES, check_range, check_sampling
from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import (escape_markdown, reports_in_status, saved_status, shows_errors,
                                           status_line)
from medical_diffusion.ui.stopping import StopFlag, add_stop_button

log = logging.getLogger(__name__)

#: gradio 3.41 cannot add widgets at run time: this many (embedding, weight) rows are offered
SLOTS = 4
#: the checkbox that lets a prompt without embeddings be sampled, and how a refusal points to it
ALLOW_PLAIN_LABEL = "Allow a prompt without embeddings"
PLAIN_HINT = f"tick '{ALLOW_PLAIN_LABEL}' to sample it as plain text"


def embedding_names(ctx: UIContext) -> list[str]:
    from medical_diffusion.embeddings import load_embeddings_dir

    if not ctx.embeddings_dir.is_dir():
        return []
    return sorted(load_embeddings_dir(ctx.embeddings_dir, expected_width=ctx.text_width_if_ready()))


def save_tab_result(ctx: UIContext, kind: str, picture, params: dict, **kwargs):
    """:func:`~medical_diffusion.generation.outputs.save_result` under ``ctx.work_dir`` (``kwargs``: its
    ``cells``, ``prompt``), its folder resolved by ``ctx.path`` first: a work folder (or an ``outputs``
    symlink) outside the allowed roots is refused before anything is written."""
    from medical_diffusion.generation.outputs import save_result

    return save_result(ctx.work_dir, kind, picture, params, embeddings_dir=ctx.embeddings_dir,
                       resolve_folder=lambda folder: ctx.path(folder, kind="folder", label=f"{kind} output folder"),
                       **kwargs)


def sampling_controls(ctx: UIContext | None = None) -> dict:
    """Steps, CFG, seed and size widgets shared by the generation tabs: the paper's defaults, or a quick
    look for a tiny demo model (told from ``ctx.model_id`` without loading it)."""
    from medical_diffusion.generation.sampling_defaults import sampling_defaults

    sizes = sampling_defaults(ctx.model_id if ctx is not None else "")
    with gr.Row():
        steps = gr.Slider(1, 150, value=sizes["steps"], step=1, label="Sampling steps (paper: 100)")
        cfg = gr.Slider(0, 15, value=2.0, step=0.5, label="CFG scale (paper: 2; 3 for three pathologies)")
        seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
    with gr.Row():
        width = gr.Slider(64, 1024, value=sizes["width"], step=64, label="Width")
        height = gr.Slider(64, 1024, value=sizes["height"], step=64, label="Height")
        negative = gr.Textbox(label="Negative prompt", value="")
    return dict(steps=steps, cfg=cfg, seed=seed, width=width, height=height, negative=negative)


def build(ctx: UIContext) -> dict:
    """Add the tab's widgets (images come from :func:`~medical_diffusion.ui.rendering.render_prompts`).
    Returns the parts the app links: ``last_image`` (state: ``{"cells": [image, ...]}`` of the last
    result), ``to_inpaint`` (a button), ``cell`` (which cell of a grid or strip it takes) and ``on_show`` (``(fn, outputs)`` refreshing the embedding lists when the tab is shown).

    Every result is saved under ``WORK/outputs/<image|interpolation|composition>/<date>/`` with its
    parameters (:mod:`medical_diffusion.generation.outputs`); the status line says where. A failed or
    stopped run says why in the status line, which marks the picture still shown (and still offered to
    the Inpaint tab) as an earlier run's."""
    from medical_diffusion.generation.composition import composition_stages
    from medical_diffusion.generation.interpolation import Frame, frame_label, frames_grid, interpolation_prompts
    from medical_diffusion.generation.loading import load_embedding_table, prompts_warnings, vectors_of
    from medical_diffusion.generation.outputs import Picture
    from medical_diffusion.generation.prompts import build_prompt
    from medical_diffusion.ui.rendering import render_prompts

    names = embedding_names(ctx)
    with gr.Row():
        healthy = gr.Dropdown(names, label="Healthy embedding", elem_id="md_gen_healthy")
        diseased = gr.Dropdown(names, label="Diseased embedding", elem_id="md_gen_diseased")
        t = gr.Slider(0, 1, value=0.5, step=0.05, label="Healthy → diseased", elem_id="md_gen_t")
    slot_names, slot_weights = [], []
    with gr.Accordion("Weights per embedding (composable diffusion)", open=False, elem_id="md_gen_weights"):
        for i in range(SLOTS):
            with gr.Row():
                slot_names.append(gr.Dropdown(names, label=f"Embedding {i + 1}", elem_id=f"md_gen_slot_{i + 1}"))
                slot_weights.append(gr.Slider(-1, 2, value=1.0, step=0.05, label=f"Weight {i + 1}"))
    refresh_btn = gr.Button("Refresh embeddings")
    prompt = gr.Textbox(label="Prompt (A1111 composable syntax)", lines=2, elem_id="md_gen_prompt")
    allow_plain = gr.Checkbox(False, label=ALLOW_PLAIN_LABEL, elem_id="md_gen_allow_plain",
                              info="without it, a prompt part that names none of the embeddings (a misspelt "
                                   "name) is refused before sampling")
    warnings = gr.Markdown()
    with gr.Row():
        from_slider_btn = gr.Button("Build prompt from healthy → diseased", elem_id="md_gen_build_t")
        from_slots_btn = gr.Button("Build prompt from weights")
        send_btn = gr.Button("Send to txt2img", visible=ctx.send_to_txt2img is not None, elem_id="md_gen_send")
    params = sampling_controls(ctx)
    with gr.Row():
        generate_btn = gr.Button("Generate image", variant="primary", elem_id="md_gen_generate")
        k = gr.Slider(2, 11, value=5, step=1, label="Interpolation steps K")
        grid_btn = gr.Button("Interpolation grid", variant="primary", elem_id="md_gen_grid")
        compose_btn = gr.Button("Composition strip (adds embeddings 1..n to the healthy one)")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="md_gen_stop")
    # no label: it would cover the title a grid or strip carries at its top
    result = gr.Image(label="Result", show_label=False, type="pil", interactive=False, elem_id="md_gen_result")
    status = status_line(elem_id="md_gen_status")
    # the last result's pictures for the Inpaint tab: {"cells": [image, ...]} (one for a single image, one
    # per frame of a grid or strip)
    last_image = gr.State(None)
    stop_flag = StopFlag()
    with gr.Row():
        to_inpaint = gr.Button("Inpaint the last generated image", elem_id="md_gen_to_inpaint")
        cell = gr.Number(value=1, precision=0, label="Cell of a grid or strip (1 = first)", elem_id="md_gen_cell")

    if ctx.send_to_txt2img is not None:
        ctx.send_to_txt2img(send_btn, prompt)

    def refresh():
        new = embedding_names(ctx)
        return [gr.Dropdown.update(choices=new) for _ in range(2 + SLOTS)]

    refresh_btn.click(refresh, outputs=[healthy, diseased, *slot_names])

    def checked(prompts: list[str], allow: bool) -> list[str]:
        """Refuse ``prompts`` when a part names none of the embeddings (unless ``allow``), before any
        sampling; their warnings."""
        backend = ctx.backend()
        table = vectors_of(load_embedding_table(backend, str(ctx.embeddings_dir)))
        return prompts_warnings(backend, prompts, table, allow_plain=bool(allow), plain_hint=PLAIN_HINT)

    def format_warnings(items: list[str]) -> str:
        return "\n".join(f"⚠ {escape_markdown(w)}" for w in items)

    @shows_errors
    def prompt_from_slider(h, d, tt, allow=False):
        if not h or not d:
            raise MedDiffError("choose a healthy and a diseased embedding")
        text = build_prompt([(h, 1 - float(tt)), (d, float(tt))])
        return text, format_warnings(checked([text], allow))

    @shows_errors
    def prompt_from_slots(*values):
        chosen, weights = values[:SLOTS], values[SLOTS : 2 * SLOTS]
        parts = [(n, float(w)) for n, w in zip(chosen, weights) if n]
        if not parts:
            raise MedDiffError("choose at least one embedding")
        text = build_prompt(parts)
        return text, format_warnings(checked([text], values[2 * SLOTS] if len(values) > 2 * SLOTS else False))

    from_slider_btn.click(prompt_from_slider, [healthy, diseased, t, allow_plain], [prompt, warnings])
    from_slots_btn.click(prompt_from_slots, [*slot_names, *slot_weights, allow_plain], [prompt, warnings])

    def sample_kwargs(steps, cfg, width, height, negative):
        """The sliders' values checked against the limits table (a request may send any number)."""
        return check_sampling(steps=steps, cfg_scale=cfg, width=width, height=height,
                              negative_prompt=negative or "")

    def checked_seed(seed) -> int:
        return check_sampling(seed=seed)["seed"]

    param_inputs = [params[k] for k in ("steps", "cfg", "seed", "width", "height", "negative")]

    def saved(kind: str, picture, params: dict, cells=(), prompt: str = "") -> str:
        """Save the result; the status says where (or why not: the picture is still shown)."""
        return saved_status(lambda: save_tab_result(ctx, kind, picture, params, cells=cells, prompt=prompt),
                            f"{kind} result")

    def run_params(used: int, steps, cfg, width, height, negative, **extra) -> dict:
        return dict(seed=used, **sample_kwargs(steps, cfg, width, height, negative), model=ctx.model_id, **extra)

    outputs = [result, last_image, status]
    # a failure keeps the earlier picture (the Inpaint tab may still take it) and says it is not this run's
    reports = reports_in_status(len(outputs), keep=[0, 1],
                                stale_note="A picture still shown is from an earlier run, not from these settings.")

    @reports
    def do_generate(text, steps, cfg, seed, width, height, negative, allow=False, progress=gr.Progress()):
        if not text.strip():
            raise MedDiffError("the prompt is empty: type one, or build it from embeddings")
        warn = checked([text], allow)
        with stop_flag.running(host_session=ctx.job_session, job="image") as should_stop:
            (image,), used = render_prompts(ctx, [(text, None)], seed=checked_seed(seed), progress=progress,
                                            should_stop=should_stop,
                                            **sample_kwargs(steps, cfg, width, height, negative))
        where = saved("image", image, run_params(used, steps, cfg, width, height, negative), prompt=text)
        lines = [format_warnings(warn), f"Generated {escape_markdown(text)} at seed {used}. {where}"]
        return image, {"cells": [image]}, "\n\n".join(filter(None, lines))

    @reports
    def do_grid(h, d, kk, steps, cfg, seed, width, height, negative, allow=False, progress=gr.Progress()):
        if not h or not d:
            raise MedDiffError("choose a healthy and a diseased embedding")
        kk = check_range("interpolation steps K", kk, MIN_INTERPOLATION_FRAMES, MAX_INTERPOLATION_FRAMES)
        items = interpolation_prompts(h, d, int(kk))
        warn = checked([p for _, p in items], allow)  # unknown names fail here, before any sampling
        with stop_flag.running(host_session=ctx.job_session, job="interpolation") as should_stop:
            images, used = render_prompts(ctx, [(p, None) for _, p in items], seed=checked_seed(seed),
                                          progress=progress, should_stop=should_stop,
                                          **sample_kwargs(steps, cfg, width, height, negative))
        frames = [Frame(t, p, frame_label(t), image) for (t, p), image in zip(items, images)]
        grid = frames_grid(frames, title=f"{h} \u2192 {d}, seed {used}")
        where = saved("interpolation", grid,
                      run_params(used, steps, cfg, width, height, negative, healthy=h, diseased=d, k=int(kk)),
                      cells=[Picture(f.image, f.prompt, f.label) for f in frames])
        lines = [format_warnings(warn), f"{len(frames)} frames at seed {used}. {where}"]
        return grid, {"cells": list(images)}, "\n\n".join(filter(None, lines))

    @reports
    def do_compose(h, *values, progress=gr.Progress()):
        """``h``, the slots' names and weights, the sampling parameters and (optional) ``allow_plain``."""
        slots, rest = values[: 2 * SLOTS], values[2 * SLOTS:]
        (steps, cfg, seed, width, height, negative), allow = rest[:6], rest[6] if len(rest) > 6 else False
        additions = [(n, float(w)) for n, w in zip(slots[:SLOTS], slots[SLOTS:]) if n]
        if not h:
            raise MedDiffError("choose the healthy embedding (the base of the strip)")
        stages = composition_stages(h, additions, cfg_scale=float(cfg))
        warn = checked([st.prompt for st in stages], allow)  # every name used, before any sampling
        kwargs = {k: v for k, v in sample_kwargs(steps, cfg, width, height, negative).items() if k != "cfg_scale"}
        with stop_flag.running(host_session=ctx.job_session, job="composition") as should_stop:
            images, used = render_prompts(ctx, [(st.prompt, st.cfg_scale) for st in stages], seed=checked_seed(seed),
                                          progress=progress, should_stop=should_stop, **kwargs)
        frames = [Frame(float(j), st.prompt, f"{st.label}, cfg {st.cfg_scale:g}", image)
                  for j, (st, image) in enumerate(zip(stages, images))]
        strip = frames_grid(frames, title=f"composition, seed {used}")
        where = saved("composition", strip,
                      run_params(used, steps, cfg, width, height, negative, base=h, additions=additions),
                      cells=[Picture(f.image, st.prompt, f.label, st.cfg_scale) for f, st in zip(frames, stages)])
        prompts = "\n".join(f"- {escape_markdown(f.prompt)}" for f in frames)
        return strip, {"cells": list(images)}, "\n\n".join(filter(None, [format_warnings(warn), prompts, where]))

    events = [
        generate_btn.click(do_generate, [prompt, *param_inputs, allow_plain], outputs),
        grid_btn.click(do_grid, [healthy, diseased, k, *param_inputs, allow_plain], outputs),
        compose_btn.click(do_compose, [healthy, *slot_names, *slot_weights, *param_inputs, allow_plain], outputs),
    ]
    add_stop_button(stop_btn, stop_flag, events, status)
    return {"last_image": last_image, "to_inpaint": to_inpaint, "cell": cell,
            "on_show": (refresh, [healthy, diseased, *slot_names]),
            "generate": do_generate, "grid": do_grid, "compose": do_compose, "stop": stop_flag}
