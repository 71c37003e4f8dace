"""The local executor: stages in topological order in this process, or one worker process per GPU.

With ``gpus`` each worker is ``python -m medical_diffusion.experiment.worker`` with
``CUDA_VISIBLE_DEVICES`` set to its GPU; the driver hands every idle worker the next stage whose
inputs are done. Not a scheduler beyond that: no priorities, no packing.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from typing import Callable

from medical_diffusion.progress_bar import StepBar

BAD = ("failed", "blocked")


def _blocked(spec: dict, statuses: dict[str, dict]) -> list[str]:
    return [d for d in spec["dep_order"] if statuses.get(d, {}).get("status") in BAD]


def run_in_process(specs: list[dict], bars: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
    """Run ``specs`` (topologically ordered) here, one by one; returns one status per spec."""
    from tqdm import tqdm

    from medical_diffusion.experiment.stages import run_stage

    statuses: dict[str, dict] = {}
    overall = tqdm(total=len(specs), desc="stages", unit="stage", disable=not bars, dynamic_ncols=True)
    try:
        for spec in specs:
            bad = _blocked(spec, statuses)
            if bad:
                statuses[spec["id"]] = {"id": spec["id"], "status": "blocked", "error": f"needs {', '.join(bad)}"}
            else:
                bar = StepBar(spec["id"], leave=False) if bars else None
                try:
                    statuses[spec["id"]] = run_stage(spec, bar)
                finally:
                    if bar:
                        bar.close()
                st = statuses[spec["id"]]
                line = f"{st['status']:>6}  {spec['id']}" + (f"  ({st['seconds']:.1f} s)" if "seconds" in st else "")
                overall.write(line) if bars else echo(line)
            overall.update(1)
    finally:
        overall.close()
    return [statuses[s["id"]] for s in specs]


def run_with_workers(specs: list[dict], gpus: list[str], echo: Callable[[str], None] = print) -> list[dict]:
    """One worker process per entry of ``gpus``; each takes the next ready stage."""
    from tqdm import tqdm

    pending = list(specs)
    by_id = {s["id"]: s for s in specs}
    statuses: dict[str, dict] = {}
    in_todo = set(by_id)
    workers = []
    sel = selectors.DefaultSelector()
    for gpu in gpus:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        proc = subprocess.Popen([sys.executable, "-m", "medical_diffusion.experiment.worker"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        w = {"gpu": gpu, "proc": proc, "busy": None}
        workers.append(w)
        sel.register(proc.stdout, selectors.EVENT_READ, w)
    overall = tqdm(total=len(specs), desc="stages", unit="stage", dynamic_ncols=True)

    def ready(spec: dict) -> bool:
        return all(d not in in_todo or statuses.get(d, {}).get("status") in ("ok", "cached") for d in spec["dep_order"])

    try:
        while len(statuses) < len(specs):
            for spec in list(pending):  # blocked stages need no worker
                bad = _blocked(spec, statuses)
                if bad:
                    pending.remove(spec)
                    statuses[spec["id"]] = {"id": spec["id"], "status": "blocked", "error": f"needs {', '.join(bad)}"}
                    overall.update(1)
            for w in workers:
                if w["busy"] is None and w["proc"].poll() is None:
                    nxt = next((s for s in pending if ready(s)), None)
                    if nxt is None:
                        break
                    pending.remove(nxt)
                    w["busy"] = nxt["id"]
                    w["proc"].stdin.write(json.dumps(nxt) + "\n")
                    w["proc"].stdin.flush()
                    overall.write(f" start  {nxt['id']}  (GPU {w['gpu']})")
            if len(statuses) >= len(specs):
                break
            if not any(w["busy"] for w in workers):
                if not any(w["proc"].poll() is None for w in workers):
                    raise RuntimeError("every worker process has exited")
                continue
            for key, _ in sel.select(timeout=1.0):
                w = key.data
                line = key.fileobj.readline()
                if not line:  # the worker died: its stage failed
                    sel.unregister(key.fileobj)
                    if w["busy"]:
                        statuses[w["busy"]] = {"id": w["busy"], "status": "failed",
                                               "error": f"worker for GPU {w['gpu']} exited (code {w['proc'].wait()})"}
                        overall.update(1)
                        w["busy"] = None
                    continue
                st = json.loads(line)
                statuses[st["id"]] = st
                w["busy"] = None
                overall.write(f"{st['status']:>6}  {st['id']}  (GPU {w['gpu']})")
                overall.update(1)
    finally:
        overall.close()
        for w in workers:
            if w["proc"].poll() is None:
                w["proc"].stdin.close()
        for w in workers:
            try:
                w["proc"].wait(timeout=30)
            except subprocess.TimeoutExpired:
                w["proc"].kill()
    return [statuses[s["id"]] for s in specs]
