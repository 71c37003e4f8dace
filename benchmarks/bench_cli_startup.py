"""How fast ``meddiff`` answers ``--help`` and argument errors, against ``python -c "import torch"``.

Run by hand:  python benchmarks/bench_cli_startup.py [--runs 7] [--before GIT_REF]

Each row is a fresh interpreter (``python -m medical_diffusion ...``, what the ``meddiff`` script
runs), timed wall-clock; the median of ``--runs`` runs is shown with its ratio to importing torch
alone, measured in the same run (a busy machine slows every row alike). ``--before REF`` also times
the package as it was at that git commit (``git archive`` into a temporary folder), e.g. the commit
before the lazy imports of issue 19. Goal: under a second, with no torch/numpy/gradio import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = (
    ("meddiff --help", ["-m", "medical_diffusion", "--help"], 0),
    ("meddiff train --help", ["-m", "medical_diffusion", "train", "--help"], 0),
    ("meddiff train --steps many (argument error)", ["-m", "medical_diffusion", "train", "--steps", "many"], 2),
)
REFERENCE = ("python -c 'import torch' (reference)", ["-c", "import torch"], 0)
FLOOR = ("python -c pass (interpreter start)", ["-c", "pass"], 0)


def median_seconds(args: list[str], expected: int, runs: int, extension: Path) -> float:
    """Median wall time of ``runs`` fresh interpreters running ``args`` (each must exit ``expected``)."""
    env = {**os.environ, "PYTHONPATH": str(extension)}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expected:
            raise SystemExit(f"{' '.join(args)}: exit {done.returncode}, expected {expected}\n{done.stderr}")
    return statistics.median(times)


def export_extension(ref: str, into: Path) -> Path:
    """The ``extension/`` folder of git commit ``ref``, written under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "extension"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return into / "extension"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per row (median shown; default 7)")
    ap.add_argument("--before", metavar="GIT_REF", help="also time the package at this commit")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    print(f"python {sys.version.split()[0]}; cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}; "
          f"median of {args.runs} runs each")
    with tempfile.TemporaryDirectory() as tmp:
        trees = [("now", ROOT / "extension")]
        if args.before:
            trees.insert(0, (args.before, export_extension(args.before, Path(tmp))))
        reference = median_seconds(REFERENCE[1], REFERENCE[2], args.runs, ROOT / "extension")
        floor = median_seconds(FLOOR[1], FLOOR[2], args.runs, ROOT / "extension")
        width = max(len(c[0]) for c in (*CASES, REFERENCE, FLOOR)) + 2
        print(f"{'command':<{width}}{'package':<10}{'median s':>10}{'x torch import':>16}")
        print(f"{REFERENCE[0]:<{width}}{'':<10}{reference:>10.3f}{1.0:>16.2f}")
        print(f"{FLOOR[0]:<{width}}{'':<10}{floor:>10.3f}{floor / reference:>16.2f}")
        for label, args_, expected in CASES:
            for tree, extension in trees:
                seconds = median_seconds(args_, expected, args.runs, extension)
                print(f"{label:<{width}}{tree:<10}{seconds:>10.3f}{seconds / reference:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
