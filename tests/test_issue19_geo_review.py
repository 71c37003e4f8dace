"""Issue 19 item 2, review findings: millimetre masks on the image's own grid (a manifest's spacing on a
generated image of another size), inpaint lays the image on the grid its mask was drawn on, label masks
binarised, --crop-nonzero outputs refused for source-grid masks, the webui gets the fitted picture, and
bounded --slice / --target-size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medical_diffusion.cli import main
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.errors import MedDiffError
from geometry_support import diameters_px, prepared_adc  # noqa: F401 (a fixture)


# --- 1.1: a manifest's spacing on the image's own grid -------------------------------------------------------

@pytest.mark.parametrize("size", [128, 512])
def test_manifest_spacing_follows_the_generated_image_size(prepared_adc, tmp_path, size, capsys):
    _series, out, _result = prepared_adc  # 0.5 mm per pixel of the 512 px prepared image
    generated = tmp_path / "generated" / "0001.png"
    generated.parent.mkdir()
    Image.new("RGB", (size, size), (90, 90, 90)).save(generated)
    assert main(["mask", "--unit", "mm", "--image", str(generated), "--spacing-from", str(out / "manifest.csv"),
                 "--circle", "32", "32", "5", "--out", str(tmp_path / "g")]) == 0
    assert "10.0x10.0 mm" in capsys.readouterr().out
    record = json.loads((tmp_path / "g.json").read_text())
    mm_x, mm_y = record["target_spacing_mm"]  # mm per pixel of the 512 px mask, on this image fitted to it
    assert (mm_x, mm_y) == pytest.approx((0.5, 0.5))
    dx, dy, cx, cy = diameters_px(np.asarray(Image.open(tmp_path / "g.png")))
    assert dx * mm_x == pytest.approx(10, rel=0.03) and dy * mm_y == pytest.approx(10, rel=0.03)
    # the same field of view: 32 mm from the corner is near 64 px of the 512 grid, whatever the image's size
    k = 512 / size  # (pixel centres: source pixel x lies at (x + 0.5) * k - 0.5)
    centre = (32 / (0.5 * k) + 0.5) * k - 0.5
    assert (cx, cy) == pytest.approx((centre, centre), abs=0.5)
    # measured on the image itself: its pixels are 512 / size times larger
    on_image = np.asarray(Image.open(tmp_path / "g.png").resize((size, size), Image.NEAREST))
    dx, dy, _, _ = diameters_px(on_image)
    assert dx * 0.5 * 512 / size == pytest.approx(10, rel=0.03)


def test_manifest_spacing_without_an_image_is_on_the_prepared_grid(prepared_adc, tmp_path):
    _series, out, _result = prepared_adc
    assert main(["mask", "--unit", "mm", "--spacing-from", str(out / "manifest.csv"), "--circle", "32", "32", "5",
                 "--target-size", "128", "128", "--out", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["spec"]["source_size"] == [512, 512]  # the prepared images' grid, not the target size
    assert record["target_spacing_mm"] == pytest.approx([2.0, 2.0])
    dx, dy, cx, cy = diameters_px(np.asarray(Image.open(tmp_path / "m.png")))
    assert (cx, cy) == pytest.approx((16, 16), abs=0.5) and dx * 2 == pytest.approx(10, rel=0.1)


def test_manifest_spacing_refuses_an_image_of_another_aspect_ratio(prepared_adc, tmp_path, capsys):
    _series, out, _result = prepared_adc
    odd = tmp_path / "odd.png"
    Image.new("RGB", (128, 96)).save(odd)
    assert main(["mask", "--unit", "mm", "--image", str(odd), "--spacing-from", str(out / "manifest.csv"),
                 "--circle", "32", "32", "5", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "odd.png" in err and "128x96" in err and "512x512" in err and not (tmp_path / "m.png").exists()


# --- 1.5: outputs of --crop-nonzero do not lie on the source as a source-grid mask assumes -------------------

def _bordered_volume(path):
    import SimpleITK as sitk

    vol = np.zeros((3, 40, 30), np.int16)
    vol[:, 10:30, 5:20] = 100 + np.arange(15)[None, None, :]  # content off-centre, zero borders
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("crop", [False, True])
def test_source_grid_mask_on_a_cropped_output_is_refused_naming_the_manifest(tmp_path, crop, capsys):
    volume = _bordered_volume(tmp_path / "case.mha")
    out = tmp_path / "out"
    result = prepare_images(ImportOptions(inputs=(str(volume),), out=str(out), crop_nonzero=crop, size=64))
    prepared = out / result.rows[0].output
    code = main(["mask", "--unit", "mm", "--spacing-from", str(volume), "--image", str(prepared),
                 "--circle", "20", "40", "4", "--target-size", "64", "64", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    if not crop:  # the output lies on the source as the mask puts it
        assert code == 0
        return
    assert code == 1 and not (tmp_path / "m.png").exists()
    assert "--crop-nonzero" in err and f"--spacing-from {out / 'manifest.csv'}" in err
    # the prepared image's own manifest gives its geometry
    assert main(["mask", "--unit", "mm", "--spacing-from", str(out / "manifest.csv"), "--image", str(prepared),
                 "--circle", "20", "20", "4", "--target-size", "64", "64", "--out", str(tmp_path / "m")]) == 0


def test_inpaint_refuses_a_source_grid_mask_json_on_a_cropped_output(tmp_path):
    from medical_diffusion.cli.inpaint import load_inputs
    from medical_diffusion.errors import InputFileError

    volume = _bordered_volume(tmp_path / "case.mha")
    out = tmp_path / "out"
    result = prepare_images(ImportOptions(inputs=(str(volume),), out=str(out), crop_nonzero=True, size=64))
    prepared = out / result.rows[0].output
    assert main(["mask", "--unit", "mm", "--spacing-from", str(volume), "--circle", "20", "40", "4",
                 "--target-size", "64", "64", "--out", str(tmp_path / "m")]) == 0
    with pytest.raises(MedDiffError, match="--crop-nonzero.*--spacing-from .*manifest.csv"):
        load_inputs(str(prepared), [str(tmp_path / "m.json")])
    masks, image = load_inputs(str(volume), [str(tmp_path / "m.json")])  # on the volume itself: fitted
    assert image.size == masks[0][0].size == (64, 64)
    with pytest.raises(InputFileError, match="30x40 source on a 64x64 grid"):
        Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
        load_inputs(str(tmp_path / "small.png"), [str(tmp_path / "m.json")])


# --- mask --target-size is bounded --------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["32", "4096"])
def test_mask_target_size_is_bounded(tmp_path, size, capsys):
    assert main(["mask", "--circle", "20", "20", "9", "--target-size", size, "64",
                 "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "--target-size" in err and size in err and "64" in err and "2048" in err
    assert not (tmp_path / "m.png").exists()


# --- --slice choices are bounded ------------------------------------------------------------------------------

def test_slice_choices_are_bounded_and_fast():
    import time

    from medical_diffusion.datasets.generic_import import MAX_SLICE_CHOICES, parse_slices

    start = time.perf_counter()
    assert parse_slices(f"0-{MAX_SLICE_CHOICES - 1},5,3") == tuple(range(MAX_SLICE_CHOICES))
    assert time.perf_counter() - start < 1.0  # no quadratic membership test
    assert parse_slices("9,3-4,3") == (9, 3, 4)  # order kept, repeats dropped
    for value in (f"0-{MAX_SLICE_CHOICES}", "0-99999999999", f"0-3000,5000-{5000 + 2000}"):
        with pytest.raises(MedDiffError, match=f"{value}.*more than {MAX_SLICE_CHOICES} slices"):
            parse_slices(value)


# --- 1.2 / 1.6: inpaint lays the image on the grid the mask was drawn for; label masks binarised -------------

def _volume(path, values):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(values))
    img.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(img, str(path))
    return path


def _scan(path):
    """A 30 x 40 (w x h) slice with content up to its edges, so a padded fit and a stretched one differ."""
    z, y, x = np.mgrid[0:3, 0:40, 0:30]
    return _volume(path, (50 + 3 * x + 2 * y + z).astype(np.int16))


@pytest.fixture
def reuse_tiny(tiny_backend, monkeypatch):
    import medical_diffusion.generation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny_backend)


def test_inpaint_paints_where_a_stretched_mask_was_drawn(tmp_path, reuse_tiny, capsys):
    import torch

    from medical_diffusion.datasets.image_input import read_image_input
    from medical_diffusion.datasets.slice_geometry import SliceGeometry
    from medical_diffusion.embeddings import Embedding, save_embedding

    save_embedding(Embedding(name="sick", vectors=torch.zeros(2, 32)), tmp_path / "emb" / "sick.pt")
    scan = _scan(tmp_path / "scan.mha")
    assert main(["mask", "--image", str(scan), "--fit", "stretch", "--circle", "6", "20", "4",
                 "--target-size", "64", "64", "--out", str(tmp_path / "m")]) == 0
    run = ["inpaint", "--model", "tiny", "--embeddings-dir", str(tmp_path / "emb"), "--mask", str(tmp_path / "m.json"),
           "--prompt", "sick", "--steps", "1", "--width", "64", "--height", "64", "--padding", "4", "--mask-blur", "0",
           "--fill", "latent noise", "--denoising-strength", "1"]
    assert main([*run, "--image", str(scan), "--out", str(tmp_path / "inp")]) == 0
    record = json.loads((tmp_path / "inp" / "inpaint.json").read_text())
    got = np.asarray(Image.open(tmp_path / "inp" / record["results"][0]["file"]).convert("RGB")).astype(int)
    stretched = SliceGeometry((30, 40), (64, 64), fit="stretch").apply(read_image_input(scan).image)
    mask = np.asarray(Image.open(tmp_path / "m.png")) > 127
    changed = np.abs(got - stretched.astype(int)).max(axis=-1) > 0
    near = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))) > 0
    assert not changed[~near].any()  # the stretched scan everywhere but at the mask (no zero border)
    assert changed[mask].mean() > 0.5  # painted where the mask was drawn
    # an image on neither the mask's source grid nor its target grid is refused, naming both
    Image.new("RGB", (48, 48), (80, 80, 80)).save(tmp_path / "other.png")
    capsys.readouterr()
    assert main([*run, "--image", str(tmp_path / "other.png"), "--out", str(tmp_path / "inp2")]) == 1
    err = capsys.readouterr().err
    assert "m.json" in err and "30x40" in err and "64x64" in err and "48x48" in err


def test_label_volume_masks_are_binarised_and_fitted_nearest_onto_the_image_grid(tmp_path):
    from medical_diffusion.cli.inpaint import load_inputs, read_mask
    from medical_diffusion.datasets.slice_geometry import square

    scan = _scan(tmp_path / "scan.mha")
    labels = np.zeros((3, 40, 30), np.uint8)
    labels[1, 5:15, 3:9] = 1  # two lesions with different label values on the middle slice
    labels[1, 25:35, 18:27] = 7
    label = _volume(tmp_path / "labels.mha", labels)
    want = (labels[1] > 0).astype(np.uint8) * 255
    mask = read_mask(str(label))[0]
    np.testing.assert_array_equal(np.asarray(mask), want)  # label 1 repaints as fully as label 7
    # on the scan itself: both fitted as prepare fits the slice (512, padded), the mask nearest-neighbour
    masks, image = load_inputs(str(scan), [str(label)])
    geo = square((30, 40), 512)
    np.testing.assert_array_equal(np.asarray(masks[0][0]), geo.apply(want, Image.NEAREST))
    assert image.size == (512, 512) and not np.asarray(image)[:, :geo.pad[0]].any()
    # on the prepared image: the label slice is fitted onto its grid, the image kept as it is
    out = tmp_path / "out"
    prepared = out / prepare_images(ImportOptions(inputs=(str(scan),), out=str(out), size=64)).rows[0].output
    masks, image = load_inputs(str(prepared), [str(label)])
    np.testing.assert_array_equal(np.asarray(masks[0][0]), square((30, 40), 64).apply(want, Image.NEAREST))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(prepared).convert("RGB")))


# --- 1.4: inside the webui the Inpaint tab gives img2img the fitted picture and mask --------------------------

def _tab(tmp_path, backend, inpaint):
    import gradio as gr

    from medical_diffusion.ui import tab_inpaint
    from medical_diffusion.ui.context import UIContext

    import torch

    from medical_diffusion.embeddings import Embedding, save_embedding

    save_embedding(Embedding("lesion", torch.zeros(2, backend.text_width)), tmp_path / "emb" / "lesion.pt")
    with gr.Blocks():
        return tab_inpaint.build(UIContext(backend_factory=lambda: backend, work_dir=tmp_path,
                                           embeddings_dir=tmp_path / "emb", loaded_text_width=lambda: None,
                                           inpaint=inpaint))


@pytest.mark.parametrize("only_masked", [True, False])
def test_the_webuis_img2img_gets_the_padded_slice_and_its_mask(tmp_path, tiny_backend, only_masked):
    from medical_diffusion.generation.masks import MaskShape, MaskSpec, render_mask

    calls = []

    def host_inpaint(image, mask, prompt, *, should_stop, progress, **settings):
        calls.append((image, mask, settings))
        return image

    parts = _tab(tmp_path, tiny_backend, host_inpaint)
    picture = Image.fromarray(np.full((128, 84, 3), 200, np.uint8))  # a non-square slice, 84 x 128
    geo = ["px", 0, 0, 20, 64, 8, 8, 0, 0, False]
    _, status = parts["inpaint"](picture, {"size": [84, 128]}, [], *geo, "", "lesion", 3, 7.0, 1, 64, 96, "", 0.75,
                                 "original", 4, only_masked, 32, progress=None)
    assert calls, status
    ((image, mask, settings),) = calls
    spec = MaskSpec([MaskShape.circle(20, 64, 8)], source_size=(84, 128))
    assert image.size == mask.size == (512, 512)  # as the overlay shows it: padded, not left to be stretched
    arr = np.asarray(image)
    assert not arr[:, :88].any() and not arr[:, 424:].any() and (arr[:, 90:420] == 200).all()
    np.testing.assert_array_equal(np.asarray(mask), render_mask(spec).mask)
    # a whole picture is processed at the fitted size; only the masked crop at the size asked for
    assert (settings["width"], settings["height"]) == ((64, 96) if only_masked else (512, 512))


def test_a_click_on_the_overlay_follows_the_masks_fit():
    from medical_diffusion.generation.masks import MaskShape, MaskSpec
    from medical_diffusion.ui.tab_inpaint import click_to_source

    def geometry(fit):
        return MaskSpec([MaskShape.circle(1, 1, 1)], source_size=(84, 128), fit=fit).geometry()

    # the top-left target pixel: in the padded fit 88 px of border lie left of the slice, 4 px per source px
    assert click_to_source(88, 0, geometry("pad"), "px", None) == pytest.approx((0.5 / 4 - 0.5, 0.5 / 4 - 0.5))
    # stretched: 84 source columns over 512 px, 128 rows over 512 px; mm at 2 mm per source pixel
    assert click_to_source(0, 0, geometry("stretch"), "mm", (2.0, 2.0)) == pytest.approx(
        ((0.5 * 84 / 512 - 0.5) * 2, (0.5 * 128 / 512 - 0.5) * 2))
