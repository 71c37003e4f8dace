"""Embeddings tab: inspect, compare, blend, convert and download embedding files."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import escape_markdown, reports_in_status, status_line, uploaded_path

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp")


def list_embedding_files(ctx: UIContext) -> list[str]:
    """Embedding files in the context's embeddings folder (relative names)."""
    folder = ctx.embeddings_dir
    if not folder.is_dir():
        return []
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and not p.name.endswith(".preview.png")
    )


def _resolve(ctx: UIContext, upload, choice: str | None, which: str = "A") -> Path:
    """The file of embedding ``which``: the uploaded one or the list's choice, never a silent pick
    between both (choosing clears the upload and uploading clears the choice; a call with both is refused)."""
    path = uploaded_path(upload)
    if path and choice:
        raise ValueError(f"embedding {which}: both an uploaded file ({Path(path).name}) and a list choice ({choice}) "
                         "are given; remove the upload or clear the choice")
    if path:
        return Path(path)
    if choice:
        return ctx.path(ctx.embeddings_dir / choice, must_exist=True)
    raise ValueError(f"embedding {which}: choose an embedding from the list or upload a file")


def build(ctx: UIContext) -> dict:
    """Add the Embeddings tab's widgets to the current Blocks context; returns ``on_show``
    (``(fn, outputs)`` refreshing the file lists when the tab is shown) and the handlers. Each handler's
    last output is the tab's status line: a failure says why there and clears the report shown before."""
    from medical_diffusion.embeddings import load_embedding, save_embedding
    from medical_diffusion.embeddings.blend import blend_embeddings
    from medical_diffusion.embeddings.vector_blocks import embedding_format, embedding_suffix, embedding_widths
    from medical_diffusion.embeddings.inspection import (backend_token_scale, compare_report, format_compare_report, format_report,
                                                          inspect_embedding)

    def width() -> int | None:
        """The loaded model's text width (None in the webui before a checkpoint has loaded)."""
        return ctx.text_width_if_ready()

    def load(path, for_model: bool = False):
        """Any width (compare and convert need no model, as on the command line); ``for_model``: the
        loaded model's width (a blend is saved into its embeddings folder)."""
        model_width = width() if for_model else None
        return load_embedding(path, expected_width=model_width, check_width=model_width is not None)

    def inspect(path) -> tuple[str, dict]:
        """Text and JSON report, with the norm check against the loaded model's token vectors (a file of
        another width is reported with a warning, as ``meddiff embedding inspect --model`` does)."""
        model_width = width()
        scale = backend_token_scale(ctx.backend()) if model_width is not None else None
        report = inspect_embedding(path, expected_width=model_width, token_scale=scale,
                                   scale_hint="load a Stable Diffusion model",
                                   width_hint="load the model it was made for")
        return format_report(report), json.loads(json.dumps(report, default=str))

    def refresh():
        files = list_embedding_files(ctx)
        return gr.Dropdown.update(choices=files), gr.Dropdown.update(choices=files)

    with gr.Row():
        with gr.Column():
            choice_a = gr.Dropdown(label="Embedding A", choices=list_embedding_files(ctx), elem_id="md_emb_a")
            upload_a = gr.File(label="…or upload A", file_types=list(EMBEDDING_SUFFIXES))
        with gr.Column():
            choice_b = gr.Dropdown(label="Embedding B (compare, blend)", choices=list_embedding_files(ctx),
                                   elem_id="md_emb_b")
            upload_b = gr.File(label="…or upload B", file_types=list(EMBEDDING_SUFFIXES))
    refresh_btn = gr.Button("Refresh list", elem_id="md_emb_refresh")
    refresh_btn.click(refresh, outputs=[choice_a, choice_b])
    # one source per embedding: the last one the user gave (user events only: clearing fires neither)
    for choice, upload in ((choice_a, upload_a), (choice_b, upload_b)):
        upload.upload(lambda: gr.Dropdown.update(value=None), outputs=[choice])
        choice.select(lambda: None, outputs=[upload])

    with gr.Row():
        inspect_btn = gr.Button("Inspect A", variant="primary", elem_id="md_emb_inspect")
        compare_btn = gr.Button("Compare A and B", elem_id="md_emb_compare")
    status = status_line(elem_id="md_emb_status")
    report_text = gr.Textbox(label="Report", lines=12, elem_id="md_emb_report")
    report_json = gr.JSON(label="Report (JSON)")

    @reports_in_status(3)
    def do_inspect(upload, choice):
        return (*inspect(_resolve(ctx, upload, choice)), "")

    @reports_in_status(3)
    def do_compare(ua, ca, ub, cb):
        result = compare_report(load(_resolve(ctx, ua, ca)), load(_resolve(ctx, ub, cb, "B")))
        return format_compare_report(result), json.loads(json.dumps(result, default=str)), ""

    inspect_btn.click(do_inspect, [upload_a, choice_a], [report_text, report_json, status])
    compare_btn.click(do_compare, [upload_a, choice_a, upload_b, choice_b], [report_text, report_json, status])

    with gr.Accordion("Blend A and B in embedding space", open=False, elem_id="md_emb_blend_box"):
        with gr.Row():
            weight = gr.Slider(0, 1, value=0.5, step=0.05, label="Weight of B")
            mode = gr.Radio(["linear", "slerp"], value="slerp", label="Interpolation")
            blend_name = gr.Textbox(label="New name (lowercase)", value="blend", elem_id="md_emb_blend_name")
        blend_btn = gr.Button("Blend and save to the embeddings folder", elem_id="md_emb_blend")

    @reports_in_status(5, keep=[2, 3])
    def do_blend(ua, ca, ub, cb, w, m, name):
        a, b = load(_resolve(ctx, ua, ca), for_model=True), load(_resolve(ctx, ub, cb, "B"), for_model=True)
        name = name.strip().lower()
        blended = blend_embeddings(a, b, float(w), mode=m, name=name)
        widths = embedding_widths(blended)  # an SDXL pair is saved as clip_l/clip_g .safetensors
        path = save_embedding(blended, ctx.path(ctx.embeddings_dir / f"{name}{embedding_suffix(widths)}"),
                              fmt=embedding_format(widths))
        ctx.on_embedding_saved(path)
        files = list_embedding_files(ctx)
        text, report = inspect(path)
        return (text, report, gr.Dropdown.update(choices=files), gr.Dropdown.update(choices=files),
                f"Saved {escape_markdown(path)}.")

    blend_btn.click(do_blend, [upload_a, choice_a, upload_b, choice_b, weight, mode, blend_name],
                    [report_text, report_json, choice_a, choice_b, status])

    with gr.Accordion("Convert / download A", open=False, elem_id="md_emb_convert_box"):
        fmt = gr.Radio(["a1111", "safetensors", "diffusers"], value="a1111", label="Format")
        convert_btn = gr.Button("Convert", elem_id="md_emb_convert")
        converted = gr.File(label="Download", interactive=False, elem_id="md_emb_download")

    @reports_in_status(2)
    def do_convert(ua, ca, f):
        emb = load(_resolve(ctx, ua, ca))
        out_dir = ctx.path(ctx.work_dir / "exports")
        # diffusers: a folder <name>/learned_embeds.safetensors, the layout load_textual_inversion expects
        target = out_dir / {"a1111": f"{emb.name}.pt", "safetensors": f"{emb.name}.safetensors",
                            "diffusers": emb.name}[f]
        path = save_embedding(emb, target, fmt=f, force=True)
        return str(path), f"Saved {escape_markdown(path)}."

    convert_btn.click(do_convert, [upload_a, choice_a, fmt], [converted, status])
    return {"on_show": (refresh, [choice_a, choice_b]), "inspect": do_inspect, "compare": do_compare, "blend": do_blend,
            "convert": do_convert}
