"""benchmarks/gpu_check.py on the CPU: its bookkeeping, its report, and a whole --smoke run with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc  # noqa: E402


# -- pytest's closing line and verdict -------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("3 passed, 1 skipped, 200 deselected in 2.10s", {"passed": 3, "skipped": 1, "deselected": 200}),
    ("==== 1 failed, 2 passed, 5 deselected, 1 warning in 9.99s ====", {"failed": 1, "passed": 2, "deselected": 5}),
    ("no tests collected (330 deselected), 9 errors in 8.64s", {"deselected": 330, "errors": 9, "passed": 0}),
    ("2 passed, 1 error in 0.5s", {"passed": 2, "errors": 1}),
])
def test_pytest_summary_counts(line, expected):
    counts = gc.parse_pytest_summary("collected 5 items\n\n..F\n" + line + "\n")
    for key, value in expected.items():
        assert counts[key] == value, key


MISSING = """ERROR collecting tests/test_prepare_picai.py
E   ModuleNotFoundError: No module named 'SimpleITK'
ERROR collecting tests/test_gen_ui_handlers.py
E   ModuleNotFoundError: No module named 'gradio'
=========================== short test summary info ============================
ERROR tests/test_prepare_picai.py
ERROR tests/test_gen_ui_handlers.py
"""


def test_modules_missing_a_package_are_listed_not_failed():
    v = gc.judge_pytest(MISSING + "3 passed, 300 deselected, 2 errors in 5.0s\n", 1)
    assert v["ok"] is True
    assert v["passed"] == 3
    assert v["missing_packages"] == ["SimpleITK", "gradio"]
    assert v["collection_errors"] == ["tests/test_gen_ui_handlers.py", "tests/test_prepare_picai.py"]


def test_a_failed_test_or_an_unexplained_collection_error_fails_the_section():
    failed = gc.judge_pytest("FAILED tests/test_gpu.py::test_fp16 - AssertionError\n1 failed, 2 passed in 3s\n", 1)
    assert failed["ok"] is False and failed["failures"] == ["FAILED tests/test_gpu.py::test_fp16 - AssertionError"]
    broken = gc.judge_pytest("E   SyntaxError: invalid syntax\nERROR tests/test_gpu.py\n"
                             "no tests collected, 1 error in 1s\n", 1)
    assert broken["ok"] is False
    setup = gc.judge_pytest("ERROR tests/test_gpu.py::test_x - RuntimeError: CUDA\n1 passed, 1 error in 1s\n", 1)
    assert setup["ok"] is False


def test_no_gpu_test_is_noted():
    v = gc.judge_pytest("10 deselected in 0.3s\n", 5)
    assert v["ok"] is True and "no test is marked gpu" in v["note"]


# -- the budget -----------------------------------------------------------------------------------
def test_job_limit_shares_what_is_left():
    assert gc.job_limit(420, 70, 420) == pytest.approx(70)
    assert gc.job_limit(100, 1, 4) == pytest.approx(25)
    assert gc.job_limit(-5, 1, 4) == 0


def test_a_failing_section_is_recorded_and_the_rest_go_on_and_what_does_not_fit_is_skipped(monkeypatch, tmp_path):
    jobs = (gc.Job("fid", "first", 1, 0, 0), gc.Job("classifier", "second", 1, 0, 0),
            gc.Job("train:meddiff", "third", 1, 10**6, 10**6))
    monkeypatch.setattr(gc, "JOBS", jobs)
    calls = []

    def fake_worker(job, args, limit):
        calls.append((job.name, limit))
        if job.name == "fid":
            raise RuntimeError("CUDA error: boom")
        return {"batch": 2, "size": 8, "fp32": {"iters": 1, "s_per_step": 0.5, "steps_per_s": 2.0}}

    monkeypatch.setattr(gc, "run_worker", fake_worker)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    args = gc.argparse.Namespace(only=None, smoke=True, budget=100.0)
    report = gc.run_all(args)
    status = {s["name"]: s["status"] for s in report["sections"]}
    assert status == {"fid": "error", "classifier": "ok", "train:meddiff": "skipped"}
    assert [c[0] for c in calls] == ["fid", "classifier"]
    assert calls[0][1] == pytest.approx(100 / 3, abs=1)  # a third of the budget each
    assert "boom" in report["sections"][0]["error"]
    assert "needs at least" in report["sections"][2]["error"]
    md = gc.render_markdown(report)
    assert md.count("\n| ") == 4  # header + 3 sections
    assert "| second | ok |" in md and "steps/s" in md


def test_a_section_past_its_limit_is_a_timeout_with_what_it_printed(monkeypatch):
    monkeypatch.setattr(gc, "JOBS", (gc.Job("fid", "slow one", 1, 0, 0),))

    def hang(job, args, limit):
        raise subprocess.TimeoutExpired(["python"], limit, output=b"step 1 of 5\nstep 2 of 5\n")

    monkeypatch.setattr(gc, "run_worker", hang)
    report = gc.run_all(gc.argparse.Namespace(only=None, smoke=True, budget=30.0))
    (entry,) = report["sections"]
    assert entry["status"] == "timeout" and "did not finish in 30 s" in entry["error"]
    assert entry["result"]["output_tail"].endswith("step 2 of 5")
    assert "| slow one | timeout |" in gc.render_markdown(report)


def test_the_8gib_row_says_whether_it_fits():
    ck = {"s_per_step": 0.5, "it_per_s": 2.0, "peak_allocated_gib": 6.1, "peak_reserved_gib": 6.5, "fits": True}
    entry = {"name": "train:meddiff-8gib", "status": "ok",
             "result": {"fits": False, "memory_cap_gib": 8.0, "memory_fraction": 0.058, "oom": "CUDA out of memory",
                        "with_gradient_checkpointing": ck}}
    text = gc.summarise(entry)
    assert text.startswith("does not fit (cap 8 GiB") and "with gradient checkpointing it fits" in text
    assert "2.00 it/s" in text and "6.10 GiB allocated" in text


# -- whole runs -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_covers_every_section_and_writes_json_and_markdown(tmp_path, capsys):
    pytest.importorskip("diffusers")
    assert gc.main(["--smoke", "--in-process", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / gc.JSON_NAME).read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == list(gc.JOB_NAMES)
    assert {n: s["status"] for n, s in sections.items()} == {n: "ok" for n in gc.JOB_NAMES}, \
        {n: s.get("error") for n, s in sections.items()}
    for name in ("train:meddiff", "train:diffusers", "train:a1111", "train:meddiff-8gib", "train:meddiff-sdxl"):
        r = sections[name]["result"]
        assert r["steps_timed"] >= 1 and r["s_per_step"] > 0 and r["it_per_s"] == pytest.approx(1 / r["s_per_step"])
    assert sections["train:a1111"]["result"]["gradient_checkpointing"] is True
    assert sections["train:meddiff-sdxl"]["result"]["model"].startswith("tiny-sdxl")
    assert sections["fid"]["result"]["fp32"]["images_per_s"] > 0
    assert sections["classifier"]["result"]["project train_step (as is)"]["steps_per_s"] > 0
    md = (tmp_path / gc.MD_NAME).read_text()
    assert md.count("\n| ") == 1 + len(gc.JOB_NAMES)  # header + a row per section
    assert capsys.readouterr().out.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last


@pytest.mark.slow
def test_sections_run_in_their_own_process_and_out_defaults_to_env_out(tmp_path):
    pytest.importorskip("diffusers")
    env = {"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "extension")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--only", "fid",
                           "classifier"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / gc.JSON_NAME).read_text())
    assert [(s["name"], s["status"]) for s in report["sections"]] == [("fid", "ok"), ("classifier", "ok")]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| classifier ResNet-18 training | ok |")


def test_diffusers_approach_restores_every_row_but_the_placeholders(tiny_backend, tmp_path):
    """bench_train_step's re-implementation keeps the vocabulary fixed, as the diffusers script does."""
    import copy

    import torch

    from bench_train_step import N_VECTORS, make_images, run_diffusers_example

    backend = copy.deepcopy(tiny_backend)
    before = backend.text_encoder.get_input_embeddings().weight.detach().clone()
    make_images(tmp_path, 2, 64)
    res = run_diffusers_example(backend, tmp_path, 2, 64, classic_attention=False)
    after = backend.text_encoder.get_input_embeddings().weight.detach()
    assert len(res["times"]) == 2
    assert after.shape[0] == before.shape[0] + N_VECTORS
    assert torch.equal(after[: before.shape[0]], before)
    assert not torch.equal(after[before.shape[0]:], after[before.shape[0]:][:1].expand(N_VECTORS, -1))
