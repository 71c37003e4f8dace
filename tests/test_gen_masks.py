from __future__ import annotations

import json

import numpy as np
import pytest

from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.masks import (
    MaskShape,
    MaskSpec,
    overlay_preview,
    read_source_geometry,
    render_mask,
)


def _extent(mask, axis):
    on = (mask > 127).any(axis=axis)
    idx = np.flatnonzero(on)
    return idx[-1] - idx[0] + 1, (idx[0] + idx[-1]) / 2


def test_circle_in_mm_with_anisotropic_spacing_is_round_in_mm():
    # 300 x 150 source pixels of 0.5 x 1.0 mm = 150 x 150 mm, stretched to 512 x 512
    spec = MaskSpec([MaskShape.circle(75.0, 60.0, 20.0)], unit="mm", source_size=(300, 150),
                    spacing=(0.5, 1.0), target_size=(512, 512), fit="stretch")
    res = render_mask(spec)
    mm_per_px = 150 / 512
    assert res.target_spacing == pytest.approx((mm_per_px, mm_per_px))
    width, cx = _extent(res.mask, 0)
    height, cy = _extent(res.mask, 1)
    assert width * mm_per_px == pytest.approx(40, abs=2 * mm_per_px)
    assert height * mm_per_px == pytest.approx(40, abs=2 * mm_per_px)
    # centre 75 mm -> source column 150 (centre at 150), row 60
    assert (cx + 0.5) * 300 / 512 - 0.5 == pytest.approx(150, abs=1)
    assert (cy + 0.5) * 150 / 512 - 0.5 == pytest.approx(60, abs=1)
    area_mm2 = (res.mask > 127).sum() * mm_per_px**2
    assert area_mm2 == pytest.approx(np.pi * 20**2, rel=0.03)
    assert res.shape_sizes_mm[0] == pytest.approx((40, 40))


def test_same_circle_in_pixels_is_stretched_by_non_square_pixels():
    spec = MaskSpec([MaskShape.circle(150, 75, 40)], unit="px", source_size=(300, 150), target_size=(512, 512),
                    fit="stretch")
    res = render_mask(spec)
    width, _ = _extent(res.mask, 0)
    height, _ = _extent(res.mask, 1)
    assert width == pytest.approx(80 * 512 / 300, abs=2)
    assert height == pytest.approx(80 * 512 / 150, abs=2)


def test_rotation_union_invert_feather_and_small_warning():
    base = dict(unit="px", source_size=(100, 100), target_size=(100, 100))
    ell = render_mask(MaskSpec([MaskShape((50, 50), (30, 10), 0.0)], **base)).mask
    rot = render_mask(MaskSpec([MaskShape((50, 50), (30, 10), 90.0)], **base)).mask
    assert _extent(ell, 0)[0] == pytest.approx(61, abs=1) and _extent(ell, 1)[0] == pytest.approx(21, abs=1)
    assert _extent(rot, 0)[0] == pytest.approx(21, abs=1) and _extent(rot, 1)[0] == pytest.approx(61, abs=1)
    both = render_mask(MaskSpec([MaskShape((50, 50), (30, 10), 0.0), MaskShape((50, 50), (30, 10), 90.0)], **base))
    assert np.array_equal(both.mask, np.maximum(ell, rot))
    inv = render_mask(MaskSpec([MaskShape((50, 50), (30, 10), 0.0)], invert=True, **base)).mask
    assert np.array_equal(inv, 255 - ell)
    soft = render_mask(MaskSpec([MaskShape.circle(50, 50, 20)], feather=10, **base)).mask
    row = soft[50, 50:].astype(int)
    assert row[0] == 255 and row[40] == 0 and 0 < row[20] < 255  # ramp over the edge
    assert np.all(np.diff(row) <= 0)
    assert set(np.unique(ell)) == {0, 255}
    tiny = render_mask(MaskSpec([MaskShape.circle(50, 50, 3)], **base))
    assert any("latent cell" in w for w in tiny.warnings)
    assert not render_mask(MaskSpec([MaskShape.circle(50, 50, 10)], **base)).warnings


def test_feather_in_mm_uses_physical_distance():
    spec = MaskSpec([MaskShape.circle(50.0, 50.0, 20.0)], unit="mm", source_size=(200, 100),
                    spacing=(0.5, 1.0), target_size=(200, 200), feather=10.0, fit="stretch")
    m = render_mask(spec).mask.astype(float)
    # 0.5 mm per target pixel on both axes: the 10 mm ramp spans 20 px horizontally and vertically
    ramp_x = np.flatnonzero((m[100, 100:] > 0) & (m[100, 100:] < 255)).size
    ramp_y = np.flatnonzero((m[100:, 100] > 0) & (m[100:, 100] < 255)).size
    assert ramp_x == pytest.approx(20, abs=2) and ramp_y == pytest.approx(20, abs=2)


def test_bad_specs_are_rejected_clearly():
    with pytest.raises(MedDiffError, match="spacing"):
        render_mask(MaskSpec([MaskShape.circle(1, 1, 1)], unit="mm"))
    with pytest.raises(MedDiffError, match="radii"):
        render_mask(MaskSpec([MaskShape((1, 1), (0, 1))]))
    with pytest.raises(MedDiffError, match="at least one"):
        render_mask(MaskSpec([]))


def test_spec_json_round_trip_and_overlay():
    spec = MaskSpec([MaskShape((10.0, 12.0), (5.0, 3.0), 30.0)], unit="mm", source_size=(64, 64),
                    spacing=(0.7, 0.7), target_size=(128, 128), feather=1.0)
    again = MaskSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec
    res = render_mask(spec)
    img = overlay_preview(None, res, spec)
    assert img.size == (128, 128)
    assert np.asarray(img)[res.mask > 200][:, 0].mean() > 50  # red tint where repainted


def test_spacing_from_real_dicom(testdata):
    geo = read_source_geometry(testdata / "cxr" / "siim_cr_chest_pa_monochrome2.dcm")
    assert geo.size == (1024, 1024) and geo.spacing == pytest.approx((0.168, 0.168))
    vol = read_source_geometry(next((testdata / "picai_sample" / "images" / "10795").glob("*_adc.mha")))
    assert vol.size == (84, 128) and vol.spacing == pytest.approx((2.0, 2.0))
    series = read_source_geometry(testdata / "dicom_series" / "ProstateX-0000_adc")
    assert series.size == (84, 128) and series.spacing is not None and min(series.spacing) > 0
    with pytest.raises(MedDiffError, match="no such file"):
        read_source_geometry(testdata / "missing.dcm")


def test_plain_picture_needs_no_simpleitk(monkeypatch, tmp_path):
    """The Inpaint tab reads a PNG's grid and preview without SimpleITK (a webui with --skip-install)."""
    import sys

    from PIL import Image

    from medical_diffusion.generation import masks as masks_module

    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    path = tmp_path / "case.png"
    Image.new("L", (64, 48), 100).save(path)
    assert masks_module.read_source_geometry(path) == masks_module.SourceGeometry((64, 48), None)
    assert masks_module.load_source_image(path).size == (64, 48)
