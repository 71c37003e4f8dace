"""Rough time per stage, for ``plan`` and the sizing table: stated rates, not measurements.

GPU rates are for one consumer GPU of the paper's class (RTX 2070, 8 GB): training 3.5 it/s (the
paper: 50,000 steps in about 4 hours); sampling 5 it/s at 512 px with CFG (assumed). Feature
extraction and the classifier run on the CPU in this library (rates assumed for a 16-core CPU; the
FID bootstrap rate is this project's benchmark). The tiny model's rates were measured on this project's
2-core CPU. Put your own rates under ``estimates:`` in the config
(keys below); ``meddiff classify --estimate-only`` measures the classifier's step time on a machine.
"""

from __future__ import annotations

from pathlib import Path

from medical_diffusion.backend.families import is_tiny_model
from medical_diffusion.experiment.graph import Plan, Stage

DEFAULTS = {
    "train_it_s": {"gpu": 3.5, "cpu": 0.05, "tiny": 4.0},
    "sample_it_s": {"gpu": 5.0, "cpu": 0.1, "tiny": 3.0},
    "features_img_s": {"inception": 15.0, "radimagenet": 20.0, "pixels": 500.0},
    "bootstrap_rep_s": 0.141,  # 1000 x 1000 x 2048 features: 141 s per 1000 reps (benchmarks/bench_frechet.py)
    # batch 32 at 196 px (assumed: CPU about 1 s; a consumer GPU with AMP about 0.05 s; measure yours with
    # `meddiff classify --estimate-only` and put it under `estimates:`)
    "classifier_step_s": {"gpu": 0.05, "cpu": 1.0, "tiny": 1.0},
    "prepare_case_s": 1.0,  # PI-CAI paper mode: 0.98 cases/s (benchmarks/bench_prepare_picai.py)
    "model_load_s": {"gpu": 30.0, "cpu": 60.0, "tiny": 5.0},
}


def _rates(plan: Plan) -> dict:
    rates = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for k, v in (plan.config.data.get("estimates") or {}).items():
        if isinstance(v, dict) and isinstance(rates.get(k), dict):
            rates[k].update(v)
        else:
            rates[k] = v
    return rates


def device_of(stage: Stage, plan: Plan) -> str:
    """``GPU`` or ``CPU``: where the stage runs."""
    return "GPU" if stage.gpu else "CPU"


def stage_seconds(stage: Stage, plan: Plan) -> float:
    r = _rates(plan)
    s = stage.settings
    tiny = is_tiny_model(plan.config.data.get("model"))
    dev = "tiny" if tiny else ("gpu" if stage.gpu else "cpu")
    if stage.kind == "prepare":
        data = s["data"]
        if data["kind"] == "phantoms":
            return 2.0 * int(data["cases_per_class"]) * 0.5 + 10
        if data["kind"] == "prepared":
            return 1.0
        images = Path(data["images"])
        cases = sum(1 for _ in images.iterdir()) if images.is_dir() else 1500
        return cases * float(r["prepare_case_s"])
    if stage.kind == "train":
        t = s["train"]
        return int(t.get("steps", 50000)) * int(t.get("batch_size", 1)) / r["train_it_s"][dev] + r["model_load_s"][dev]
    if stage.kind == "generate":
        sm = s["sampling"]
        scale = (int(sm["width"]) * int(sm["height"])) / (512 * 512) if not tiny else 1.0
        its = int(s["n"]) * len(s["classes"]) * int(sm["steps"]) * scale
        return its / r["sample_it_s"][dev] + r["model_load_s"][dev]
    if stage.kind == "reference":
        return 1.0 + int(s["n"]) * 0.01
    if stage.kind == "features":
        n = _set_size(stage, plan)
        return n / r["features_img_s"].get(s["extractor"], 15.0) + 5
    if stage.kind == "fid":
        reps = int(s["bootstrap"]["reps"])
        n = _set_size(stage, plan)
        scale = 0.01 if s["extractor"] == "pixels" else max(n, 1) / 1000
        return reps * float(r["bootstrap_rep_s"]) * scale + 5
    if stage.kind == "classify":
        c = s["classifier"]
        step = r["classifier_step_s"]
        step = step["cpu" if dev == "tiny" else dev] if isinstance(step, dict) else step
        per = float(step) * (int(c["size"]) / 196) ** 2 * int(c["batch_size"]) / 32
        return int(c["steps"]) * per + 10
    return 1.0


def _set_size(stage: Stage, plan: Plan) -> int:
    by_id = plan.by_id()
    for dep in stage.deps:
        d = by_id[dep]
        if d.kind == "generate":
            return int(d.settings["n"])
        if d.kind == "reference":
            return int(d.settings["n"])
    return 1000


def makespan(plan: Plan, todo: set[str], workers: int) -> float:
    """Hours-free estimate of the wall time with ``workers`` parallel workers (list scheduling in plan order)."""
    finish: dict[str, float] = {}
    free = [0.0] * max(1, workers)
    for s in plan.stages:
        if s.id not in todo:
            finish[s.id] = 0.0
            continue
        ready = max([finish.get(d, 0.0) for d in s.deps] or [0.0])
        i = min(range(len(free)), key=lambda k: max(free[k], ready))
        start = max(free[i], ready)
        finish[s.id] = free[i] = start + stage_seconds(s, plan)
    return max(finish.values() or [0.0])
