"""``meddiff demo``: the whole workflow headless on the embedded default, with an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run prepare -> train -> interpolate -> generate -> evaluate on a tiny model and phantoms",
        description="Run the whole workflow headless on an embedded default: a tiny random-weight model "
                    "and synthetic phantom scans. Writes OUT/report.html. Resumable.")
    p.add_argument("--out", default="meddiff-demo", help="output folder (default: ./meddiff-demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps per embedding (default: 60)")
    p.add_argument("--cases", type=int, default=12, help="phantom cases per class, split 1:1:1 into train/val/test (default: 12)")
    p.add_argument("--seed", type=int, default=0)
    from medical_diffusion.devices import add_device_arguments

    add_device_arguments(p, attention=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medical_diffusion.demo.pipeline import DemoOptions, run_demo
    from medical_diffusion.devices import runtime_from_args
    from medical_diffusion.errors import MedDiffError

    if args.cases < 3:
        raise MedDiffError(f"--cases must be at least 3 (one per train/val/test split), got {args.cases}")
    runtime = runtime_from_args(args)
    report = run_demo(DemoOptions(out=Path(args.out), train_steps=args.steps, cases_per_class=args.cases,
                                  split_per_class=args.cases // 3, seed=args.seed, device=runtime.device,
                                  dtype=runtime.dtype, attention=runtime.attention))
    print(f"report: {report}")
    return 0
