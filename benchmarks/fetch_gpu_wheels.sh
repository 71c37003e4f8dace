#!/usr/bin/env bash
# Run HERE (with network to PyPI): download the few wheels benchmarks/gpu_check.py needs on the lent GPU
# machine (Python 3.12, no network; list and reasons in benchmarks/gpu_wheels.txt) into the ignored
# folder .whl/, and print their total size (the device tool carries at most 64 MiB a call).
#
# Then, on the device (the `run` tool, carry [".whl"]), one command:
#   bash benchmarks/gpu_check.sh --out "$OUT"
# which is
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:extension python3 benchmarks/gpu_check.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v -E '^\s*(#|$)' benchmarks/gpu_wheels.txt | while read -r spec; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
# keep one version of each (two of one package stop the whole install there)
python3 - <<'PY'
import re
from pathlib import Path
wanted = {re.split(r"[=<>]", l.strip())[0].lower().replace("-", "_"): l.strip().split("==")[-1]
          for l in Path("benchmarks/gpu_wheels.txt").read_text().splitlines() if l.strip() and not l.startswith("#")}
total = 0
for whl in sorted(Path(".whl").glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if name.lower() not in wanted or wanted[name.lower()] != version:
        print(f"removing {whl.name} (not in benchmarks/gpu_wheels.txt)")
        whl.unlink()
        continue
    total += whl.stat().st_size
    print(f"{whl.stat().st_size / 2**20:6.1f} MiB  {whl.name}")
print(f"{total / 2**20:6.1f} MiB  in .whl/")
if total > 60 * 2**20:
    raise SystemExit("more than 60 MiB: the device tool carries at most 64 MiB with the working tree")
PY
