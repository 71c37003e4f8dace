"""The stage graph of an experiment config and each stage's cache key.

prepare -> train (per class and training setting) -> generate (per setting) -> reference (real set)
-> features (per image set and metric) -> fid (per setting and metric) -> classify (per mix and run).
The tables are written from the finished stages at the end of every run (cheap, not cached).

A stage's key is a sha256 of its kind, its own settings, its inputs' keys, a signature of the
external files it reads (size and modification time of every file under a data or model path) and
the project version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medical_diffusion import __version__
from medical_diffusion.backend.families import is_tiny_model
from medical_diffusion.experiment.config import ExperimentConfig

GPU_KINDS = ("train", "generate")


@dataclass
class Stage:
    """One unit of work; ``settings`` and the deps' keys decide its output."""

    id: str
    kind: str
    settings: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # external files/folders (their signature enters the key)
    gpu: bool = False
    key: str = ""

    def folder_name(self) -> str:
        return self.id.replace("/", os.sep)


@dataclass
class Plan:
    """Stages in a topological order, with notes about what was left out and why."""

    config: ExperimentConfig
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)
    table1_rows: list[dict] = field(default_factory=list)  # parameter, value, setting id, class
    table2_rows: list[dict] = field(default_factory=list)  # the mix dicts with their stage ids
    metrics: dict[str, dict] = field(default_factory=dict)  # metric name -> {extractor, weights}

    def by_id(self) -> dict[str, Stage]:
        return {s.id: s for s in self.stages}

    def dependents(self, stage_id: str) -> set[str]:
        """Every stage that needs ``stage_id``, directly or not."""
        out: set[str] = set()
        frontier = {stage_id}
        while frontier:
            nxt = {s.id for s in self.stages if set(s.deps) & frontier} - out
            out |= nxt
            frontier = nxt
        return out


def path_signature(path: str) -> str:
    """Cheap identity of a file or folder tree: relative names, sizes and mtimes (``missing`` if absent)."""
    p = Path(path)
    if not p.exists():
        return f"missing:{p}"
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            try:
                st = full.stat()
            except OSError:
                continue
            h.update(f"{full.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _compute_keys(stages: list[Stage]) -> None:
    keys: dict[str, str] = {}
    for s in stages:
        payload = {"kind": s.kind, "settings": s.settings, "deps": {d: keys[d] for d in sorted(s.deps)},
                   "inputs": {i: path_signature(i) for i in sorted(s.inputs)}, "version": __version__}
        s.key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
        keys[s.id] = s.key


def _num(v: float) -> str:
    return f"{float(v):g}"


def train_slug(t: dict) -> str:
    return f"v{t['n_vectors']}-c{t['cases']}"


def sample_slug(s: dict) -> str:
    return f"s{s['steps']}-cfg{_num(s['cfg'])}"


def resolve_metric(cfg: ExperimentConfig, name: str, spec: dict) -> tuple[dict | None, str]:
    """``({extractor, weights}, "")`` or ``(None, why it is skipped)``."""
    from medical_diffusion.evaluation.weights import MissingWeightsError, find_inception_weights, find_radimagenet_weights
    from medical_diffusion.experiment.extractors import SIMPLE_EXTRACTORS

    extractor = spec.get("extractor", "inception")
    weights = cfg.path(spec.get("weights"))
    if extractor in SIMPLE_EXTRACTORS:
        return {"extractor": extractor, "weights": None}, ""
    finder = {"inception": find_inception_weights, "radimagenet": find_radimagenet_weights}.get(extractor)
    if finder is None:
        return None, f"{name}: unknown extractor {extractor!r}"
    if weights and not Path(weights).is_file():
        return {"extractor": extractor, "weights": weights}, ""  # named but absent: `run` says which file
    try:
        found = str(finder(weights))
    except MissingWeightsError as exc:
        what = "MFID needs RadImageNet weights" if extractor == "radimagenet" else "FID needs Inception weights"
        where = ", ".join(exc.looked_in) or "the usual places"
        return None, (f"{name} stages skipped: {what}; {exc.filename} is not in {where} "
                      f"(set table1.metrics.{name}.weights to the file)")
    return {"extractor": extractor, "weights": found}, ""


def build_plan(cfg: ExperimentConfig) -> Plan:
    """Every stage the config asks for, deduplicated (the Table 1 centre is one setting, not four)."""
    d = cfg.data
    stages: dict[str, Stage] = {}
    notes: list[str] = []
    model = cfg.path(str(d["model"]))
    model_inputs = [] if is_tiny_model(model) else [model]
    device = str(d.get("device", "auto"))
    gpu = device.lower() != "cpu"
    seed = int(d["seed"])

    def add(stage: Stage) -> str:
        stages.setdefault(stage.id, stage)
        return stage.id

    data = dict(d["data"])
    inputs = []
    for key in ("images", "labels", "path"):
        if data.get(key):
            data[key] = cfg.path(data[key])
            inputs.append(data[key])
    prepare = add(Stage("prepare", "prepare", {"data": data, "seed": seed}, inputs=inputs))

    base_train = {k: v for k, v in d["train"].items()}
    base_sample = dict(d["sample"])

    def train_id(cls: str, overrides: dict) -> str:
        t = {**base_train, **overrides}
        sid = f"train/{cls}/{train_slug(t)}"
        return add(Stage(sid, "train", {"class": cls, "name": d["classes"][cls], "model": model, "train": t,
                                        "selection_seed": seed},
                         deps=[prepare], inputs=model_inputs, gpu=gpu))

    generate_needs: dict[tuple, dict] = {}  # (train slug, sample slug) -> {classes, n, train, sample}

    def need_set(train_over: dict, sample_over: dict, classes: list[str], n: int) -> tuple:
        t = {**base_train, **train_over}
        s = {**base_sample, **sample_over}
        k = (train_slug(t), sample_slug(s))
        entry = generate_needs.setdefault(k, {"classes": [], "n": 0, "train": train_over, "sample": s})
        entry["classes"] = sorted(set(entry["classes"]) | set(classes))
        entry["n"] = max(entry["n"], n)
        return k

    t1 = d.get("table1")
    table1_rows: list[dict] = []
    if t1:
        vary = t1["vary"]
        centre = {"steps": base_sample["steps"], "cfg": base_sample["cfg"], "n_vectors": base_train["n_vectors"],
                  "cases": base_train["cases"]}
        for param in ("steps", "cfg", "n_vectors", "cases"):
            for value in vary.get(param, [centre[param]]):
                train_over = {k: (value if k == param else centre[k]) for k in ("n_vectors", "cases")}
                sample_over = {k: (value if k == param else centre[k]) for k in ("steps", "cfg")}
                key = need_set(train_over, sample_over, t1["classes"], int(t1["n_generated"]))
                table1_rows.append({"parameter": param, "value": value, "set": key,
                                    "centre": value == centre[param]})
    t2 = d.get("table2")
    table2_rows: list[dict] = []
    if t2:
        for mix in t2["mixes"]:
            row = dict(mix)
            if mix["synthetic"] > 0:
                row["set"] = need_set(mix.get("train", {}), {}, ["neg", "pos"], int(t2["n_generated"]))
            table2_rows.append(row)

    set_ids: dict[tuple, str] = {}
    for key, need in generate_needs.items():
        deps = [train_id(cls, need["train"]) for cls in need["classes"]]
        sid = f"generate/{key[0]}/{key[1]}"
        s = need["sample"]
        settings = {"model": model, "classes": {c: d["classes"][c] for c in need["classes"]}, "n": need["n"],
                    "sampling": {k: s[k] for k in ("steps", "cfg", "width", "height", "seed", "negative_prompt",
                                                   "sampler")},
                    "batch_size": int(s.get("batch_size", 1))}
        set_ids[key] = add(Stage(sid, "generate", settings, deps=deps, inputs=model_inputs, gpu=gpu))

    metrics: dict[str, dict] = {}
    if t1:
        for name, spec in t1["metrics"].items():
            resolved, why = resolve_metric(cfg, name, spec or {})
            if resolved is None:
                notes.append(why)
            else:
                metrics[name] = resolved
        max_cases = max([base_train["cases"]] + [int(v) for v in t1["vary"].get("cases", [])])
        for cls in t1["classes"]:
            real = t1["real"]
            ref = add(Stage(f"reference/{cls}", "reference",
                            {"class": cls, "from": real["from"], "n": int(real["n"]),
                             "disjoint": bool(real["disjoint_from_training"]), "training_pool": max_cases,
                             "selection_seed": seed}, deps=[prepare]))
            for mname, m in metrics.items():
                fsettings = {**m, "preprocessing": t1["preprocessing"], "batch_size": int(t1["batch_size"])}
                real_feat = add(Stage(f"features/{mname}/real-{cls}", "features",
                                      {**fsettings, "set": {"stage": ref, "sub": f"images/{cls}"}},
                                      deps=[ref], inputs=[m["weights"]] if m["weights"] else [], gpu=gpu))
                for row in table1_rows:
                    gen = set_ids[row["set"]]
                    tag = f"{row['set'][0]}-{row['set'][1]}-{cls}"
                    gen_feat = add(Stage(f"features/{mname}/{tag}", "features",
                                         {**fsettings, "set": {"stage": gen, "sub": f"set/{cls}"}},
                                         deps=[gen], inputs=[m["weights"]] if m["weights"] else [], gpu=gpu))
                    add(Stage(f"fid/{mname}/{tag}", "fid",
                              {**fsettings, "bootstrap": dict(t1["bootstrap"]), "seed": seed,
                               "real": {"stage": ref, "sub": f"images/{cls}"},
                               "generated": {"stage": gen, "sub": f"set/{cls}"}},
                              deps=[ref, gen, real_feat, gen_feat],
                              inputs=[m["weights"]] if m["weights"] else []))
    if t2:
        c = dict(t2["classifier"])
        weights = c.pop("weights")
        weights = cfg.path(weights) if weights else None
        for row in table2_rows:
            deps = [prepare] + ([set_ids[row["set"]]] if "set" in row else [])
            row["stages"] = []
            for k in range(int(c["runs"])):
                settings = {"mix": {"name": row["name"], "n_real": row["real"], "n_synthetic": row["synthetic"]},
                            "run": k, "classifier": {kk: v for kk, v in c.items() if kk != "runs"},
                            "weights": weights, "seed": seed,
                            "synthetic": {"stage": set_ids[row["set"]], "sub": "set"} if "set" in row else None}
                w_inputs = [weights] if weights and weights != "random-init" else []
                row["stages"].append(add(Stage(f"classify/{row['name']}/run{k:02d}", "classify", settings,
                                               deps=deps, inputs=w_inputs, gpu=gpu)))
    for row in table1_rows:
        row["set_stage"] = set_ids[row["set"]]
    for row in table2_rows:
        if "set" in row:
            row["set_stage"] = set_ids[row["set"]]
    ordered = _topological(list(stages.values()))
    _compute_keys(ordered)
    return Plan(cfg, ordered, notes, table1_rows, table2_rows, metrics)


def _topological(stages: list[Stage]) -> list[Stage]:
    by_id = {s.id: s for s in stages}
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(s: Stage) -> None:
        if s.id in seen:
            return
        seen.add(s.id)
        for dep in s.deps:
            visit(by_id[dep])
        order.append(s)

    kind_rank = {k: i for i, k in enumerate(("prepare", "train", "generate", "reference", "features", "fid",
                                             "classify"))}
    for s in sorted(stages, key=lambda s: kind_rank[s.kind]):
        visit(s)
    return order
