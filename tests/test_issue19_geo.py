"""Issue 19, geometry and image inputs: one slice-to-512 geometry for prepare, mask, overlay and inpaint
(measured on the real ADC series), the same image inputs everywhere, several slices per series, mask
--out without suffix, and the Inpaint tab's union."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main
from medical_diffusion.datasets.generic_import import ImportOptions, parse_slices, prepare_images
from medical_diffusion.datasets.image_input import read_image_input
from medical_diffusion.datasets.manifest import read_manifest
from medical_diffusion.datasets.prepared_spacing import manifest_spacing
from medical_diffusion.datasets.slice_geometry import SliceGeometry
from medical_diffusion.errors import InputFileError, MedDiffError
from geometry_support import ADC, diameters_px, prepared_adc  # noqa: F401 (a fixture)


# --- item 2: millimetre masks match prepared images ---------------------------------------------------------

def test_prepare_records_mm_per_pixel_and_padding(prepared_adc):
    _series, out, _result = prepared_adc
    (row,) = read_manifest(out / "manifest.csv")  # the shareable one
    # 84 x 128 pixels of 2 x 2 mm: the 128 rows fill 512 px (4x), the 84 columns 336 px, centred
    assert (float(row.mm_per_px_x), float(row.mm_per_px_y)) == pytest.approx((0.5, 0.5))
    assert (row.pad_left, row.pad_top) == ("88", "0")
    png = np.asarray(Image.open(out / row.output))
    assert not png[:, :88].any() and not png[:, 88 + 336:].any() and png[:, 88:88 + 336].any()


def test_ten_mm_circle_from_the_series_measures_ten_mm_on_the_prepared_image(prepared_adc, tmp_path):
    series, out, _result = prepared_adc
    (row,) = read_manifest(out / "manifest.csv")
    mm_x, mm_y = float(row.mm_per_px_x), float(row.mm_per_px_y)
    prepared = out / row.output
    assert main(["mask", "--unit", "mm", "--spacing-from", str(series), "--image", str(series),
                 "--circle", "84", "100", "5", "--out", str(tmp_path / "m" / "lesion")]) == 0
    mask = np.asarray(Image.open(tmp_path / "m" / "lesion.png"))
    assert mask.shape == (512, 512)
    dx, dy, cx, cy = diameters_px(mask)
    assert dx * mm_x == pytest.approx(10, rel=0.03) and dy * mm_y == pytest.approx(10, rel=0.03)
    # centred where the prepared image shows source pixel (42, 50): column 88 + 42.5 * 4 - 0.5, row 50.5 * 4 - 0.5
    assert (cx, cy) == pytest.approx((88 + 42.5 * 4 - 0.5, 50.5 * 4 - 0.5), abs=0.5)
    # the overlay shows the slice as prepare made it (padded, not stretched)
    overlay = np.asarray(Image.open(tmp_path / "m" / "lesion.overlay.png").convert("RGB"))
    np.testing.assert_array_equal(overlay[:150], np.asarray(Image.open(prepared).convert("RGB"))[:150])


def test_mask_measured_on_a_prepared_image_from_its_manifest(prepared_adc, tmp_path):
    _series, out, result = prepared_adc
    prepared = out / result.rows[0].output
    for i, extra in enumerate((["--spacing-from", str(out / "manifest.csv")],  # the --image's row
                               ["--spacing-from", str(out / "manifest.csv"), "--entry", prepared.name],
                               ["--spacing-from", str(prepared)],
                               [])):  # --image inside a prepare output: found by itself
        target = tmp_path / f"m{i}.png"
        assert main(["mask", "--unit", "mm", "--image", str(prepared), *extra, "--circle", "128", "128", "5",
                     "--out", str(target)]) == 0
        dx, dy, cx, cy = diameters_px(np.asarray(Image.open(target)))
        assert dx * 0.5 == pytest.approx(10, rel=0.03) and dy * 0.5 == pytest.approx(10, rel=0.03)
        assert (cx, cy) == pytest.approx((256, 256), abs=0.5)  # 128 mm at 0.5 mm/px on the prepared grid
        assert json.loads(target.with_suffix(".json").read_text())["spec"]["spacing"] == pytest.approx([0.5, 0.5])


def test_mask_on_a_generated_image_takes_the_spacing_of_the_prepared_set(prepared_adc, tmp_path):
    _series, out, _result = prepared_adc
    generated = tmp_path / "generated" / "0001.png"
    generated.parent.mkdir()
    Image.new("RGB", (512, 512), (90, 90, 90)).save(generated)
    assert main(["mask", "--unit", "mm", "--image", str(generated), "--spacing-from", str(out / "manifest.csv"),
                 "--circle", "128", "128", "5", "--out", str(tmp_path / "g")]) == 0
    dx, dy, _, _ = diameters_px(np.asarray(Image.open(tmp_path / "g.png")))
    assert dx * 0.5 == pytest.approx(10, rel=0.03) and dy * 0.5 == pytest.approx(10, rel=0.03)


def test_old_manifests_still_read_and_say_when_spacing_is_missing(tmp_path):
    old = tmp_path / "manifest.csv"
    old.write_text("output,split,label,slice,sha256\nembedding/x/x_0001.png,,x,4,abc\n")
    (row,) = read_manifest(old)
    assert row.output == "embedding/x/x_0001.png" and row.mm_per_px_x == "" and row.pad_left == ""
    with pytest.raises(InputFileError, match="records no pixel spacing"):
        manifest_spacing(old)
    with pytest.raises(InputFileError, match="lists no output 'y.png'"):
        manifest_spacing(old, "y.png")


def test_mask_json_saved_before_the_fit_was_recorded_renders_as_it_was_drawn():
    from medical_diffusion.generation.masks import MaskShape, MaskSpec, render_mask

    old = {"shapes": [{"center": [40, 60], "radii": [10, 10], "angle": 0}], "unit": "px", "source_size": [84, 128],
           "spacing": None, "target_size": [512, 512], "feather": 0.0, "invert": False}
    spec = MaskSpec.from_dict(old)
    assert spec.fit == "stretch"
    stretched = MaskSpec([MaskShape.circle(40, 60, 10)], source_size=(84, 128), fit="stretch")
    assert np.array_equal(render_mask(spec).mask, render_mask(stretched).mask)
    assert MaskSpec.from_dict(json.loads(MaskSpec([MaskShape.circle(1, 1, 1)]).to_json())).fit == "pad"


def test_geometry_maps_both_ways_and_matches_prepare():
    geo = SliceGeometry((84, 128), (512, 512), (2.0, 2.0))
    assert geo.pad == (88, 0) and geo.mm_per_px == pytest.approx((0.5, 0.5))
    x, y = geo.source_to_target(np.array([0.0, 83.0]), np.array([0.0, 127.0]))
    np.testing.assert_allclose(geo.target_to_source(x, y), ([0, 83], [0, 127]))
    stretch = SliceGeometry((84, 128), (512, 512), (2.0, 2.0), "stretch")
    assert stretch.pad == (0, 0) and stretch.mm_per_px == pytest.approx((168 / 512, 0.5))


# --- item 6: the same image inputs everywhere ----------------------------------------------------------------

def test_every_image_input_kind_reads_with_spacing(testdata, tmp_path):
    import SimpleITK as sitk

    series = testdata.joinpath(*ADC)
    one = sorted(series.glob("*.dcm"))[0]
    mha = next((testdata / "picai_sample" / "images" / "10795").glob("*_adc.mha"))
    got = {p.name: read_image_input(p, s) for p, s in ((series, None), (one, None), (mha, 3))}
    assert got[series.name].size == (84, 128) and got[series.name].slice == 9
    assert got[series.name].spacing == pytest.approx((2.0, 2.0)) and got[series.name].kind == "series"
    assert got[one.name].size == (84, 128) and got[one.name].spacing == pytest.approx((2.0, 2.0))
    assert got[mha.name].slice == 3 and got[mha.name].spacing == pytest.approx((2.0, 2.0))
    cxr = read_image_input(testdata / "cxr" / "00000001_000.png")
    assert cxr.size == (512, 512) and cxr.spacing is None
    with pytest.raises(InputFileError, match="single 2D image"):
        read_image_input(testdata / "cxr" / "00000001_000.png", 2)
    with pytest.raises(InputFileError, match="out of range"):
        read_image_input(series, 40)
    bad = sitk.GetImageFromArray(np.full((3, 8, 8), np.nan, np.float32))
    sitk.WriteImage(bad, str(tmp_path / "nan.mha"))
    with pytest.raises(InputFileError, match="nan.mha.*NaN"):
        read_image_input(tmp_path / "nan.mha")
    with pytest.raises(InputFileError, match="no such file or folder"):
        read_image_input(tmp_path / "missing")


def test_mask_takes_a_series_folder_a_dicom_file_and_a_volume_slice(testdata, tmp_path):
    series = testdata.joinpath(*ADC)
    one = sorted(series.glob("*.dcm"))[0]
    mha = next((testdata / "picai_sample" / "images" / "10795").glob("*_adc.mha"))
    for i, extra in enumerate((["--image", str(series)], ["--image", str(one)], ["--image", str(mha), "--slice", "4"])):
        out = tmp_path / f"m{i}.png"
        assert main(["mask", "--unit", "mm", *extra, "--circle", "84", "128", "8", "--out", str(out)]) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["spec"]["spacing"] == pytest.approx([2.0, 2.0])  # from the image itself
        assert record["target_spacing_mm"] == pytest.approx([0.5, 0.5])
        assert Image.open(out.with_name(out.stem + ".overlay.png")).size == (512, 512)


# --- item 11: mask --out without suffix --------------------------------------------------------------------

def test_mask_out_without_suffix_writes_png(tmp_path, capsys):
    assert main(["mask", "--out", str(tmp_path / "masks" / "lesion"), "--circle", "20", "20", "9",
                 "--target-size", "64", "64"]) == 0
    assert Image.open(tmp_path / "masks" / "lesion.png").size == (64, 64)
    assert (tmp_path / "masks" / "lesion.overlay.png").is_file() and (tmp_path / "masks" / "lesion.json").is_file()
    assert main(["mask", "--out", str(tmp_path / "b.png"), "--circle", "20", "20", "9"]) == 0
    assert (tmp_path / "b.png").is_file()
    capsys.readouterr()
    assert main(["mask", "--out", str(tmp_path / "c.jpg"), "--circle", "20", "20", "9"]) == 1
    assert "c.jpg" in capsys.readouterr().err and not (tmp_path / "c.jpg").exists()


# --- item 7: several slices per series, never silently replaced ----------------------------------------------

def test_slice_choices_parse():
    assert parse_slices(None) is None and parse_slices("middle") is None
    assert parse_slices(7) == (7,) and parse_slices("all") == "all"
    assert parse_slices("5-8") == (5, 6, 7, 8) and parse_slices("3,5,9-11") == (3, 5, 9, 10, 11)
    for bad in ("x", "-3", "9-5", "1,,2", "2.5"):
        with pytest.raises(MedDiffError, match="slice"):
            parse_slices(bad)


def test_series_slices_all_ranges_and_lists_are_named_by_slice(testdata, tmp_path):
    series = str(testdata.joinpath(*ADC))
    out = tmp_path / "out"
    folder = out / "embedding" / "images"
    result = prepare_images(ImportOptions(inputs=(series,), out=str(out), slice_index="3,5,17-18"))
    assert not result.failures
    assert sorted(p.name for p in folder.iterdir()) == [f"images_0001_s{z:03d}.png" for z in (3, 5, 17, 18)]
    assert sorted(r.slice for r in result.rows) == ["17", "18", "3", "5"]
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    # another choice into the same folder: the earlier outputs stay, a slice made before is not made again
    again = prepare_images(ImportOptions(inputs=(series,), out=str(out), slice_index="5-6"))
    assert (again.processed, again.skipped) == (1, 1)
    assert all((folder / name).read_bytes() == data for name, data in first.items())
    middle = prepare_images(ImportOptions(inputs=(series,), out=str(out)))  # the default keeps its old name
    assert [r.output for r in middle.rows] == ["embedding/images/images_0001.png"] and middle.rows[0].slice == "9"
    every = prepare_images(ImportOptions(inputs=(series,), out=str(tmp_path / "all"), slice_index="all"))
    assert len(every.rows) == 19 and {r.slice for r in every.rows} == {str(z) for z in range(19)}
    # a slice out of range fails that slice only, naming the range
    some = prepare_images(ImportOptions(inputs=(series,), out=str(tmp_path / "r"), slice_index="18-19"))
    assert [r.slice for r in some.rows] == ["18"] and "19 out of range (0..18)" in some.failures[0].error


def test_cli_slice_choice_and_the_manifest(testdata, tmp_path, capsys):
    series = str(testdata.joinpath(*ADC))
    assert main(["prepare", "images", series, "--out", str(tmp_path / "o"), "--quiet", "--slice", "9"]) == 0
    assert main(["prepare", "images", series, "--out", str(tmp_path / "o"), "--quiet", "--slice", "5"]) == 0
    assert "1 made, 0 already done" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "o" / "embedding" / "images").iterdir())
    assert names == ["images_0001_s005.png", "images_0001_s009.png"]  # slice 9 was not replaced by slice 5
    with open(tmp_path / "o" / "manifest.csv", newline="") as fh:
        rows = {r["output"]: r for r in csv.DictReader(fh)}
    assert rows["embedding/images/images_0001_s005.png"]["slice"] == "5"
    assert main(["prepare", "images", series, "--out", str(tmp_path / "o"), "--slice", "4-x"]) == 1
    assert "bad slice choice" in capsys.readouterr().err


def test_middle_and_mask_chosen_slices_do_not_replace_each_other(tmp_path):
    import SimpleITK as sitk

    vol = np.zeros((6, 12, 10), np.int16)
    vol[:] = np.arange(6)[:, None, None] * 100 + np.arange(10)[None, None, :]
    mask = np.zeros_like(vol, dtype=np.uint8)
    mask[1, 3:6, 3:6] = 1
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "v" / "case.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "m" / "case.mha"))
    out = str(tmp_path / "out")
    first = prepare_images(ImportOptions(inputs=(str(tmp_path / "v"),), out=out))
    assert first.rows[0].slice == "3"
    made = (tmp_path / "out" / first.rows[0].output).read_bytes()
    with pytest.raises(MedDiffError, match="chooses the slice by mask and would replace it"):
        prepare_images(ImportOptions(inputs=(str(tmp_path / "v"),), out=out, mask=str(tmp_path / "m")))
    assert (tmp_path / "out" / first.rows[0].output).read_bytes() == made
    with pytest.raises(MedDiffError, match="either by --slice or by --mask"):
        prepare_images(ImportOptions(inputs=(str(tmp_path / "v"),), out=out, mask=str(tmp_path / "m"),
                                     slice_index="2"))
    # chosen slices of a volume: named by slice next to the middle one
    chosen = prepare_images(ImportOptions(inputs=(str(tmp_path / "v"),), out=out, slice_index="0,5"))
    assert sorted(r.output.rsplit("/", 1)[1] for r in chosen.rows) == ["images_0001_s000.png", "images_0001_s005.png"]
    assert (tmp_path / "out" / first.rows[0].output).read_bytes() == made


# --- item 13: the Inpaint tab's union ---------------------------------------------------------------------

def _inpaint_parts(tmp_path):
    import gradio as gr

    from medical_diffusion.ui import tab_inpaint
    from medical_diffusion.ui.context import UIContext

    class _Model:
        text_width = 32

    with gr.Blocks():
        return tab_inpaint.build(UIContext(backend_factory=_Model, work_dir=tmp_path,
                                           embeddings_dir=tmp_path / "emb", loaded_text_width=lambda: None))


def test_add_shape_to_the_union_does_not_duplicate_the_current_shape(tmp_path):
    parts = _inpaint_parts(tmp_path)
    img, src = Image.new("RGB", (100, 100)), {"size": [100, 100]}
    geo = ["px", 0, 0, 50, 50, 10, 10, 0, 0, False]
    stored = parts["on_add"](src, [], *geo)
    assert len(stored) == 1
    text = parts["render"](img, src, stored, *geo)[1]
    assert "shape 1" in text and "shape 2" not in text  # the added shape, shown once
    assert parts["on_add"](src, stored, *geo) == stored  # adding it again changes nothing
    moved = parts["render"](img, src, stored, "px", 0, 0, 20, 20, 5, 5, 0, 0, False)
    assert "shape 2: 10.0 x 10.0 px" in moved[1] and len(moved[3].shapes) == 2
    assert len(parts["on_add"](src, stored, "px", 0, 0, 20, 20, 5, 5, 0, 0, False)) == 2


def test_tab_overlay_and_inpaint_input_use_the_prepare_geometry(testdata, tmp_path):
    from upload_support import gradio_upload

    from medical_diffusion.ui.tab_inpaint import click_to_source

    series = sorted(testdata.joinpath(*ADC).glob("*.dcm"))
    parts = _inpaint_parts(tmp_path)
    img, src, _shapes, spx, spy, unit, cx, cy, rx, ry = parts["on_load"](gradio_upload(*series, file_count="multiple"), -1)
    assert img.size == (84, 128) and (spx, spy) == pytest.approx((2.0, 2.0)) and unit == "mm"
    overlay, text, res, spec = parts["render"](img, src, [], unit, spx, spy, 84, 128, 5, 5, 0, 0, False)
    assert "shape 1: 10.0 x 10.0 mm" in text
    assert overlay.size == (512, 512) and not np.asarray(overlay)[100:400, :80].any()  # padded, not stretched
    dx, dy, _, _ = diameters_px(res.mask)
    assert dx * 0.5 == pytest.approx(10, rel=0.03) and dy * 0.5 == pytest.approx(10, rel=0.03)
    # a click on the overlay's centre of the circle gives back its centre in mm
    assert click_to_source(257.5, 257.5, spec.geometry(), "mm", (2.0, 2.0)) == pytest.approx((84, 128))
    # inpainting gets the slice as prepare makes it; "Send to img2img" gives it on its own grid
    fitted, fitted_mask = parts["fitted_image_and_mask"](img, src, [], unit, spx, spy, 84, 128, 5, 5, 0, 0, False)
    assert fitted.size == fitted_mask.size == (512, 512) and np.array_equal(np.asarray(fitted_mask), res.mask)
    assert not np.asarray(fitted)[:, :88].any() and np.asarray(fitted)[:, 88:424].any()
    native, native_mask = parts["image_and_mask"](img, src, [], unit, spx, spy, 84, 128, 10, 10, 0, 0, False)
    assert native is img and native_mask.size == (84, 128)
    dx, dy, cx, cy = diameters_px(np.asarray(native_mask))
    assert dx * 2 == pytest.approx(20, rel=0.1) and dy * 2 == pytest.approx(20, rel=0.1)  # 10 px of 2 mm
    assert (cx, cy) == pytest.approx((42, 64), abs=0.5)
    picture = read_image_input(testdata.joinpath(*ADC)).fitted()
    prepared = prepare_images(ImportOptions(inputs=(str(testdata.joinpath(*ADC)),), out=str(tmp_path / "p")))
    np.testing.assert_array_equal(np.asarray(picture.convert("L")),
                                  np.asarray(Image.open(tmp_path / "p" / prepared.rows[0].output)))


# --- item 6, inpaint: DICOM file, series and volume as --image ----------------------------------------------

@pytest.fixture
def reuse_tiny(tiny_backend, monkeypatch):
    import medical_diffusion.generation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny_backend)


def test_inpaint_takes_dicom_series_and_volume_images(testdata, tmp_path, reuse_tiny):
    import torch

    from medical_diffusion.embeddings import Embedding, save_embedding

    emb = tmp_path / "emb"
    save_embedding(Embedding(name="sick", vectors=torch.zeros(2, 32)), emb / "sick.pt")
    series = testdata.joinpath(*ADC)
    one = sorted(series.glob("*.dcm"))[0]
    local = tmp_path / "1-10.dcm"
    shutil.copyfile(one, local)
    mha = next((testdata / "picai_sample" / "images" / "10795").glob("*_adc.mha"))
    assert main(["mask", "--unit", "mm", "--spacing-from", str(series), "--circle", "84", "128", "20",
                 "--target-size", "64", "64", "--out", str(tmp_path / "m")]) == 0
    for i, extra in enumerate((["--image", str(local)], ["--image", str(series)],
                               ["--image", str(mha), "--slice", "9"])):
        out = tmp_path / f"inp{i}"
        assert main(["inpaint", "--model", "tiny", "--embeddings-dir", str(emb), *extra, "--mask",
                     str(tmp_path / "m.json"), "--prompt", "sick", "--steps", "1", "--width", "64", "--height", "64",
                     "--padding", "4", "--out", str(out)]) == 0
        record = json.loads((out / "inpaint.json").read_text())
        got = np.asarray(Image.open(out / record["results"][0]["file"]).convert("L"))
        assert got.shape == (64, 64)
        # the 84 x 128 slice lies on the 64 px grid as prepare puts it: 42 columns wide, 11 black ones each side
        assert not got[:, :11].any() and not got[:, 53:].any() and got[:, 11:53].any()
