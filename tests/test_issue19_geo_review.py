"""Issue 19 item 2, review findings: millimetre masks on the image's own grid (a manifest's spacing on a
generated image of another size), inpaint lays the image on the grid its mask was drawn on, label masks
binarised, --crop-nonzero outputs refused for source-grid masks, the webui gets the fitted picture, and
bounded --slice / --target-size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medical_diffusion.cli import main
from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images
from medical_diffusion.errors import MedDiffError

ADC = ("dicom_series", "ProstateX-0000_adc")


def _diameters_px(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Diameters (x, y) of a filled disk from its second moments (4 sigma), and its centroid."""
    ys, xs = np.nonzero(mask > 127)
    return 4 * xs.std(), 4 * ys.std(), xs.mean(), ys.mean()


@pytest.fixture
def prepared_adc(testdata, tmp_path):
    series = testdata.joinpath(*ADC)
    result = prepare_images(ImportOptions(inputs=(str(series),), out=str(tmp_path / "out")))
    assert not result.failures
    return series, tmp_path / "out", result


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
    dx, dy, cx, cy = _diameters_px(np.asarray(Image.open(tmp_path / "g.png")))
    assert dx * mm_x == pytest.approx(10, rel=0.03) and dy * mm_y == pytest.approx(10, rel=0.03)
    # the same field of view: 32 mm from the corner is near 64 px of the 512 grid, whatever the image's size
    k = 512 / size  # (pixel centres: source pixel x lies at (x + 0.5) * k - 0.5)
    centre = (32 / (0.5 * k) + 0.5) * k - 0.5
    assert (cx, cy) == pytest.approx((centre, centre), abs=0.5)
    # measured on the image itself: its pixels are 512 / size times larger
    on_image = np.asarray(Image.open(tmp_path / "g.png").resize((size, size), Image.NEAREST))
    dx, dy, _, _ = _diameters_px(on_image)
    assert dx * 0.5 * 512 / size == pytest.approx(10, rel=0.03)


def test_manifest_spacing_without_an_image_is_on_the_prepared_grid(prepared_adc, tmp_path):
    _series, out, _result = prepared_adc
    assert main(["mask", "--unit", "mm", "--spacing-from", str(out / "manifest.csv"), "--circle", "32", "32", "5",
                 "--target-size", "128", "128", "--out", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["spec"]["source_size"] == [512, 512]  # the prepared images' grid, not the target size
    assert record["target_spacing_mm"] == pytest.approx([2.0, 2.0])
    dx, dy, cx, cy = _diameters_px(np.asarray(Image.open(tmp_path / "m.png")))
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
