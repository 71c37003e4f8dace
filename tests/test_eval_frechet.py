"""Fréchet distance and bootstrap CI: exactness against float64 references, and CI behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation.bootstrap import bootstrap_frechet
from medical_diffusion.evaluation.frechet import (GaussianStats, frechet_distance, frechet_distance_from_stats,
                                                  trace_sqrt_product_features)


def scipy_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook FD in float64: means, ddof=1 covariances, scipy sqrtm (real part)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def correlated(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix) * scale + shift + rng.standard_normal(d) * 0.1


@pytest.mark.parametrize("n1,n2,d", [(300, 250, 40), (120, 120, 120), (500, 600, 8), (60, 90, 200), (40, 30, 256)])
def test_matches_float64_scipy_reference(n1, n2, d):
    rng = np.random.default_rng(n1 * 7 + d)
    x = correlated(rng, n1, d)
    y = correlated(rng, n2, d, shift=0.2, scale=1.3)
    ours = frechet_distance(x, y)
    ref = scipy_reference(x, y)
    # scipy's sqrtm of a singular product (n < d) is itself only accurate to ~1e-8 relative
    assert ours == pytest.approx(ref, rel=1e-7)
    stats = frechet_distance_from_stats(GaussianStats.from_features(x), GaussianStats.from_features(y))
    assert stats == pytest.approx(ours, rel=1e-7)


@pytest.mark.parametrize("n1,n2,d", [(400, 300, 64), (50, 70, 128)])
def test_matches_pytorch_fid(n1, n2, d):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(d)
    x = np.abs(correlated(rng, n1, d))  # non-negative like pool features
    y = np.abs(correlated(rng, n2, d, shift=0.1))
    ref = fid_score.calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_identical_sets_give_zero_and_order_does_not_matter():
    rng = np.random.default_rng(3)
    x = correlated(rng, 80, 150)
    assert abs(frechet_distance(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance(x, x[::-1])) < 1e-9 * np.trace(np.cov(x, rowvar=False))
    y = correlated(rng, 70, 150, shift=1.0)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)


def test_trace_term_uses_nuclear_norm_of_cross_product():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 50)), rng.standard_normal((25, 50))
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(xc @ yc.T, "nuc") / np.sqrt(19 * 24)
    assert trace_sqrt_product_features(xc, yc) == pytest.approx(expected, rel=1e-12)


def test_stats_roundtrip_and_bad_input(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 6))
    path = GaussianStats.from_features(x).save(tmp_path / "s.npz")
    loaded = GaussianStats.load(path)
    assert loaded.n == 30 and np.allclose(loaded.sigma, np.cov(x, rowvar=False))
    with pytest.raises(MedDiffError, match="feature sizes differ"):
        frechet_distance(x, rng.standard_normal((30, 7)))
    with pytest.raises(MedDiffError, match="at least 2"):
        frechet_distance(x[:1], x)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(MedDiffError, match="bad.npz"):
        GaussianStats.load(tmp_path / "bad.npz")


def test_bootstrap_repetitions_equal_explicit_resampling():
    rng = np.random.default_rng(6)
    x, y = correlated(rng, 40, 60), correlated(rng, 50, 60, shift=0.3)
    res = bootstrap_frechet(x, y, reps=4, seed=11)
    draw = np.random.default_rng(11)
    for r in range(4):
        i1, i2 = draw.integers(0, 40, 40), draw.integers(0, 50, 50)
        assert res.samples[r] == pytest.approx(frechet_distance(x[i1], y[i2]), rel=1e-9)
    gen_only = bootstrap_frechet(x, y, reps=3, seed=2, resample="generated")
    draw = np.random.default_rng(2)
    for r in range(3):
        assert gen_only.samples[r] == pytest.approx(frechet_distance(x, y[draw.integers(0, 50, 50)]), rel=1e-9)
    assert gen_only.resampled == "generated"


def test_bootstrap_direct_path_equals_gram_path(monkeypatch):
    from medical_diffusion.evaluation import bootstrap

    rng = np.random.default_rng(7)
    x, y = correlated(rng, 30, 20), correlated(rng, 35, 20, shift=0.5)  # n > d
    a = bootstrap_frechet(x, y, reps=5, seed=1)
    monkeypatch.setattr(bootstrap, "_GRAM_LIMIT", 0)
    b = bootstrap_frechet(x, y, reps=5, seed=1)
    assert np.allclose(a.samples, b.samples, rtol=1e-9)


def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(8)
    x, y = correlated(rng, 300, 16), correlated(rng, 300, 16, shift=0.3)
    res = bootstrap_frechet(x, y, reps=200, seed=3)
    assert res.low < res.point < res.high
    assert res.reps == 200 and res.confidence == 0.95 and res.resampled == "both"
    again = bootstrap_frechet(x, y, reps=200, seed=3)
    assert (again.low, again.high) == (res.low, res.high)
    other = bootstrap_frechet(x, y, reps=200, seed=4)
    assert (other.low, other.high) != (res.low, res.high)
    d = res.to_dict()
    assert "samples" not in d and d["point"] == res.point
    calls = []
    bootstrap_frechet(x, y, reps=5, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (5, 5) and len(calls) == 5


def test_bootstrap_rejects_bad_options():
    x = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(MedDiffError, match="resample"):
        bootstrap_frechet(x, x, resample="real")
    with pytest.raises(MedDiffError, match="reps"):
        bootstrap_frechet(x, x, reps=0)
