"""Feature-cache entries are checked against their digest and recomputed when they do not match."""

from __future__ import annotations

import numpy as np
import pytest

from medical_diffusion.evaluation.feature_cache import FeatureCache
from medical_diffusion.evaluation.features import FeatureExtractor
from medical_diffusion.evaluation.fid import compute_fid

from test_eval_fid import CountingNet, make_images


def _tamper(entry, change):
    """Rewrite a cache entry with altered features, keeping everything else (e.g. its digest)."""
    loaded = np.load(entry, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a bare .npy entry
        np.save(entry, change(loaded))
        return
    with loaded as data:
        fields = {k: data[k] for k in data.files}
    fields["features"] = change(fields["features"])
    with open(entry, "wb") as fh:
        np.savez(fh, **fields)


def test_tampered_cache_entries_are_recomputed_and_fid_is_right(tmp_path):
    make_images(tmp_path / "real", 8, 0)
    make_images(tmp_path / "gen", 8, 2, bright=60)
    ext = FeatureExtractor("counting", CountingNet(), 32, "w" * 64)
    expected = compute_fid(tmp_path / "real", tmp_path / "gen", ext, mode="clean").value
    cache = tmp_path / "cache"
    assert compute_fid(tmp_path / "real", tmp_path / "gen", ext, mode="clean", cache_dir=cache).value == expected
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(entries) == 16
    seen = ext.model.seen
    _tamper(entries[0], lambda f: f + 100.0)       # plausible but wrong numbers
    _tamper(entries[1], lambda f: f[:-1])          # wrong length
    entries[2].write_bytes(b"\x93NUMPY garbage")   # unreadable
    again = compute_fid(tmp_path / "real", tmp_path / "gen", ext, mode="clean", cache_dir=cache)
    assert ext.model.seen == seen + 3               # exactly the three bad entries were recomputed
    assert again.value == pytest.approx(expected, rel=1e-5)  # batching changes float noise only; +100 would not
    third = compute_fid(tmp_path / "real", tmp_path / "gen", ext, mode="clean", cache_dir=cache)
    assert ext.model.seen == seen + 3 and third.value == pytest.approx(expected, rel=1e-5)  # rewritten, reused


def test_entry_moved_to_another_image_is_rejected(tmp_path):
    cache = FeatureCache(tmp_path)
    a, b = "a" * 64, "b" * 64
    cache.put("k", a, np.arange(4, dtype=np.float32))
    assert np.array_equal(cache.get("k", a), np.arange(4, dtype=np.float32))
    src, dst = cache._path("k", a), cache._path("k", b)
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    assert cache.get("k", b) is None
    with pytest.raises(ValueError):
        cache.get("k", "../../etc")
