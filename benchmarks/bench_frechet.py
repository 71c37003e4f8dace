"""Fréchet distance and bootstrap speed: this package vs pytorch-fid's scipy ``sqrtm`` path.

Run by hand:  python benchmarks/bench_frechet.py [--n 1000] [--d 2048] [--reps 1000]

Both sides get the same float64 features (n real x d, n generated x d, non-negative like
Inception pool features) and each is timed once. pytorch-fid's per-distance time includes its
``np.cov`` calls (it needs mean/covariance first). Its 1000-rep bootstrap is not run (it would
take hours); that row is its per-distance time x reps and says so. Goals (issue 6): >= 30x per
distance; 1000 bootstrap reps < 5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extension"))

from medical_diffusion.evaluation.bootstrap import bootstrap_frechet  # noqa: E402
from medical_diffusion.evaluation.frechet import (GaussianStats, frechet_distance,  # noqa: E402
                                                  frechet_distance_from_stats)


def features(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    mix = rng.standard_normal((64, d)) / 8.0  # low-rank structure plus noise, then ReLU
    return np.maximum(rng.standard_normal((n, 64)) @ mix + 0.3 * rng.standard_normal((n, d)) + shift, 0.0)


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(args.seed)
    x, y = features(rng, args.n, args.d, 0.2), features(rng, args.n, args.d, 0.25)
    print(f"features: {args.n} x {args.d} (real) and {args.n} x {args.d} (generated), float64; "
          f"cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}")

    def pytorch_fid():
        mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
        mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
        return calculate_frechet_distance(mu1, s1, mu2, s2)

    ref, t_ref = timed(pytorch_fid)
    ours, t_ours = timed(lambda: frechet_distance(x, y))
    st1, st2 = GaussianStats.from_features(x), GaussianStats.from_features(y)
    ours_stats, t_stats = timed(lambda: frechet_distance_from_stats(st1, st2))
    boot, t_boot = timed(lambda: bootstrap_frechet(x, y, reps=args.reps, seed=args.seed))

    rows = [
        ("distance: pytorch-fid (np.cov + scipy sqrtm)", t_ref, ref, "1.0x"),
        ("distance: ours, features (nuclear norm)", t_ours, ours, f"{t_ref / t_ours:.1f}x"),
        ("distance: ours, mean/cov only (eigenvalues)", t_stats, ours_stats, f"{t_ref / t_stats:.1f}x"),
        (f"bootstrap {args.reps} reps: ours", t_boot, boot.point, f"{t_ref * args.reps / t_boot:.1f}x"),
        (f"bootstrap {args.reps} reps: pytorch-fid (estimated = {args.reps} x distance)", t_ref * args.reps,
         float("nan"), "1.0x"),
    ]
    print(f"\n{'what':<70} {'seconds':>10} {'value':>14} {'speed-up':>9}")
    for name, sec, val, ratio in rows:
        print(f"{name:<70} {sec:>10.3f} {val:>14.6f} {ratio:>9}")
    rel = abs(ours - ref) / abs(ref)
    print(f"\nrelative difference ours vs pytorch-fid: {rel:.2e} (goal <= 1e-6)")
    print(f"bootstrap: {boot}  (95% percentile CI, resampled: {boot.resampled}); "
          f"{t_boot / args.reps * 1000:.0f} ms per repetition")
    print(f"goals: per-distance speed-up {t_ref / t_ours:.1f}x (>= 30x: {'met' if t_ref / t_ours >= 30 else 'NOT met'}); "
          f"bootstrap {t_boot / 60:.1f} min (< 5 min: {'met' if t_boot < 300 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
