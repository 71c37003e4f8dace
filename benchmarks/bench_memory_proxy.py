"""CPU proxy for the GPU memory work: this trainer's 512-px SD2 step with bf16 weights, peak RSS reported.

Run by hand (not a test; about 10 GB of RAM and a few minutes a step on 2 cores)::

    python benchmarks/bench_memory_proxy.py                       # bf16 weights, gradient checkpointing, 3 steps
    python benchmarks/bench_memory_proxy.py --no-checkpointing    # the same without checkpointing
    python benchmarks/bench_memory_proxy.py --precision fp32 --steps 2

The model is the real SD2 architecture with random weights (the configs shipped with the package),
64 vectors, batch 1, on the CPU, trained by ``training.loop.train`` itself. Peak RSS is sampled during
the whole run (model, latent caching and steps) and also for the steps alone; the baseline RSS before
the model is built is reported so the model's own share can be read off. A CPU is no GPU: the
allocator and kernels differ, so this judges the *direction* of a memory change (checkpointing,
precision, VAE offload), not the number an 8 GB card would show.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402  (puts extension/ on sys.path too)
from bench_train_step import PeakRSS, make_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=3, help="training steps (the first is the warm-up)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    import torch

    from bench_train_step import run_meddiff
    from medical_diffusion.devices import weight_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with PeakRSS() as base:
        pass
    t0 = time.perf_counter()
    with PeakRSS() as whole:
        modules = gpu_check.build_modules("sd2", device)
        backend = gpu_check.make_backend(modules, device, weight_dtype(device, args.precision), "random SD2")
        del modules
        built = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="memory-proxy-") as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            make_images(data, 2, args.resolution)
            res = run_meddiff(backend, data, args.steps, args.resolution, Path(tmp),
                              gradient_checkpointing=not args.no_checkpointing)
    times = res["times"]
    timed = times[1:] if len(times) > 1 else times
    out = {"precision": args.precision, "gradient_checkpointing": not args.no_checkpointing,
           "resolution": args.resolution, "steps": len(times), "threads": torch.get_num_threads(),
           "s_per_step": sum(timed) / len(timed), "first_step_s": times[0], "build_s": built,
           "latent_cache_s": res["setup"], "baseline_rss_gib": base.peak / 2**30,
           "peak_rss_gib": whole.peak / 2**30, "peak_rss_during_training_gib": res["peak"] / 2**30}
    print(json.dumps(out, indent=2))
    print(f"\nSD2 architecture (random weights), {args.resolution} px, batch 1, 64 vectors, CPU, "
          f"{args.precision} weights, gradient checkpointing {'on' if out['gradient_checkpointing'] else 'off'}: "
          f"{out['s_per_step']:.1f} s/step (mean of {len(timed)}), peak RSS {out['peak_rss_gib']:.2f} GiB "
          f"(baseline {out['baseline_rss_gib']:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
