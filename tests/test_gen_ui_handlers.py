"""Interpolate & compose and Inpaint tab handlers, called directly (no browser)."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from upload_support import gradio_upload

from medical_diffusion.ui.tab_inpaint import default_geometry, pick_cell


class _Model:
    text_width = 32


def _ctx(tmp_path):
    from medical_diffusion.ui.context import UIContext

    return UIContext(backend_factory=_Model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                     loaded_text_width=lambda: None)


def _inpaint_parts(tmp_path):
    from medical_diffusion.ui import tab_inpaint

    with gr.Blocks():
        return tab_inpaint.build(_ctx(tmp_path))


def test_defaults_follow_the_picture_and_its_spacing():
    assert default_geometry((300, 200), None) == ("px", 150, 100, 10, 10)
    assert default_geometry((300, 200), (0.5, 0.5)) == ("mm", 75, 50, 5, 5)


def test_upload_sets_centre_and_radii_from_the_picture(tmp_path):
    parts = _inpaint_parts(tmp_path)
    src, shapes, _info, spx, spy, unit, cx, cy, rx, ry = parts["on_upload"](Image.new("RGB", (300, 200)))
    assert src == {"size": [300, 200]} and shapes == [] and (spx, spy) == (0, 0)
    assert (unit, cx, cy, rx, ry) == ("px", 150, 100, 10, 10)


def test_a_volume_with_spacing_starts_in_mm_and_labels_sizes_in_mm(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (3, 40, 60)).astype(np.uint8))
    volume.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(volume, str(tmp_path / "v.mha"))
    parts = _inpaint_parts(tmp_path)
    img, src, _shapes, spx, spy, unit, cx, cy, rx, ry = parts["on_load"](gradio_upload(tmp_path / "v.mha"), -1)
    assert img.size == (60, 40) and (spx, spy) == (0.5, 0.5)
    assert (unit, cx, cy, rx, ry) == ("mm", 15, 10, 1, 1)
    text = parts["render"](img, src, [], unit, spx, spy, cx, cy, rx, ry, 0, 0, False)[1]
    assert "shape 1: 2.0 x 2.0 mm" in text


def test_size_label_without_spacing_is_in_the_sources_pixels(tmp_path):
    parts = _inpaint_parts(tmp_path)
    img = Image.new("RGB", (300, 200))
    text = parts["render"](img, {"size": [300, 200]}, [], "px", 0, 0, 150, 100, 10, 10, 0, 0, False)[1]
    assert "shape 1: 20.0 x 20.0 px (of the 300 x 200 source)" in text  # not the 512-px overlay's pixels


def test_pick_cell_takes_a_cell_of_a_grid_or_the_single_image():
    cells = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    assert pick_cell({"cells": cells}, 2) is cells[1]
    assert pick_cell({"cells": cells[:1]}, 5) is cells[0]
    with pytest.raises(ValueError, match="choose 1..3"):
        pick_cell({"cells": cells}, 4)
    with pytest.raises(ValueError, match="generate an image first"):
        pick_cell(None, 1)


def test_a_failed_run_says_why_and_marks_the_shown_picture_stale(tmp_path):
    """A run's picture, the Inpaint tab's cells and the status line are one event's outputs: a failure
    keeps the earlier picture (the Inpaint tab may still take it) and the status says why and that the
    picture is an earlier run's."""
    from medical_diffusion.ui import tab_generate

    with gr.Blocks() as blocks:
        parts = tab_generate.build(_ctx(tmp_path))
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    expected = [by_id["md_gen_result"]._id, parts["last_image"]._id, by_id["md_gen_status"]._id]
    for button in ("md_gen_generate", "md_gen_grid"):
        first = next(d for d in blocks.dependencies if by_id[button]._id in d["targets"])
        assert first["outputs"] == expected
    picture, cells, status = parts["grid"]("", "", 3, 2, 2.0, 0, 64, 64, "")
    assert picture == gr.update() and cells == gr.update()
    assert status.startswith("**Error:** choose a healthy and a diseased embedding")
    assert "from an earlier run" in status
