"""Inpaint tab: place an ellipse mask by clicking, size it in px or mm, inpaint with an embedding.

Each inpainting is saved under ``WORK/outputs/inpaint/<date>/`` with its parameters (prompt, seed, steps,
CFG, denoising, the mask's spec, the embeddings' names and hashes), its input picture and its mask; the
status line says where. Errors stay in the tab's status lines; Stop (or closing the browser) ends the
run at its next sampler step.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, replace
from typing import Callable

import gradio as gr
import numpy as np
from PIL import Image

from medical_diffusion.datasets.slice_geometry import SliceGeometry
from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import (escape_markdown, reports_in_status, saved_status, shows_errors, status_line,
                                           uploaded_path)
from medical_diffusion.ui.stopping import StepClock, StopFlag, add_stop_button
from medical_diffusion.ui.tab_generate import embedding_names, sampling_controls

log = logging.getLogger(__name__)

TARGET = 512


def click_to_source(x: float, y: float, geometry: SliceGeometry, unit: str,
                    spacing: tuple[float, float] | None) -> tuple[float, float]:
    """A click on the overlay (the source fitted onto it by ``geometry``, the mask's: as ``prepare`` fits
    it, or stretched) -> centre in source pixels, or mm when ``unit == "mm"``."""
    sx, sy = (float(v) for v in geometry.target_to_source(x, y))
    if unit == "mm":
        if spacing is None:
            raise ValueError("mm needs the pixel spacing")
        return sx * spacing[0], sy * spacing[1]
    return sx, sy


def default_geometry(size: tuple[int, int], spacing: tuple[float, float] | None) -> tuple[str, float, float, float, float]:
    """Unit, centre and radii a newly loaded picture starts with: its centre and a circle of a
    twentieth of its shorter side, in mm when its pixel spacing is known, else in its pixels."""
    w, h = size
    r = max(1.0, min(w, h) / 20)
    if spacing:
        sx, sy = spacing
        return "mm", round(w / 2 * sx, 2), round(h / 2 * sy, 2), round(r * min(sx, sy), 2), round(r * min(sx, sy), 2)
    return "px", w / 2, h / 2, round(r, 1), round(r, 1)


def size_lines(spec, res) -> list[str]:
    """Each shape's size in the source's units: mm when it has a pixel spacing, else its pixels."""
    if res.shape_sizes_mm:
        return [f"shape {i + 1}: {w:.1f} x {h:.1f} mm" for i, (w, h) in enumerate(res.shape_sizes_mm)]
    return [f"shape {i + 1}: {2 * s.radii[0]:.1f} x {2 * s.radii[1]:.1f} px (of the {spec.source_size[0]} x "
            f"{spec.source_size[1]} source)" for i, s in enumerate(spec.shapes)]


def add_shape(stored: list[dict], shape) -> list[dict]:
    """``stored`` with ``shape`` (a :class:`MaskShape`) added to the union, unless it is already there."""
    entry = {"center": list(shape.center), "radii": list(shape.radii), "angle": shape.angle}
    return list(stored) if entry in stored else list(stored) + [entry]


def pick_cell(last: dict | None, cell) -> Image.Image:
    """The picture of cell ``cell`` (1 = first) of the last result (a single image has one cell)."""
    cells = (last or {}).get("cells") or []
    if not cells:
        raise ValueError("there is no picture yet: generate an image first")
    if len(cells) == 1:
        return cells[0]
    index = int(cell or 1)
    if not 1 <= index <= len(cells):
        raise ValueError(f"cell {index} is not in the last grid or strip: choose 1..{len(cells)}")
    return cells[index - 1]


def save_inpainting(ctx: UIContext, picture: Image.Image, source: Image.Image, mask: Image.Image, spec,
                    params: dict, prompt: str):
    """Save an inpainting with :func:`~medical_diffusion.ui.tab_generate.save_tab_result` (kind
    ``inpaint``: the picture with its ``parameters`` chunk, the JSON sidecar with ``params``, the mask's
    spec and the embeddings' hashes), and beside it ``NNNNN-input.png`` (the picture painted on) and
    ``NNNNN-mask.png`` (white = repainted), named in the sidecar; its folder goes through ``ctx.path`` (the
    allowed roots) first. Returns the ``SavedResult``."""
    from medical_diffusion.atomic_io import atomic_write_text
    from medical_diffusion.png_io import save_png
    from medical_diffusion.ui.tab_generate import save_tab_result

    done = save_tab_result(ctx, "inpaint", picture, {**params, "mask_spec": asdict(spec)}, prompt=prompt)
    stem = done.picture.name[: -len(done.picture.suffix)]
    extra = {}
    for role, image in (("input", source), ("mask", mask)):
        path = done.picture.with_name(f"{stem}-{role}.png")
        extra[role] = {"file": path.name, "sha256": save_png(image, path)}
    document = json.loads(done.sidecar.read_text())
    document.update(extra)
    atomic_write_text(done.sidecar, json.dumps(document, indent=1, default=str))
    return done


def build(ctx: UIContext) -> dict:
    """Add the tab's widgets; returns ``take_image(button, picture_state, tabs, cell)``, which wires a
    button elsewhere to bring a picture (one cell of a grid or strip) here and show this tab, and
    ``on_show`` (``(fn, outputs)``)."""
    from medical_diffusion.generation.inpainting import FILL_MODES, inpaint
    from medical_diffusion.generation.loading import load_embedding_table, prompt_warnings, vectors_of
    from medical_diffusion.datasets.image_input import read_image_input
    from medical_diffusion.generation.masks import MaskShape, MaskSpec, overlay_preview, render_mask
    from medical_diffusion.generation.sampling import resolve_seed
    from medical_diffusion.limits import check_sampling
    from medical_diffusion.png_io import save_png

    source = gr.State(None)  # {"size": [w, h]} of the loaded image
    shapes = gr.State([])  # shapes already added to the union
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image (upload, or load a DICOM/volume below)", type="pil",
                             elem_id="md_inp_image")
            with gr.Row():
                volume_file = gr.File(label="DICOM file or the files of a DICOM series, NIfTI / MHA (pixel "
                                            "spacing read from the header)", file_count="multiple")
                slice_index = gr.Number(value=-1, precision=0, label="Slice (-1: middle)")
            load_btn = gr.Button("Load file")
        with gr.Column():
            overlay = gr.Image(label="Mask overlay: click to place the centre (arrow keys nudge it)",
                               type="pil", interactive=False, elem_id="md_inp_overlay")
            mask_info = status_line(elem_id="md_inp_info")
    with gr.Row():
        unit = gr.Radio(["px", "mm"], value="px", label="Unit")
        spacing_x = gr.Number(value=0, label="Spacing x (mm/px, 0: unknown)", elem_id="md_inp_spx")
        spacing_y = gr.Number(value=0, label="Spacing y (mm/px)", elem_id="md_inp_spy")
    with gr.Row():
        cx = gr.Number(value=256, label="Centre x", elem_id="md_inp_cx")
        cy = gr.Number(value=256, label="Centre y", elem_id="md_inp_cy")
        rx = gr.Number(value=24, label="Radius x", elem_id="md_inp_rx")
        ry = gr.Number(value=24, label="Radius y", elem_id="md_inp_ry")
    with gr.Row():
        angle = gr.Slider(-90, 90, value=0, step=1, label="Rotation (degrees)")
        feather = gr.Number(value=0, label="Feather (same unit)")
        invert = gr.Checkbox(False, label="Invert")
    with gr.Row():
        add_btn = gr.Button("Add shape to the union")
        clear_btn = gr.Button("Clear shapes")
        save_btn = gr.Button("Save mask (PNG + overlay + JSON)")
    names = embedding_names(ctx)
    with gr.Row():
        emb = gr.Dropdown(names, label="Embedding to paint with", elem_id="md_inp_embedding")
        prompt = gr.Textbox(label="Prompt (default: the embedding's name)", elem_id="md_inp_prompt")
    params = sampling_controls(ctx)
    with gr.Row():
        strength = gr.Slider(0, 1, value=0.75, step=0.05, label="Denoising strength")
        fill = gr.Radio(list(FILL_MODES), value="original", label="Masked content")
        blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (px)")
        only_masked = gr.Checkbox(True, label="Only masked (crop, paint, paste back)")
        padding = gr.Slider(0, 256, value=32, step=4, label="Only-masked padding (px)")
    with gr.Row():
        inpaint_btn = gr.Button("Inpaint", variant="primary", elem_id="md_inp_run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="md_inp_stop")
        send_btn = gr.Button("Send image + mask to img2img (Inpaint upload)", elem_id="md_inp_send",
                             visible=ctx.send_to_inpaint is not None)
    # at most its own size (style.css): a 128-px inpainting is not blown up to the page's width
    result = gr.Image(label="Inpainted", type="pil", interactive=False, height=512, elem_id="md_inp_result",
                      elem_classes=["md-natural-size"])
    status = status_line(elem_id="md_inp_status")

    geometry = [unit, spacing_x, spacing_y, cx, cy, rx, ry, angle, feather, invert]

    def spec_of(src, extra, u, spx, spy, x, y, r1, r2, a, f, inv) -> MaskSpec:
        if not src:
            raise ValueError("load or upload an image first")
        spacing = (float(spx), float(spy)) if spx and spy else None
        current = MaskShape((float(x), float(y)), (float(r1), float(r2)), float(a))
        union = add_shape(extra or [], current)  # the current shape, unless it was already added
        shapes = [MaskShape(tuple(s["center"]), tuple(s["radii"]), s["angle"]) for s in union]
        return MaskSpec(shapes, unit=u, source_size=tuple(src["size"]), spacing=spacing,
                        target_size=(TARGET, TARGET), feather=float(f or 0), invert=bool(inv))

    def render(img, src, extra, *geo):
        spec = spec_of(src, extra, *geo)
        res = render_mask(spec)
        lines = size_lines(spec, res) + [f"⚠ {w}" for w in res.warnings]
        return overlay_preview(img, res, spec), "\n\n".join(lines), res, spec

    def image_and_mask(img, src, extra, *geo):
        """The picture and its mask drawn on the picture's own grid (white = repaint), for the webui's
        img2img, which resizes them its own way."""
        if img is None:
            raise ValueError("load or upload an image first")
        spec = spec_of(src, extra, *geo)
        return img, Image.fromarray(render_mask(replace(spec, target_size=spec.source_size)).mask)

    def fitted_image_and_mask(img, src, extra, *geo):
        """The picture fitted onto the 512-px mask grid as ``prepare`` fits a slice (aspect kept, zero
        padding), and the mask: what the model was trained on."""
        if img is None:
            raise ValueError("load or upload an image first")
        _picture, _text, res, spec = render(img, src, extra, *geo)
        return Image.fromarray(spec.geometry().apply(np.asarray(img.convert("RGB")))), Image.fromarray(res.mask)

    # the mask's status line (beside the overlay) takes the errors of loading, placing and saving masks;
    # a failure keeps what is shown (still the current picture and mask) and says so
    def mask_reports(n_outputs: int, status: int = -1):
        return reports_in_status(n_outputs, status=status, keep=[i for i in range(n_outputs) if i != status % n_outputs],
                                 stale_note="The picture and mask shown are the ones from before.")

    @mask_reports(10, status=2)
    def on_upload(img):
        if img is None:
            return None, [], "", 0, 0, gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
        w, h = img.size
        u, x, y, r1, r2 = default_geometry((w, h), None)
        return {"size": [w, h]}, [], "", 0, 0, u, x, y, r1, r2

    def with_mask_status(fn: Callable, n_outputs: int) -> Callable:
        """``fn`` wired with the mask status line as one more output (emptied: the redraw that follows
        fills it), errors reported there."""
        @mask_reports(n_outputs + 1)
        @functools.wraps(fn)
        def wrapped(*args):
            out = fn(*args)
            return (*out, "") if isinstance(out, tuple) else (out, "")

        return wrapped

    def load_picture(file, index):
        paths = [uploaded_path(f) for f in (file if isinstance(file, list) else [file])]
        paths = [p for p in paths if p]
        if not paths:
            raise ValueError("choose a DICOM or volume file (or the DICOM files of one series)")
        source = read_image_input(paths, None if int(index) < 0 else int(index))
        img = source.image
        spx, spy = source.spacing or (0, 0)
        return (img, {"size": list(img.size)}, [], spx, spy,
                *default_geometry(img.size, source.spacing if spx and spy else None))

    on_load = with_mask_status(load_picture, 10)

    @mask_reports(2)
    def on_geometry(img, src, extra, *geo):
        if not src:
            return None, ""
        picture, text, _, _ = render(img, src, extra, *geo)
        return picture, text

    @mask_reports(3)
    def on_click(img, src, extra, u, spx, spy, x0, y0, r1, r2, a, f, inv, evt: gr.SelectData):
        spec = spec_of(src, extra, u, spx, spy, x0, y0, r1, r2, a, f, inv)  # the overlay's geometry
        x, y = evt.index
        sx, sy = click_to_source(float(x), float(y), spec.geometry(), u, spec.spacing)
        return round(sx, 2), round(sy, 2), gr.update()

    def add_to_union(src, extra, *geo):
        spec = spec_of(src, extra, *geo)
        return add_shape(extra or [], spec.shapes[-1])

    on_add = with_mask_status(add_to_union, 1)

    @mask_reports(1)
    def on_save(img, src, extra, *geo):
        picture, text, res, spec = render(img, src, extra, *geo)
        folder = ctx.path(ctx.work_dir / "masks")
        stem = f"mask_{len(list(folder.glob('mask_*.png'))) + 1:03d}" if folder.is_dir() else "mask_001"
        save_png(res.mask, folder / f"{stem}.png")
        save_png(picture, folder / f"{stem}_overlay.png")
        from medical_diffusion.atomic_io import atomic_write_text

        atomic_write_text(folder / f"{stem}.json", spec.to_json())
        return f"{text}\n\nSaved `{folder / stem}.png` (+ overlay, JSON)."

    def saved(picture, source, mask, spec, params: dict, prompt: str) -> str:
        """Save the inpainting; the status says where (or why not: the picture is still shown)."""
        return saved_status(lambda: save_inpainting(ctx, picture, source, mask, spec, params, prompt), "inpainting",
                            beside="input and mask beside it")

    stop_flag = StopFlag()

    # a failed or stopped run clears the earlier result: what is shown is always this run's
    @reports_in_status(2)
    def on_inpaint(img, src, extra, *values, progress=gr.Progress()):
        geo, rest = values[: len(geometry)], values[len(geometry):]
        name, text, steps, cfg, seed, width, height, negative, s, fm, b, om, pad = rest
        if not name and not (text or "").strip():
            raise ValueError("choose an embedding or type a prompt")
        on_host = ctx.inpaint is not None
        spec = spec_of(src, extra, *geo)
        # here and in the webui's img2img alike: the picture fitted as the overlay shows it, and the mask
        img, mask = fitted_image_and_mask(img, src, extra, *geo)
        the_prompt = (text or "").strip() or name
        used_seed = resolve_seed(int(seed))  # the seed saved is the one used, also for -1
        if on_host and not om:  # the webui resizes a whole picture to width x height: keep the fitted one's
            width, height = img.size
        settings = dict(negative_prompt=negative or "", seed=used_seed, steps=int(steps), cfg_scale=float(cfg),
                        denoising_strength=float(s), fill=fm, mask_blur=int(b), only_masked=bool(om),
                        padding=int(pad), width=int(width), height=int(height))
        settings = check_sampling(**settings)  # the sliders bound nothing on the server
        clock = StepClock("steps")

        def report(i: int, n: int) -> None:
            if progress is not None:
                progress(i / max(n, 1), desc=clock.text(i, n))

        with stop_flag.running(host_session=ctx.job_session, job="inpaint") as should_stop:
            with ctx.model_work() as backend:
                table = vectors_of(load_embedding_table(backend, str(ctx.embeddings_dir)))
                warn = prompt_warnings(backend, the_prompt, table)
                if on_host:  # the webui's own img2img inpainting
                    picture = ctx.inpaint(img, mask, the_prompt, should_stop=should_stop, progress=report,
                                          **settings)
                else:
                    picture = inpaint(backend, img, mask, the_prompt, embeddings=table, should_stop=should_stop,
                                      progress=report, **settings).image
        params = dict(settings, model=ctx.model_id, embedding=name or None)
        where = saved(picture, img, mask, spec, params, the_prompt)
        notes = [f"⚠ {escape_markdown(w)}" for w in warn]
        return picture, "\n\n".join([*notes, f"Inpainted with {escape_markdown(the_prompt)} at seed {used_seed}. "
                                                f"{where}"])

    redraw = dict(fn=on_geometry, inputs=[image, source, shapes, *geometry], outputs=[overlay, mask_info])
    upload_outputs = [source, shapes, mask_info, spacing_x, spacing_y, unit, cx, cy, rx, ry]
    image.upload(on_upload, [image], upload_outputs).then(**redraw)
    image.clear(lambda: (None, [], None, ""), None, [source, shapes, overlay, mask_info])
    load_btn.click(on_load, [volume_file, slice_index],
                   [image, source, shapes, spacing_x, spacing_y, unit, cx, cy, rx, ry, mask_info]).then(**redraw)
    for widget in geometry:
        widget.change(**redraw)
    overlay.select(on_click, [image, source, shapes, *geometry], [cx, cy, mask_info])
    add_btn.click(on_add, [source, shapes, *geometry], [shapes, mask_info]).then(**redraw)
    clear_btn.click(lambda: [], None, [shapes]).then(**redraw)
    save_btn.click(on_save, [image, source, shapes, *geometry], [mask_info])
    if ctx.send_to_inpaint is not None:  # a popup: its outputs are the webui's img2img widgets
        ctx.send_to_inpaint(send_btn, shows_errors(image_and_mask), [image, source, shapes, *geometry])
    sample_inputs = [params[k] for k in ("steps", "cfg", "seed", "width", "height", "negative")]
    inpaint_event = inpaint_btn.click(on_inpaint, [image, source, shapes, *geometry, emb, prompt, *sample_inputs,
                                                   strength, fill, blur, only_masked, padding], [result, status])
    add_stop_button(stop_btn, stop_flag, [inpaint_event], status)

    def take_image(button, picture, tabs, cell) -> None:
        # a popup: the button lies in another tab, and a failure must stop the chain (no tab switch)
        @shows_errors
        def take(last, index):
            return pick_cell(last, index), gr.Tabs.update(selected="inpaint")

        button.click(take, [picture, cell], [image, tabs]).success(
            on_upload, [image], upload_outputs).success(**redraw)

    def refresh_names():
        return gr.Dropdown.update(choices=embedding_names(ctx))

    return {"take_image": take_image, "on_show": (refresh_names, [emb]), "on_upload": on_upload,
            "on_load": load_picture, "load": on_load, "on_add": add_to_union, "add": on_add, "on_save": on_save,
            "on_click": on_click, "on_geometry": on_geometry, "render": render,
            "image_and_mask": image_and_mask, "fitted_image_and_mask": fitted_image_and_mask,
            "inpaint": on_inpaint, "stop": stop_flag}
