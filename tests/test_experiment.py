"""`meddiff experiment`: the tiny preset end to end (local, per-GPU workers, Ray), the stage cache, failures,
kill -9 and resume, and the paper presets' plans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medical_diffusion.errors import MedDiffError
from medical_diffusion.experiment import build_plan, load_config, run_experiment
from medical_diffusion.experiment import stages as stage_module
from medical_diffusion.experiment.store import StageStore
from medical_diffusion.experiment.views import plan_text, status_text

# The tiny preset made smaller still: 2 sampling settings for Table 1 (steps 2 and 3 around the centre),
# 2 mixes x 1 run for Table 2, and the weight-free `pixels` extractor in place of Inception/RadImageNet.
SMALL = """
extends: tiny
workdir: wd
data: {cases_per_class: 6, prepare: {n_per_class: 2}}
train: {cases: 2, n_vectors: 2, steps: 3}
sample: {steps: 2}
table1:
  n_generated: 3
  real: {n: 2}
  vary: {steps: [2, 3], cfg: [2], n_vectors: [2], cases: [2]}
  metrics: {fid: null, mfid: null, px: {extractor: pixels}}
  bootstrap: {reps: 20}
table2:
  n_generated: 2
  mixes:
    - {name: real4_syn0, real: 4, synthetic: 0, paper_row: 1}
    - {name: real4_syn4, real: 4, synthetic: 4, paper_row: 2}
  classifier: {steps: 2, batch_size: 4, size: 32, runs: 1}
"""
RESULT_FILES = ("results.json", "table1.md", "table2.md")
ROOT = Path(__file__).resolve().parents[1]


def _results(workdir: Path) -> dict[str, bytes]:
    return {name: (workdir / "results" / name).read_bytes() for name in RESULT_FILES}


def _run(folder: Path, overrides=(), **kwargs):
    cfg = load_config(folder / "small.yaml", list(overrides))
    return run_experiment(cfg, threads=1, bars=False, echo=lambda _m: None, **kwargs), cfg


def _copy(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference.parent, dest)
    return dest


def _copied_plan(reference: Path, dest: Path):
    """A copy of the reference run: its folder, config, plan and stage store."""
    folder = _copy(reference, dest)
    cfg = load_config(folder / "small.yaml")
    return folder, cfg, build_plan(cfg), StageStore(cfg.workdir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One complete local run of the small config."""
    pytest.importorskip("diffusers")  # its training stages use the tiny model of the standalone backend
    folder = tmp_path_factory.mktemp("experiment")
    (folder / "small.yaml").write_text(SMALL)
    summary, cfg = _run(folder)
    assert summary.ok, (summary.failed, summary.blocked)
    return cfg.workdir, summary


@pytest.mark.slow
def test_tiny_runs_end_to_end_locally(reference):
    workdir, summary = reference
    plan = build_plan(load_config(workdir.parent / "small.yaml"))
    assert sorted(summary.executed) == sorted(s.id for s in plan.stages)
    kinds = {s.kind for s in plan.stages}
    assert kinds == {"prepare", "train", "generate", "reference", "features", "fid", "classify"}
    res = json.loads((workdir / "results" / "results.json").read_text())
    # Table 1: steps 2 (the centre) and 3, each with a pixel-feature distance and a bootstrap CI around it
    rows = {(r["parameter"], r["value"]): r for r in res["table1"]}
    assert set(rows) == {("steps", 2), ("steps", 3), ("cfg", 2), ("n_vectors", 2), ("cases", 2)}
    for r in rows.values():
        m = r["metrics"]["px"]
        assert m["status"] == "done" and m["n_real"] == 2 and m["n_generated"] == 3
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert len({r["setting"] for r in rows.values()}) == 2  # the centre repeats: 5 rows, 2 settings
    # Table 2: each mix has its run's AUC and the paper's prostate figures side by side
    t2 = {r["mix"]: r for r in res["table2"]}
    assert t2["real4_syn0"]["runs_done"] == 1 and 0.0 <= t2["real4_syn0"]["mean_auc"] <= 1.0
    assert t2["real4_syn4"]["paper"] == {"mean_auc": 0.803, "sd_auc": 0.009}
    assert "0.780 ± 0.017" in (workdir / "results" / "table2.md").read_text()
    assert "2.87 (95% CI 1.34, 5.32)" in (workdir / "results" / "table1.md").read_text()
    html = (workdir / "results" / "report.html").read_text()
    assert "table2_auc.png" in html and "table1_px.png" in html and "grids/generate_v2-c2_s3-cfg2.png" in html
    # the generate stage made the images with the library's set generator (manifest next to them)
    store = StageStore(workdir)
    gen = next(s for s in plan.stages if s.id == "generate/v2-c2/s2-cfg2")
    manifest = json.loads((store.final(gen.id, gen.key) / "set" / "manifest.json").read_text())
    assert manifest["params"]["classes"] == {"neg": "phantom_neg", "pos": "phantom_pos"}
    assert len(manifest["images"]) == 6  # 3 per class: the larger of Table 1's 3 and Table 2's 2


def test_second_run_does_no_work(reference):
    workdir, _ = reference
    before = _results(workdir)
    summary, _ = _run(workdir.parent)
    assert summary.executed == [] and summary.ok
    assert _results(workdir) == before


def test_changed_fid_setting_reruns_only_fid_stages(reference, tmp_path):
    workdir, _ = reference
    folder = _copy(workdir, tmp_path / "changed")
    summary, cfg = _run(folder, ["table1.bootstrap.reps=30"])
    plan = build_plan(cfg)
    assert sorted(summary.executed) == sorted(s.id for s in plan.stages if s.kind == "fid")
    res = json.loads((cfg.workdir / "results" / "results.json").read_text())
    old = json.loads((workdir / "results" / "results.json").read_text())
    assert res["table2"] == old["table2"]  # the classifier stages were not touched


def test_failed_stage_blocks_only_its_dependents_and_the_run_resumes(reference, tmp_path, monkeypatch):
    workdir, _ = reference
    folder, cfg, plan, store = _copied_plan(workdir, tmp_path / "fail")
    target = "generate/v2-c2/s3-cfg2"
    dependents = plan.dependents(target)
    assert dependents == {"features/px/v2-c2-s3-cfg2-neg", "fid/px/v2-c2-s3-cfg2-neg"}
    by_id = plan.by_id()
    for sid in {target} | dependents:  # as if they had never run
        shutil.rmtree(store.final(sid, by_id[sid].key))
    real = stage_module.RUNNERS["generate"]

    def broken(settings, ctx):
        raise MedDiffError("simulated out-of-memory")

    monkeypatch.setitem(stage_module.RUNNERS, "generate", broken)
    summary, _ = _run(folder)
    assert list(summary.failed) == [target] and summary.failed[target]["error"] == "simulated out-of-memory"
    assert sorted(summary.blocked) == sorted(dependents)
    assert all(store.is_done(s.id, s.key) for s in plan.stages if s.id not in dependents | {target})
    log = Path(summary.failed[target]["log"]).read_text()
    assert "simulated out-of-memory" in log and "Traceback" in log
    status = status_text(plan, store)
    assert "failed" in status and "simulated out-of-memory" in status
    res = json.loads((cfg.workdir / "results" / "results.json").read_text())
    assert {r["metrics"]["px"]["status"] for r in res["table1"] if r["value"] == 3} == {"todo"}

    monkeypatch.setitem(stage_module.RUNNERS, "generate", real)
    summary, _ = _run(folder)
    assert sorted(summary.executed) == sorted(dependents | {target}) and summary.ok
    assert _results(cfg.workdir) == _results(workdir)


def test_stage_killed_after_its_marker_is_recovered(reference, tmp_path):
    """A run killed between writing done.json and the rename: the next run finishes the rename, no work."""
    workdir, _ = reference
    folder = _copy(workdir, tmp_path / "recover")
    cfg = load_config(folder / "small.yaml")
    store = StageStore(cfg.workdir)
    stage = next(s for s in build_plan(cfg).stages if s.kind == "classify")
    os.rename(store.final(stage.id, stage.key), store.partial(stage.id, stage.key))
    assert store.state(stage.id, stage.key) == "partial"
    summary, _ = _run(folder)
    assert summary.executed == [] and store.is_done(stage.id, stage.key)


@pytest.mark.slow
def test_kill_9_mid_run_then_run_again_finishes(reference, tmp_path):
    workdir, _ = reference
    folder, cfg, plan, store = _copied_plan(workdir, tmp_path / "killed")
    for s in plan.stages:  # keep the prepared data and embeddings, so the rerun is short
        if s.kind not in ("prepare", "train"):
            shutil.rmtree(store.final(s.id, s.key))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "extension") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "medical_diffusion", "experiment", "run", str(folder / "small.yaml"), "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = next(s for s in plan.stages if s.kind == "generate")
    deadline = time.time() + 90
    while not store.is_done(first.id, first.key) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [s.id for s in plan.stages if store.is_done(s.id, s.key)]
    assert first.id in done and len(done) < len(plan.stages)
    summary, _ = _run(folder)  # the same `run` again (here in-process: one process start less)
    assert summary.ok and sorted(summary.cached) == sorted(done)
    assert all(store.is_done(s.id, s.key) for s in plan.stages)
    assert _results(cfg.workdir) == _results(workdir)


@pytest.mark.slow
def test_one_worker_process_per_gpu_gives_the_same_results(reference, tmp_path):
    workdir, _ = reference
    folder, cfg, plan, store = _copied_plan(workdir, tmp_path / "gpus")
    redo = [s for s in plan.stages if s.id.startswith(("generate/", "features/px/v2", "fid/"))
            or s.id == "classify/real4_syn4/run00"]
    for s in redo:
        shutil.rmtree(store.final(s.id, s.key))
    summary, _ = _run(folder, gpus=["0", "1"])
    assert sorted(summary.executed) == sorted(s.id for s in redo) and summary.ok
    assert _results(cfg.workdir) == _results(workdir)


RAY_DRIVER = """import sys
import ray
from medical_diffusion.experiment import load_config, run_experiment

ray.init(num_cpus=2, include_dashboard=False)
try:
    summary = run_experiment(load_config(sys.argv[1]), executor="ray", threads=1, bars=False)
finally:
    ray.shutdown()
print("RESULT", len(summary.executed), summary.ok)
"""


@pytest.mark.slow
def test_ray_executor_gives_identical_results(reference, tmp_path):
    """The small config on a local Ray with 2 CPUs (started by the test, shut down after): same files."""
    pytest.importorskip("ray")
    workdir, _ = reference
    folder = tmp_path / "ray"
    folder.mkdir()
    (folder / "small.yaml").write_text(SMALL)
    (tmp_path / "driver.py").write_text(RAY_DRIVER)
    paths = [str(ROOT / "extension")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(folder / "small.yaml")], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    n_stages = len(build_plan(load_config(folder / "small.yaml")).stages)
    assert f"RESULT {n_stages} True" in done.stdout
    assert _results(folder / "wd") == _results(workdir)


def test_ray_refusing_pydantic_1_is_a_clear_error(tmp_path):
    ray = pytest.importorskip("ray")
    pydantic = pytest.importorskip("pydantic")
    if not str(pydantic.VERSION).startswith("1."):
        pytest.skip("pydantic 2 installed")
    from medical_diffusion.experiment.ray_executor import run_on_ray

    try:
        import ray._common.pydantic_compat  # noqa: F401
    except ImportError:
        with pytest.raises(MedDiffError, match="environment without the ui extra"):
            run_on_ray([], echo=lambda _m: None)
    else:
        pytest.skip(f"Ray {ray.__version__} accepts pydantic 1")


def test_changing_a_sampling_setting_changes_only_its_dependents(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    a = build_plan(load_config(tmp_path / "small.yaml")).by_id()
    b = build_plan(load_config(tmp_path / "small.yaml", ["sample.seed=5"])).by_id()
    changed = {sid for sid in a if sid in b and a[sid].key != b[sid].key}
    assert changed and all(sid.split("/")[0] in ("generate", "features", "fid", "classify") for sid in changed)
    assert "features/px/real-neg" not in changed and all(not sid.startswith("train/") for sid in changed)
    assert "classify/real4_syn0/run00" not in changed and "classify/real4_syn4/run00" in changed


def test_paper_presets_plan_without_data_and_run_names_the_missing_path(tmp_path):
    cfg = load_config("paper-table1", workdir=str(tmp_path / "t1"))
    plan = build_plan(cfg)
    kinds = [s.kind for s in plan.stages]
    assert kinds.count("train") == 7 and kinds.count("generate") == 13  # 16 cells, 13 distinct settings
    rows = {(r["parameter"], r["value"]) for r in plan.table1_rows}
    assert len(plan.table1_rows) == 16 and ("steps", 25) in rows and ("cases", 5) in rows
    centre = plan.by_id()["train/neg/v64-c100"].settings["train"]
    assert (centre["steps"], centre["learning_rate"], centre["batch_size"]) == (50000, "0.005", 1)
    text = plan_text(plan, StageStore(cfg.workdir))
    assert "will run" in text and "FILL_ME/picai_public_images" in text and "N=4:" in text
    with pytest.raises(MedDiffError, match="FILL_ME/picai_public_images"):
        run_experiment(cfg, bars=False, echo=lambda _m: None)
    assert not (tmp_path / "t1" / "stages").exists()  # failed before any work

    cfg2 = load_config("paper-table2", workdir=str(tmp_path / "t2"))
    plan2 = build_plan(cfg2)
    mixes = {r["name"]: r for r in plan2.table2_rows}
    assert len(mixes) == 7 and sum(s.kind == "classify" for s in plan2.stages) == 70
    assert [s.kind for s in plan2.stages].count("generate") == 2  # 100-case and 10-case embeddings
    assert plan2.by_id()["classify/real200_syn0/run00"].settings["classifier"]["steps"] == 6250


def test_cli_plan_status_init(tmp_path, capsys):
    from medical_diffusion.cli import main

    assert main(["experiment", "init", "tiny", str(tmp_path / "mine.yaml")]) == 0
    assert "phantoms" in (tmp_path / "mine.yaml").read_text()
    assert main(["experiment", "plan", str(tmp_path / "mine.yaml"), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "estimated wall time" in out
    assert main(["experiment", "status", str(tmp_path / "mine.yaml")]) == 0
    assert "todo" in capsys.readouterr().out
    assert main(["experiment", "plan", str(tmp_path / "nope.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
