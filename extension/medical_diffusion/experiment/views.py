"""``plan`` and ``status`` as tables a person can read."""

from __future__ import annotations

from medical_diffusion.experiment.estimates import device_of, makespan, stage_seconds
from medical_diffusion.experiment.graph import Plan
from medical_diffusion.experiment.runner import missing_inputs
from medical_diffusion.experiment.store import StageStore
from medical_diffusion.training.progress import format_duration

STATE_WORDS = {"done": "cached", "todo": "will run", "partial": "will resume", "failed": "will retry"}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_text(plan: Plan, store: StageStore, detail: bool = True) -> str:
    """The stage graph: what is cached, what will run, with an estimate per stage and device."""
    states = {s.id: store.state(s.id, s.key) for s in plan.stages}
    todo = {sid for sid, st in states.items() if st != "done"}
    out = [f"experiment {plan.config.name}: {len(plan.stages)} stages, {len(plan.stages) - len(todo)} cached, "
           f"{len(todo)} to run; folder {store.workdir}"]
    if detail:
        rows = [["stage", "state", "device", "estimate", "needs"]]
        for s in plan.stages:
            est = format_duration(stage_seconds(s, plan)) if s.id in todo else "-"
            needs = ", ".join(s.deps) if len(s.deps) <= 2 else f"{s.deps[0]} +{len(s.deps) - 1}"
            rows.append([s.id, STATE_WORDS[states[s.id]], device_of(s, plan), est, needs])
        out += ["", _table(rows)]
    kinds: dict[str, list] = {}
    for s in plan.stages:
        k = kinds.setdefault(s.kind, [0, 0, 0.0, device_of(s, plan)])
        k[0] += 1
        if s.id in todo:
            k[1] += 1
            k[2] += stage_seconds(s, plan)
    rows = [["kind", "stages", "to run", "device", "estimate (serial)"]]
    rows += [[k, str(v[0]), str(v[1]), v[3], format_duration(v[2])] for k, v in kinds.items()]
    out += ["", _table(rows)]
    sizes = [1, 2, 4, 8]
    out += ["", "estimated wall time with N workers (GPUs for train/generate; see estimates.py for the rates): "
            + ", ".join(f"N={n}: {format_duration(makespan(plan, todo, n))}" for n in sizes)]
    for note in plan.notes:
        out.append(f"note: {note}")
    missing = missing_inputs(plan, [s for s in plan.stages if s.id in todo])
    for m in missing:
        out.append(f"missing input (run will stop here): {m}")
    return "\n".join(out)


def status_text(plan: Plan, store: StageStore) -> str:
    """Done / failed / partial / not started per stage, with the error and log of failed ones."""
    rows = [["stage", "state", "seconds", "detail"]]
    counts: dict[str, int] = {}
    for s in plan.stages:
        st = store.state(s.id, s.key)
        counts[st] = counts.get(st, 0) + 1
        detail, secs = "", "-"
        if st == "done":
            rec = store.done_record(s.id, s.key) or {}
            secs = f"{rec.get('seconds', 0):.1f}"
        elif st == "failed":
            f = store.failure(s.id, s.key) or {}
            detail = f"{f.get('error', '')}  (log: {f.get('log', '')})"
        elif st == "partial":
            detail = "started, not finished (resumes on the next run)"
        rows.append([s.id, st, secs, detail])
    head = f"experiment {plan.config.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return head + "\n\n" + _table(rows)
