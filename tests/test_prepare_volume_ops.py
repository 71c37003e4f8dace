"""Volume operations of the PI-CAI paper mode, and class-balanced / patient-disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medical_diffusion.datasets import volume_ops as vo
from medical_diffusion.datasets.splits import Candidate, balanced_sample, patient_disjoint_splits
from medical_diffusion.errors import MedDiffError


def _image(arr, spacing, direction=None, origin=(3.0, -2.0, 7.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_resampled_size_uses_half_to_even_rounding():
    img = _image(np.zeros((5, 3, 5), np.uint16), (0.7, 1.0, 3.0))  # x: 5*0.7/0.5 = 7; y: 3*1/0.5=6; z: 5
    assert vo.resampled_size(img, (3.0, 0.5, 0.5)) == [7, 6, 5]
    img = _image(np.zeros((5, 5, 5), np.uint16), (0.5, 0.5, 1.5))  # z: 5 * 1.5 / 3 = 2.5 -> 2 (half to even)
    assert vo.resampled_size(img, (3.0, 0.5, 0.5))[2] == 2
    img = _image(np.zeros((7, 5, 5), np.uint16), (0.5, 0.5, 1.5))  # z: 3.5 -> 4
    assert vo.resampled_size(img, (3.0, 0.5, 0.5))[2] == 4


def test_crop_or_pad_formulas():
    a = np.arange(5 * 7 * 4).reshape(5, 7, 4)
    out = vo.center_crop_or_pad(a, (2, 4, 9))
    assert out.shape == (2, 4, 9)
    # z: crop start floor((5-2)/2)=1; y: start floor(3/2)=1; x: pad d=5 -> (2, 3)
    np.testing.assert_array_equal(out[:, :, 2:6], a[1:3, 1:5, :])
    assert out[:, :, :2].max() == 0 and out[:, :, 6:].max() == 0
    assert vo.crop_or_pad_offsets((5, 7, 4), (2, 4, 9)) == [1, 1, -2]


GEOMETRIES = [  # (array shape zyx, spacing xyz)
    ((6, 21, 17), (2.0, 1.7, 3.6)),
    ((19, 30, 30), (0.5, 0.5, 3.0)),  # identity in-plane: every value lands on an integer
    ((12, 16, 11), (2.0, 2.0, 2.999999974910729)),  # 4x upsampling: half-voxel edge planes
    ((5, 9, 13), (1.75, 0.3, 3.3)),  # few slices: the full causal initialisation
]


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_itk_bspline_is_bit_exact(dtype, geometry):
    from medical_diffusion.datasets import itk_bspline as ib

    shape, spacing = geometry
    rng = np.random.default_rng(sum(shape))
    hi = 250 if dtype == np.uint8 else 3000
    arr = (rng.random(shape) * hi - (800 if dtype == np.int16 else 0)).astype(dtype)
    direction = sitk.VersorRigid3DTransform((0.1, -0.05, 0.02, 1.0)).GetMatrix()
    img = _image(arr, spacing, direction, origin=(-118.95, -65.84, -33.37))
    ref = vo.resample_array(img, (3.0, 0.5, 0.5))
    grid = ib.SameDirectionGrid(img, (0.5, 0.5, 3.0), vo.resampled_size(img, (3.0, 0.5, 0.5)))
    zz, yy, xx = (a.ravel() for a in np.meshgrid(*[np.arange(n) for n in ref.shape], indexing="ij"))
    values, inside = ib.evaluate(ib.coefficients(arr), grid, zz, yy, xx)
    got = np.where(inside, ib.cast(values, dtype), 0).astype(dtype).reshape(ref.shape)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fast_paper_slice_equals_simpleitk(geometry):
    shape, spacing = geometry
    rng = np.random.default_rng(len(shape) + shape[0])
    arr = (rng.gamma(2.0, 300.0, shape)).astype(np.uint16)
    img = _image(arr, spacing, sitk.VersorRigid3DTransform((0.03, 0.1, -0.02, 1.0)).GetMatrix())
    crop = (8, 24, 20)
    for z in range(crop[0]):
        fast = vo.normalised_crop_slice(img, (3.0, 0.5, 0.5), crop, z, "fast")
        slow = vo.normalised_crop_slice(img, (3.0, 0.5, 0.5), crop, z, "sitk")
        assert fast.shape == (24, 20)
        np.testing.assert_array_equal(fast, slow)


def test_fast_paper_slice_falls_back_for_float_images():
    from medical_diffusion.datasets.fast_paper_slice import fast_normalised_crop_slice

    img = _image(np.random.default_rng(0).random((6, 10, 10)).astype(np.float32), (1.0, 1.0, 3.0))
    assert fast_normalised_crop_slice(img, (3.0, 0.5, 0.5), (6, 20, 20), 2) is None
    np.testing.assert_array_equal(vo.normalised_crop_slice(img, (3.0, 0.5, 0.5), (6, 20, 20), 2, "fast"),
                                  vo.normalised_crop_slice(img, (3.0, 0.5, 0.5), (6, 20, 20), 2, "sitk"))


def test_minmax_and_truncating_uint8():
    v = np.array([[[2, 4], [6, 10]]], np.uint16)
    n = vo.minmax_normalise(v)
    assert n.min() == 0 and n.max() == 1 and n[0, 0, 1] == 0.25
    assert vo.to_uint8_truncating([n[0]]).tolist() == [[0, 63], [127, 255]]  # 63.75 -> 63, 127.5 -> 127
    with pytest.raises(ValueError):
        vo.minmax_normalise(np.ones((2, 2, 2)))


def test_cropped_reference_geometry():
    img = _image(np.zeros((10, 40, 40), np.uint16), (0.5, 0.5, 3.0))
    ref = vo.cropped_reference(img, (4, 20, 60))
    assert ref.GetSize() == (60, 20, 4)
    # crop start (10, 3) in y/z, pad 10 in x: reference index 0 is input index (-10, 10, 3)
    np.testing.assert_allclose(ref.GetOrigin(), img.TransformContinuousIndexToPhysicalPoint((-10.0, 10.0, 3.0)))


def _cands(n_patients=30, per_patient=2):
    return [Candidate(f"p{p}_s{s}", "pos" if (p + s) % 3 == 0 else "neg", f"p{p}")
            for p in range(n_patients) for s in range(per_patient)]


def test_balanced_sample_is_seeded_and_balanced():
    c = _cands()
    a = balanced_sample(c, 5, seed=3)
    assert sorted(x.label for x in a) == ["neg"] * 5 + ["pos"] * 5
    assert a == balanced_sample(list(reversed(c)), 5, seed=3)
    assert a != balanced_sample(c, 5, seed=4)
    with pytest.raises(MedDiffError, match="only"):
        balanced_sample(c, 100, seed=0)


def test_patient_disjoint_splits():
    c = _cands()
    splits = patient_disjoint_splits(c, 4, ("neg", "pos"), ("train", "val", "test"), seed=7)
    groups = {s: {x.group for x in items} for s, items in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    for items in splits.values():
        assert sorted(x.label for x in items) == ["neg"] * 4 + ["pos"] * 4
    assert splits == patient_disjoint_splits(c, 4, ("neg", "pos"), ("train", "val", "test"), seed=7)
    with pytest.raises(MedDiffError, match="not enough"):
        patient_disjoint_splits(c, 30, ("neg", "pos"), ("train", "val", "test"), seed=7)
