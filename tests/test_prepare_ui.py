"""Prepare tab: lazy dataset imports with a report of missing packages, one meaning of "images per class",
and a failures table that keeps its headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medical_diffusion.errors import MedDiffError

ROOT = Path(__file__).resolve().parents[1]

BUILD_TAB = r"""
import json, sys
from pathlib import Path
{block}
import gradio as gr
from medical_diffusion.ui import tab_prepare
from medical_diffusion.ui.context import UIContext
ctx = UIContext(backend_factory=lambda: None, work_dir=Path({tmp!r}), embeddings_dir=Path({tmp!r}))
with gr.Blocks() as demo:
    tab_prepare.build(ctx)
missing_note = [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "md_prep_missing"]
try:
    tab_prepare.require_dependencies("picai")
    required = ""
except Exception as exc:
    required = str(exc)
print(json.dumps({{"missing": tab_prepare.missing_dependencies(), "picai": tab_prepare.missing_dependencies("picai"),
                  "chexpert": tab_prepare.missing_dependencies("chexpert"), "note": missing_note,
                  "required": required,
                  "loaded": sorted(m for m in ("SimpleITK", "h5py", "pydicom") if sys.modules.get(m) is not None)}}))
"""


def _build_tab_in_subprocess(tmp_path: Path, block: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "extension")}
    code = BUILD_TAB.format(block=block, tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tab_imports_and_reports_a_missing_simpleitk(tmp_path):
    report = _build_tab_in_subprocess(tmp_path, "sys.modules['SimpleITK'] = None  # as if not installed")
    assert report["missing"] == ["SimpleITK"] and report["picai"] == ["SimpleITK"] and report["chexpert"] == []
    assert report["required"] == "SimpleITK is missing: pip install SimpleITK"
    assert report["note"] and "pip install SimpleITK" in report["note"][0]


def test_tab_import_and_build_load_no_imaging_package(tmp_path):
    report = _build_tab_in_subprocess(tmp_path, "")
    assert report["missing"] == [] and report["note"] == [] and report["required"] == ""
    assert report["loaded"] == []  # SimpleITK, h5py, pydicom only load when a preparation runs


def test_images_per_class_box():
    from medical_diffusion.ui.tab_prepare import _n

    assert _n(0) is None and _n("") is None and _n(None) is None and _n(7) == 7
    with pytest.raises(MedDiffError, match="0 \\(all\\)"):
        _n(-1)


def test_empty_failure_table_keeps_its_headers(tmp_path):
    import gradio as gr

    from medical_diffusion.datasets.batch import BatchResult, ItemFailure
    from medical_diffusion.ui.tab_prepare import FAILURE_HEADERS, summary

    table = gr.Dataframe(headers=FAILURE_HEADERS)
    _, clean, _ = summary(BatchResult(tmp_path))
    assert table.postprocess(clean)["headers"] == ["item", "source", "problem"]
    _, failed, _ = summary(BatchResult(tmp_path, failures=[ItemFailure("a", "a.png", "broken")]))
    assert table.postprocess(failed) == {"headers": ["item", "source", "problem"], "data": [["a", "a.png", "broken"]]}
