#!/usr/bin/env bash
# On the lent GPU machine, from the repository root (the `run` tool: carry [".whl"]):
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --out "$OUT"
# Installs the wheels from benchmarks/fetch_gpu_wheels.sh (run that here first) into /tmp/site and runs
# the check; the markdown table is the last thing printed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
else
    echo "no .whl/: run 'bash benchmarks/fetch_gpu_wheels.sh' here first and carry .whl" >&2
fi
export PYTHONPATH=/tmp/site:$PWD/extension${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
