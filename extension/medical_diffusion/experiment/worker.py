"""A local worker process: reads stage specs (JSON lines) on stdin, answers one status line each.

Started by the local executor with ``CUDA_VISIBLE_DEVICES`` set to one GPU. The stages' own output
(and anything the libraries print) goes to stderr and the stage logs; stdout carries only statuses.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints from stage code must not corrupt the status channel
    sys.stdout = sys.stderr
    from medical_diffusion.experiment.stages import run_stage

    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        answers.write(json.dumps(run_stage(spec)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
