"""``meddiff --help``, every ``meddiff COMMAND --help`` and argument errors import no heavy library (issue 19).

Not a timing test: it checks which modules a fresh interpreter holds after the parser has answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "gradio", "diffusers", "transformers", "PIL", "scipy", "SimpleITK", "safetensors")

#: run in a fresh interpreter: every command's --help (nested ones too) and a few argument errors
_PROBE = r"""
import argparse, json, sys
from medical_diffusion.cli import build_parser, main

def commands(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + [name]
                yield from commands(sub, path + [name])

codes = {}
runs = [["--help"]] + [path + ["--help"] for path in commands(build_parser(), [])]
runs += [["no-such-command"], ["train", "--steps", "many"], ["generate", "--no-such-option"], ["fid"]]
for argv in runs:
    try:
        codes[" ".join(argv)] = main(argv)
    except SystemExit as exc:
        codes[" ".join(argv)] = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "extension")}


def test_help_and_argument_errors_import_no_heavy_library():
    code = f"HEAVY = {HEAVY!r}\n" + _PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    codes = report["codes"]
    helps = [argv for argv in codes if argv.endswith("--help")]
    assert {"--help", "train --help", "fid --help", "prepare picai --help", "ui --help"} <= set(helps)
    assert all(codes[argv] == 0 for argv in helps), codes
    assert all(codes[argv] == 2 for argv in codes if argv not in helps), codes
    assert report["heavy"] == [], f"the parser imported {sorted({m.split('.')[0] for m in report['heavy']})}"


def test_module_entry_point_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "medical_diffusion", "train", "--help"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout and "--steps" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "medical_diffusion.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
