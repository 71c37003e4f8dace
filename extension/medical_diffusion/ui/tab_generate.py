"""Interpolate & compose tab: weight sliders per embedding, healthy -> diseased, grids."""

from __future__ import annotations

import gradio as gr

from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import shows_errors

#: gradio 3.41 cannot add widgets at run time: this many (embedding, weight) rows are offered
SLOTS = 4


def embedding_names(ctx: UIContext) -> list[str]:
    from medical_diffusion.embeddings import load_embeddings_dir

    if not ctx.embeddings_dir.is_dir():
        return []
    return sorted(load_embeddings_dir(ctx.embeddings_dir, expected_width=ctx.text_width_if_ready()))


def sampling_controls() -> dict:
    """Steps, CFG, seed and size widgets shared by the generation tabs (paper defaults)."""
    with gr.Row():
        steps = gr.Slider(1, 150, value=100, step=1, label="Sampling steps (paper: 100)")
        cfg = gr.Slider(0, 15, value=2.0, step=0.5, label="CFG scale (paper: 2; 3 for three pathologies)")
        seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
    with gr.Row():
        width = gr.Slider(64, 1024, value=512, step=64, label="Width")
        height = gr.Slider(64, 1024, value=512, step=64, label="Height")
        negative = gr.Textbox(label="Negative prompt", value="")
    return dict(steps=steps, cfg=cfg, seed=seed, width=width, height=height, negative=negative)


def build(ctx: UIContext) -> dict:
    """Add the tab's widgets (images come from :func:`~medical_diffusion.ui.rendering.render_prompts`).
    Returns the parts the app links: ``last_image`` (state: ``{"cells": [image, ...]}`` of the last
    result), ``to_inpaint`` (a button), ``cell`` (which cell of a grid or strip it takes) and ``on_show`` (``(fn, outputs)`` refreshing the embedding lists when the tab is shown)."""
    from medical_diffusion.generation.composition import composition_stages
    from medical_diffusion.generation.interpolation import Frame, frame_label, frames_grid, interpolation_prompts
    from medical_diffusion.generation.loading import load_embedding_table, prompt_warnings, vectors_of
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
    warnings = gr.Markdown()
    with gr.Row():
        from_slider_btn = gr.Button("Build prompt from healthy → diseased", elem_id="md_gen_build_t")
        from_slots_btn = gr.Button("Build prompt from weights")
        send_btn = gr.Button("Send to txt2img", visible=ctx.send_to_txt2img is not None, elem_id="md_gen_send")
    params = sampling_controls()
    with gr.Row():
        generate_btn = gr.Button("Generate image", variant="primary", elem_id="md_gen_generate")
        k = gr.Slider(2, 11, value=5, step=1, label="Interpolation steps K")
        grid_btn = gr.Button("Interpolation grid", variant="primary", elem_id="md_gen_grid")
        compose_btn = gr.Button("Composition strip (adds embeddings 1..n to the healthy one)")
    # no label: it would cover the title a grid or strip carries at its top
    result = gr.Image(label="Result", show_label=False, type="pil", interactive=False, elem_id="md_gen_result")
    status = gr.Markdown(elem_id="md_gen_status")
    # the last result's pictures for the Inpaint tab: {"cells": [image, ...]} (one for a single image, one
    # per frame of a grid or strip)
    last_image = gr.State(None)
    pending = gr.State(None)  # a finished result, shown only once its handler succeeded
    with gr.Row():
        to_inpaint = gr.Button("Inpaint the last generated image", elem_id="md_gen_to_inpaint")
        cell = gr.Number(value=1, precision=0, label="Cell of a grid or strip (1 = first)", elem_id="md_gen_cell")

    if ctx.send_to_txt2img is not None:
        ctx.send_to_txt2img(send_btn, prompt)

    def refresh():
        new = embedding_names(ctx)
        return [gr.Dropdown.update(choices=new) for _ in range(2 + SLOTS)]

    refresh_btn.click(refresh, outputs=[healthy, diseased, *slot_names])

    def table_and_warnings(text: str):
        backend = ctx.backend()
        table = vectors_of(load_embedding_table(backend, str(ctx.embeddings_dir)))
        return table, prompt_warnings(backend, text, table)

    def format_warnings(items: list[str]) -> str:
        return "\n".join(f"⚠ {w}" for w in items)

    @shows_errors
    def prompt_from_slider(h, d, tt):
        if not h or not d:
            raise ValueError("choose a healthy and a diseased embedding")
        text = build_prompt([(h, 1 - float(tt)), (d, float(tt))])
        return text, format_warnings(table_and_warnings(text)[1])

    @shows_errors
    def prompt_from_slots(*values):
        parts = [(n, float(w)) for n, w in zip(values[:SLOTS], values[SLOTS:]) if n]
        if not parts:
            raise ValueError("choose at least one embedding")
        text = build_prompt(parts)
        return text, format_warnings(table_and_warnings(text)[1])

    from_slider_btn.click(prompt_from_slider, [healthy, diseased, t], [prompt, warnings])
    from_slots_btn.click(prompt_from_slots, [*slot_names, *slot_weights], [prompt, warnings])

    def sample_kwargs(steps, cfg, width, height, negative):
        return dict(steps=int(steps), cfg_scale=float(cfg), width=int(width), height=int(height),
                    negative_prompt=negative or "")

    param_inputs = [params[k] for k in ("steps", "cfg", "seed", "width", "height", "negative")]

    @shows_errors
    def do_generate(text, steps, cfg, seed, width, height, negative, progress=gr.Progress()):
        if not text.strip():
            raise ValueError("the prompt is empty")
        _, warn = table_and_warnings(text)
        (image,), used = render_prompts(ctx, [(text, None)], seed=int(seed), progress=progress,
                                        **sample_kwargs(steps, cfg, width, height, negative))
        return {"picture": image, "cells": [image]}, format_warnings(warn) or f"Generated `{text}` at seed {used}."

    @shows_errors
    def do_grid(h, d, kk, steps, cfg, seed, width, height, negative, progress=gr.Progress()):
        if not h or not d:
            raise ValueError("choose a healthy and a diseased embedding")
        table_and_warnings(h)  # unknown names fail here, before any sampling
        items = interpolation_prompts(h, d, int(kk))
        images, used = render_prompts(ctx, [(p, None) for _, p in items], seed=int(seed),
                                      progress=progress,
                                      **sample_kwargs(steps, cfg, width, height, negative))
        frames = [Frame(t, p, frame_label(t), image) for (t, p), image in zip(items, images)]
        grid = frames_grid(frames, title=f"{h} → {d}, seed {used}")
        return {"picture": grid, "cells": list(images)}, f"{len(frames)} frames at seed {used}."

    @shows_errors
    def do_compose(h, *values, progress=gr.Progress()):
        slots, (steps, cfg, seed, width, height, negative) = values[: 2 * SLOTS], values[2 * SLOTS:]
        additions = [(n, float(w)) for n, w in zip(slots[:SLOTS], slots[SLOTS:]) if n]
        if not h:
            raise ValueError("choose the healthy embedding (the base of the strip)")
        table_and_warnings(h)
        stages = composition_stages(h, additions, cfg_scale=float(cfg))
        kwargs = {k: v for k, v in sample_kwargs(steps, cfg, width, height, negative).items() if k != "cfg_scale"}
        images, used = render_prompts(ctx, [(st.prompt, st.cfg_scale) for st in stages], seed=int(seed),
                                      progress=progress, **kwargs)
        frames = [Frame(float(j), st.prompt, f"{st.label}, cfg {st.cfg_scale:g}", image)
                  for j, (st, image) in enumerate(zip(stages, images))]
        strip = frames_grid(frames, title=f"composition, seed {used}")
        return {"picture": strip, "cells": list(images)}, "\n".join(f.prompt for f in frames)

    def show(done):
        return done["picture"], {"cells": done["cells"]}

    # a failed run leaves the shown picture as it was: the picture is updated only after success
    generate_btn.click(do_generate, [prompt, *param_inputs], [pending, status]).success(
        show, [pending], [result, last_image])
    grid_btn.click(do_grid, [healthy, diseased, k, *param_inputs], [pending, status]).success(
        show, [pending], [result, last_image])
    compose_btn.click(do_compose, [healthy, *slot_names, *slot_weights, *param_inputs], [pending, status]).success(
        show, [pending], [result, last_image])
    return {"last_image": last_image, "to_inpaint": to_inpaint, "cell": cell,
            "on_show": (refresh, [healthy, diseased, *slot_names]),
            "generate": do_generate, "grid": do_grid, "show": show}
