"""Tables and report from the finished stages: ``results.json``, ``table1.md``, ``table2.md``, ``report.html``.

Written at the end of every run (and by ``meddiff experiment report``) from whatever is done; rows
whose stages are not done say so. ``results.json`` holds no timings or absolute paths, so two runs of
the same config (local or on Ray) give identical files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.backend.families import is_tiny_model
from medical_diffusion.experiment.graph import Plan
from medical_diffusion.experiment.paper_figures import (APPENDIX_A_MFID_CI, PARAMETER_LABELS, TABLE1, TABLE2,
                                                        TABLE2_ROWS)
from medical_diffusion.experiment.store import StageStore

PAPER_METRIC = {"inception": "FID", "radimagenet": "MFID"}


def _num(v) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() else f


def collect(plan: Plan, store: StageStore) -> dict:
    """The results as one JSON-able dict."""
    keys = {s.id: s.key for s in plan.stages}
    states = {s.id: store.state(s.id, s.key) for s in plan.stages}

    def outputs(stage_id: str) -> dict | None:
        rec = store.done_record(stage_id, keys[stage_id]) if stage_id in keys else None
        return rec["outputs"] if rec else None

    d = plan.config.data
    table1 = []
    t1 = d.get("table1")
    if t1:
        for row in plan.table1_rows:
            for cls in t1["classes"]:
                tag = f"{row['set'][0]}-{row['set'][1]}-{cls}"
                entry = {"parameter": row["parameter"], "value": _num(row["value"]), "centre": row["centre"],
                         "class": cls, "setting": f"{row['set'][0]}/{row['set'][1]}", "metrics": {}}
                for mname, m in plan.metrics.items():
                    sid = f"fid/{mname}/{tag}"
                    out = outputs(sid)
                    if out is None:
                        entry["metrics"][mname] = {"status": states.get(sid, "todo"), "extractor": m["extractor"]}
                        continue
                    b = out.get("bootstrap") or {}
                    entry["metrics"][mname] = {"status": "done", "extractor": m["extractor"], "metric": out["metric"],
                                               "value": out["value"], "ci_low": b.get("low"), "ci_high": b.get("high"),
                                               "confidence": b.get("confidence"), "n_real": out["n_real"],
                                               "n_generated": out["n_generated"]}
                paper = TABLE1.get(row["parameter"], {}).get(_num(row["value"]))
                entry["paper"] = {"FID": paper[0], "MFID": paper[1]} if paper else None
                table1.append(entry)
    table2 = []
    t2 = d.get("table2")
    if t2:
        column = TABLE2.get(t2["column"], {})
        for row in plan.table2_rows:
            aucs, pending = [], []
            for sid in row["stages"]:
                out = outputs(sid)
                if out is None:
                    pending.append(f"{sid}: {states[sid]}")
                else:
                    aucs.append(out["test_auc"])
            paper_row = row.get("paper_row")
            paper = column.get(paper_row) if paper_row else None
            table2.append({"mix": row["name"], "real": row["real"], "synthetic": row["synthetic"],
                           "train": row.get("train", {}), "runs": len(row["stages"]), "runs_done": len(aucs),
                           "aucs": aucs, "mean_auc": float(np.mean(aucs)) if aucs else None,
                           "sd_auc": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else (0.0 if aucs else None),
                           "not_done": pending, "paper_row": paper_row,
                           "paper": {"mean_auc": paper[0], "sd_auc": paper[1]} if paper else None})
    return {"experiment": plan.config.name, "notes": plan.notes, "table1": table1, "table2": table2,
            "table2_column": t2["column"] if t2 else None, "stages": states}


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def table1_markdown(res: dict, plan: Plan) -> str:
    lines = [f"# Table 1: FID / MFID against parameters ({res['experiment']})", ""]
    n_settings = len({r["setting"] for r in res["table1"]})
    lines.append(f"Each parameter is varied around the centre setting; the centre repeats in every block, so the "
                 f"{len(res['table1'])} rows are {n_settings} distinct settings. Paper: de Wilde et al. 2024, Table 1 "
                 "(SD 2 on PI-CAI healthy T2W slices).")
    lines.append("")
    names = list(plan.metrics)
    head = ["parameter", "value", "class"]
    for m in names:
        head += [f"{m} (ours, 95% CI)", f"paper {PAPER_METRIC.get(plan.metrics[m]['extractor'], '-')}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["table1"]:
        cells = [PARAMETER_LABELS.get(r["parameter"], r["parameter"]), str(r["value"]) + (" (centre)" if r["centre"] else ""),
                 r["class"]]
        for m in names:
            v = r["metrics"].get(m, {})
            if v.get("status") == "done":
                ci = f" ({_fmt(v['ci_low'])}, {_fmt(v['ci_high'])})" if v.get("ci_low") is not None else ""
                cells.append(f"{_fmt(v['value'])}{ci}")
            else:
                cells.append(v.get("status", "-"))
            pm = PAPER_METRIC.get(plan.metrics[m]["extractor"])
            cells.append(str(r["paper"][pm]) if r.get("paper") and pm else "-")
        lines.append("| " + " | ".join(cells) + " |")
    centre = next((r for r in res["table1"] if r["centre"]), None)
    mfid = next((m for m in names if plan.metrics[m]["extractor"] == "radimagenet"), None)
    lines += ["", f"Appendix A (paper): MFID of the centre setting {APPENDIX_A_MFID_CI[0]} "
                  f"(95% CI {APPENDIX_A_MFID_CI[1]}, {APPENDIX_A_MFID_CI[2]})."]
    if centre and mfid and centre["metrics"][mfid].get("status") == "done":
        v = centre["metrics"][mfid]
        lines.append(f"Ours: {_fmt(v['value'])} (95% CI {_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}).")
    for note in res["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def table2_markdown(res: dict) -> str:
    col = res["table2_column"]
    lines = [f"# Table 2: classifier test AUC, real + synthetic training data ({res['experiment']})", "",
             "Mean ± sd of the test AUC (best-validation checkpoint) over the runs; * = synthetic images from "
             f"embeddings trained on fewer cases. Paper column: {col}.", "",
             "| mix | # real | # synthetic | AUC (ours) | runs | paper row | paper AUC |", "|---|---|---|---|---|---|---|"]
    for r in res["table2"]:
        ours = f"{r['mean_auc']:.3f} ± {r['sd_auc']:.3f}" if r["mean_auc"] is not None else "not done"
        star = f" (cases {r['train']['cases']})" if r["train"].get("cases") else ""
        paper = f"{r['paper']['mean_auc']:.3f} ± {r['paper']['sd_auc']:.3f}" if r["paper"] else "-"
        row = TABLE2_ROWS.get(r["paper_row"]) if r["paper_row"] else None
        prow = f"{r['paper_row']}: {row[0]} + {row[1]}" if row else "-"
        lines.append(f"| {r['mix']} | {r['real']} | {r['synthetic']}{star} | {ours} | {r['runs_done']}/{r['runs']} "
                     f"| {prow} | {paper} |")
    return "\n".join(lines) + "\n"


def _plot_table1(res: dict, plan: Plan, out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for m in plan.metrics:
        params = [p for p in ("steps", "cfg", "n_vectors", "cases") if any(r["parameter"] == p for r in res["table1"])]
        fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2), squeeze=False)
        pm = PAPER_METRIC.get(plan.metrics[m]["extractor"])
        for ax, p in zip(axes[0], params):
            rows = [r for r in res["table1"] if r["parameter"] == p and r["metrics"][m].get("status") == "done"]
            xs = [r["value"] for r in rows]
            ys = [r["metrics"][m]["value"] for r in rows]
            lo = [r["metrics"][m]["value"] - (r["metrics"][m]["ci_low"] or r["metrics"][m]["value"]) for r in rows]
            hi = [(r["metrics"][m]["ci_high"] or r["metrics"][m]["value"]) - r["metrics"][m]["value"] for r in rows]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=f"ours ({m})")
            ax.set_xlabel(PARAMETER_LABELS[p])
            ax.set_ylabel(m)
            if pm:
                paper = sorted(TABLE1[p].items())
                ax2 = ax.twinx()
                ax2.plot([k for k, _ in paper], [v[0 if pm == "FID" else 1] for _, v in paper], "s--", color="grey",
                         label=f"paper {pm}")
                ax2.set_ylabel(f"paper {pm}", color="grey")
        fig.tight_layout()
        path = out / f"table1_{m}.png"
        fig.savefig(path, dpi=90, metadata={"Software": None})
        plt.close(fig)
        figs.append((f"{m} against each parameter (bars: bootstrap CI; grey: the paper)", path))
    return figs


def _plot_table2(res: dict, out: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["table2"] if r["mean_auc"] is not None]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.5))
    x = np.arange(len(rows))
    ax.bar(x, [r["mean_auc"] for r in rows], yerr=[r["sd_auc"] for r in rows], capsize=3, label="ours")
    paper = [(i, r["paper"]) for i, r in enumerate(rows) if r["paper"]]
    if paper:
        ax.errorbar([i for i, _ in paper], [p["mean_auc"] for _, p in paper], yerr=[p["sd_auc"] for _, p in paper],
                    fmt="D", color="black", capsize=3, label="paper")
    ax.set_xticks(x, [r["mix"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test AUC (mean ± sd)")
    ax.legend()
    fig.tight_layout()
    path = out / "table2_auc.png"
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return [("test AUC per mix (bars: sd over runs)", path)]


def write_results(plan: Plan, store: StageStore) -> Path:
    """Write the results folder; returns ``report.html``'s path."""
    from medical_diffusion.demo.report import Section, render_report

    out = store.workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    res = collect(plan, store)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, sort_keys=True))
    sections = []
    if res["table1"]:
        atomic_write_text(out / "table1.md", table1_markdown(res, plan))
        text = (out / "table1.md").read_text("utf-8")
        sections.append(Section("Table 1: FID / MFID against parameters", "", _plot_table1(res, plan, out),
                                _md_table(text)))
    if res["table2"]:
        atomic_write_text(out / "table2.md", table2_markdown(res))
        sections.append(Section("Table 2: classifier AUC per mix", "", _plot_table2(res, out),
                                _md_table((out / "table2.md").read_text("utf-8"))))
    grids = []
    keys = {s.id: s.key for s in plan.stages}
    for s in plan.stages:
        rec = store.done_record(s.id, s.key) if s.kind == "generate" else None
        if rec and rec["outputs"].get("grid"):
            src = store.final(s.id, keys[s.id]) / rec["outputs"]["grid"]
            if src.is_file():
                dest = out / "grids" / (s.id.replace("/", "_") + ".png")
                dest.parent.mkdir(exist_ok=True)
                shutil.copyfile(src, dest)
                grids.append((s.id.removeprefix("generate/"), dest))
    if grids:
        sections.append(Section("Sample grids per setting", "The first images of every generated set.", grids))
    counts: dict[str, int] = {}
    for state in res["stages"].values():
        counts[state] = counts.get(state, 0) + 1
    sections.append(Section("Stages", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ". Details: "
                            "`meddiff experiment status`.", [], None))
    intro = " ".join(res["notes"]) or "All metrics computed."
    if is_tiny_model(plan.config.data.get("model")):
        intro = ("Tiny random-weight model and phantom data: the workflow runs for real, the numbers say nothing "
                 "about medical image quality. " + intro)
    return render_report(out / "report.html", f"Experiment {res['experiment']}", intro, sections)


def _md_table(text: str) -> list[list[str]] | None:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    if len(rows) < 2:
        return None
    return [[c.strip() for c in r.strip("|").split("|")] for r in [rows[0]] + rows[2:]]
