from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.inpainting import (
    blur_mask,
    expand_crop_region,
    get_crop_region,
    inpaint,
    inpaint_grid,
)
from test_gen_fake_backend import FakeBackend

EMB = {"sick": torch.randn(3, 16, generator=torch.Generator().manual_seed(2))}


def _image(size=96):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _mask(size=96, box=(40, 30, 60, 50)):
    m = np.zeros((size, size), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("fill", ["original", "latent noise", "fill", "latent nothing"])
@pytest.mark.parametrize("only_masked", [True, False])
def test_unmasked_pixels_unchanged_after_paste_back(fill, only_masked):
    fb = FakeBackend()
    image, mask = _image(), _mask()
    size = 64 if only_masked else 96
    res = inpaint(fb, image, mask, "sick", embeddings=EMB, seed=1, steps=4, cfg_scale=2.0, fill=fill,
                  mask_blur=2, only_masked=only_masked, padding=8, width=size, height=size,
                  denoising_strength=1.0)
    out = np.asarray(res.image)
    keep = np.asarray(res.mask_for_overlay) == 0
    assert out.shape == np.asarray(image).shape
    assert np.array_equal(out[keep], np.asarray(image)[keep])
    inside = np.asarray(mask) == 255
    assert not np.array_equal(out[inside], np.asarray(image)[inside])  # the masked area was repainted
    assert keep.sum() > 0.8 * keep.size


def test_inpainting_is_deterministic_and_seed_dependent():
    fb = FakeBackend()
    kw = dict(embeddings=EMB, steps=3, width=64, height=64, padding=4, fill="latent noise")
    a = inpaint(fb, _image(), _mask(), "sick", seed=5, **kw).image
    b = inpaint(fb, _image(), _mask(), "sick", seed=5, **kw).image
    c = inpaint(fb, _image(), _mask(), "sick", seed=6, **kw).image
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_blur_matches_opencv_gaussian_blur():
    cv2 = pytest.importorskip("cv2")
    m = np.asarray(_mask(64, (10, 20, 30, 35)))
    for sigma in (1, 4):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        ref = cv2.GaussianBlur(cv2.GaussianBlur(m, (k, 1), sigma), (1, k), sigma)
        assert np.abs(blur_mask(m, sigma).astype(int) - ref.astype(int)).max() <= 1


def test_crop_region_like_a1111():
    mask = _mask(200, (50, 60, 70, 100))
    crop = get_crop_region(mask, 10)
    assert crop == (40, 50, 80, 110)
    assert expand_crop_region(crop, 512, 512, 200, 200) == (30, 50, 90, 110)
    assert expand_crop_region((0, 0, 20, 10), 512, 512, 200, 200) == (0, 0, 20, 20)
    assert get_crop_region(Image.new("L", (8, 8))) is None


def test_bad_inputs():
    fb = FakeBackend()
    with pytest.raises(MedDiffError, match="empty"):
        inpaint(fb, _image(), Image.new("L", (96, 96)), "x", steps=2, width=64, height=64)
    with pytest.raises(MedDiffError, match="fill mode"):
        inpaint(fb, _image(), _mask(), "x", fill="bogus", steps=2, width=64, height=64)
    with pytest.raises(MedDiffError, match="mask is"):
        inpaint(fb, _image(), _mask(64), "x", steps=2, width=64, height=64)


def test_grid_shows_original_masks_and_results():
    fb = FakeBackend()
    results = [inpaint(fb, _image(), _mask(box=b), "sick", embeddings=EMB, steps=2, width=64, height=64)
               for b in [(10, 10, 30, 30), (50, 50, 80, 90)]]
    grid = inpaint_grid(_image(), results, ["a", "b"], title="fig 4")
    assert grid.size[0] > 3 * 96 and grid.size[1] > 2 * 96
