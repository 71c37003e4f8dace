"""``meddiff experiment run``: check inputs, skip done stages, hand the rest to an executor, write tables.

Executors: ``local`` (in this process, one stage at a time in topological order; with ``gpus`` one
worker process per GPU, see :mod:`.local_executor`) and ``ray`` (:mod:`.ray_executor`). A failed
stage is recorded with its log; stages that need it are ``blocked``; everything else goes on.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.experiment.config import ExperimentConfig, placeholder_paths
from medical_diffusion.experiment.graph import Plan, Stage, build_plan
from medical_diffusion.experiment.store import StageStore

EXECUTORS = ("local", "ray")


@dataclass
class RunSummary:
    """What one ``run`` did."""

    executed: list[str] = field(default_factory=list)  # stages that ran and finished now
    cached: list[str] = field(default_factory=list)  # already done before
    failed: dict[str, dict] = field(default_factory=dict)  # id -> {error, log}
    blocked: list[str] = field(default_factory=list)  # not run: a stage they need failed
    results: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def make_spec(stage: Stage, plan: Plan, store: StageStore, threads: int | None = None) -> dict:
    """The JSON-able description a worker needs to run ``stage``."""
    keys = {s.id: s.key for s in plan.stages}
    return {"id": stage.id, "kind": stage.kind, "key": stage.key, "settings": stage.settings,
            "workdir": str(store.workdir), "deps": {d: str(store.final(d, keys[d])) for d in stage.deps},
            "dep_order": list(stage.deps), "device": str(plan.config.data.get("device", "auto")),
            "threads": threads, "gpu": stage.gpu}


def missing_inputs(plan: Plan, stages: list[Stage]) -> list[str]:
    """External paths that ``stages`` read and that are not there (placeholders included)."""
    missing = []
    for s in stages:
        for p in s.inputs:
            if not Path(p).exists() and p not in missing:
                missing.append(p)
        w = s.settings.get("weights")
        if s.kind == "classify" and w is None:
            from medical_diffusion.evaluation.weights import MissingWeightsError, find_resnet18_weights

            try:
                find_resnet18_weights(None)
            except MissingWeightsError as exc:
                if str(exc) not in missing:
                    missing.append(str(exc))
    return missing


def check_runnable(plan: Plan, todo: list[Stage]) -> None:
    """Fail before any work when a stage to run reads a path that is not there."""
    holes = placeholder_paths(plan.config)
    missing = missing_inputs(plan, todo)
    if holes or missing:
        lines = [f"  {h} (fill in the FILL_ME placeholder)" for h in holes]
        lines += [f"  {m}" for m in missing if not any(m in h for h in holes)]
        raise MedDiffError(f"{plan.config.source}: cannot run, missing input(s):\n" + "\n".join(lines))


@contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One ``run`` per experiment folder at a time (the lock goes with the process, also on kill -9)."""
    workdir.mkdir(parents=True, exist_ok=True)
    fh = open(workdir / ".run.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputFileError(workdir, "another `meddiff experiment run` is working in this folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def run_experiment(cfg: ExperimentConfig, executor: str = "local", gpus: list[str] | None = None,
                   address: str | None = None, threads: int | None = None, bars: bool = True,
                   echo: Callable[[str], None] = print) -> RunSummary:
    """Run what is not done; returns what happened (the tables are written in any case)."""
    if executor not in EXECUTORS:
        raise MedDiffError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    plan = build_plan(cfg)
    store = StageStore(cfg.workdir)
    summary = RunSummary()
    for note in plan.notes:
        echo(f"note: {note}")
    with workdir_lock(cfg.workdir):
        todo = []
        for s in plan.stages:
            if store.is_done(s.id, s.key) or store.recover(s.id, s.key):
                summary.cached.append(s.id)
            else:
                todo.append(s)
        check_runnable(plan, todo)
        if todo:
            echo(f"{len(todo)} stage(s) to run, {len(summary.cached)} already done; executor: {executor}"
                 + (f" on GPUs {','.join(gpus)}" if gpus else ""))
            specs = [make_spec(s, plan, store, threads) for s in todo]
            if executor == "ray":
                from medical_diffusion.experiment.ray_executor import run_on_ray

                statuses = run_on_ray(specs, address=address, echo=echo)
            elif gpus:
                from medical_diffusion.experiment.local_executor import run_with_workers

                statuses = run_with_workers(specs, gpus, echo=echo)
            else:
                from medical_diffusion.experiment.local_executor import run_in_process

                statuses = run_in_process(specs, bars=bars, echo=echo)
            for st in statuses:
                if st["status"] == "ok":
                    summary.executed.append(st["id"])
                elif st["status"] == "cached":
                    summary.cached.append(st["id"])
                elif st["status"] == "blocked":
                    summary.blocked.append(st["id"])
                else:
                    summary.failed[st["id"]] = {"error": st.get("error", ""), "log": st.get("log", "")}
        else:
            echo(f"nothing to run: all {len(summary.cached)} stage(s) are done")
        from medical_diffusion.experiment.results import write_results

        summary.results = write_results(plan, store)
    for sid, info in summary.failed.items():
        echo(f"FAILED {sid}: {info['error']}\n  log: {info['log']}")
    if summary.blocked:
        echo(f"blocked (a stage they need failed): {', '.join(summary.blocked)}")
    return summary


def load_plan(cfg: ExperimentConfig) -> Plan:
    return build_plan(cfg)
