"""The README's quick start: a CPU machine gets a CPU torch before the package pulls in PyPI's CUDA build."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quick start bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_with_torch_first():
    lines = _quick_start_lines()
    assert len(lines) == 2
    main_job = lines[0].split("#")[0]
    assert main_job.index("pip install torch torchvision") < main_job.index("pip install -e")
    assert "meddiff demo" in main_job
    assert "pytest" in lines[1]


def _torch_index_args(path: str) -> str:
    main_job = _quick_start_lines()[0]
    choice = re.search(r"(\$\(command -v nvidia-smi.*?\))", main_job).group(1)
    return subprocess.run(["/bin/bash", "-c", f"echo {choice}"], env={"PATH": path}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_quick_start_picks_cpu_index_without_nvidia_smi(tmp_path):
    assert _torch_index_args(str(tmp_path)) == "--index-url https://download.pytorch.org/whl/cpu"


def test_quick_start_keeps_default_index_with_nvidia_smi(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert _torch_index_args(str(tmp_path)) == ""
