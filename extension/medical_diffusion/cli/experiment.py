"""``meddiff experiment run|plan|status|report|init``: the paper's tables as one cached, resumable job."""

from __future__ import annotations

import argparse
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, or a preset: tiny, paper-table1, paper-table2")
    p.add_argument("--workdir", help="experiment folder (default: the config's 'workdir')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set table1.bootstrap.reps=200 (repeatable)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", help="run the paper's Table 1 / Table 2 as one cached job (local, multi-GPU or Ray)",
        description="Prepare -> train embeddings -> generate sets -> features -> FID/MFID with bootstrap CI -> "
                    "classifier mixes x runs -> tables. Each stage is cached by a key of its settings and inputs: "
                    "a rerun skips done stages, a changed setting reruns what depends on it, a killed run resumes.")
    sub = p.add_subparsers(dest="experiment_command", metavar="ACTION")
    r = sub.add_parser("run", help="run every stage that is not done, then write the tables and report")
    _config_args(r)
    r.add_argument("--executor", choices=("local", "ray"), default="local")
    r.add_argument("--gpus", help="local executor: one worker process per GPU, e.g. 0,1,2,3")
    r.add_argument("--address", help="ray executor: cluster address (default: RAY_ADDRESS or a local Ray)")
    r.add_argument("--threads", type=int, help="torch CPU threads per stage (default: torch's own)")
    r.set_defaults(func=_run)
    for name, func, text in (("plan", _plan, "show the stage graph: cached, to run, estimate per stage and device"),
                             ("status", _status, "show each stage's state (failed ones with their error and log)"),
                             ("report", _report, "write results.json, table1.md/table2.md and report.html from what is done")):
        q = sub.add_parser(name, help=text)
        _config_args(q)
        if name == "plan":
            q.add_argument("--summary", action="store_true", help="only the per-kind summary and the sizing")
        q.set_defaults(func=func)
    i = sub.add_parser("init", help="copy a preset into an editable YAML file")
    i.add_argument("preset", help="tiny, paper-table1 or paper-table2")
    i.add_argument("out", help="file to write")
    i.add_argument("--force", action="store_true")
    i.set_defaults(func=_init)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _load(args):
    from medical_diffusion.experiment.config import load_config

    return load_config(args.config, args.overrides, args.workdir)


def _run(args) -> int:
    from medical_diffusion.experiment.runner import run_experiment

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    summary = run_experiment(_load(args), executor=args.executor, gpus=gpus, address=args.address,
                             threads=args.threads)
    print(f"{len(summary.executed)} stage(s) ran, {len(summary.cached)} cached, {len(summary.failed)} failed, "
          f"{len(summary.blocked)} blocked; report: {summary.results}")
    return 0 if summary.ok else 1


def _plan(args) -> int:
    from medical_diffusion.experiment.graph import build_plan
    from medical_diffusion.experiment.store import StageStore
    from medical_diffusion.experiment.views import plan_text

    cfg = _load(args)
    print(plan_text(build_plan(cfg), StageStore(cfg.workdir), detail=not args.summary))
    return 0


def _status(args) -> int:
    from medical_diffusion.experiment.graph import build_plan
    from medical_diffusion.experiment.store import StageStore
    from medical_diffusion.experiment.views import status_text

    cfg = _load(args)
    print(status_text(build_plan(cfg), StageStore(cfg.workdir)))
    return 0


def _report(args) -> int:
    from medical_diffusion.experiment.graph import build_plan
    from medical_diffusion.experiment.results import write_results
    from medical_diffusion.experiment.store import StageStore

    cfg = _load(args)
    print(f"report: {write_results(build_plan(cfg), StageStore(cfg.workdir))}")
    return 0


def _init(args) -> int:
    from medical_diffusion.atomic_io import atomic_write_text, check_writable
    from medical_diffusion.experiment.config import preset_text

    check_writable(args.out, args.force)
    atomic_write_text(Path(args.out), preset_text(args.preset))
    print(f"wrote {args.out}; fill in the FILL_ME paths, then: meddiff experiment plan {args.out}")
    return 0
