"""Evaluate tab: FID / MFID with a bootstrap CI, and classifier experiments on real + synthetic data."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator, Optional, Tuple

import gradio as gr

from medical_diffusion.evaluation.weights import MissingWeightsError
from medical_diffusion.ui.context import UIContext, evaluation_device
from medical_diffusion.ui.feedback import shows_errors

_SETTINGS = "in the webui also: Settings > Medical Diffusion"
#: what to do in this tab when a weights file is missing (the core error says what and where)
TAB_WEIGHTS_HINTS = {
    "inception": f"or put the file's path in the 'Weights file' box ({_SETTINGS})",
    "radimagenet": f"or put the file's path (.pth, or the Keras .h5) in the 'Weights file' box ({_SETTINGS})",
    "resnet18": f"or put the path of resnet18-f37072fd.pth in the 'ResNet-18 weights' box ({_SETTINGS})",
}


@contextlib.contextmanager
def tab_hints():
    """Re-raise a missing-weights error with what to do in this tab."""
    try:
        yield
    except MissingWeightsError as exc:
        raise exc.with_hint(TAB_WEIGHTS_HINTS.get(exc.kind, "or put the file's path in the weights box")) from None


JobFn = Callable[[Callable[[str, int, int], None], Callable[[str], None]], Any]


def stream_job(job: JobFn, interval: float = 0.5) -> Iterator[Tuple[str, Optional[Any]]]:
    """Run ``job(progress, log)`` in a thread and yield ``(log text, None)`` whenever the log or
    the progress line changes, then ``(log text, result)``; the job's exception is re-raised here."""
    lines: list = []
    status = [""]
    box: dict = {}
    done = threading.Event()

    def log(message: str) -> None:
        lines.append(str(message))

    def progress(stage: str, step: int, total: int) -> None:
        status[0] = f"{stage}: step {step}/{total}"

    def work() -> None:
        try:
            box["result"] = job(progress, log)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="md-evaluate-job", daemon=True).start()
    shown = None
    while not done.wait(interval):
        text = "\n".join(lines + ([status[0]] if status[0] else []))
        if text != shown:
            shown = text
            yield text, None
    if "error" in box:
        raise box["error"]
    yield "\n".join(lines), box["result"]


def _optional(ctx: UIContext, text: str):
    return str(ctx.path(text, must_exist=True)) if (text or "").strip() else None


def build(ctx: UIContext) -> None:
    from medical_diffusion.evaluation.classifier import ClassifierConfig, parse_mix, run_experiments
    from medical_diffusion.evaluation.fid import compute_fid

    with gr.Tab("FID / MFID"):
        with gr.Row():
            real = gr.Textbox(label="Real images folder (or .npz statistics)", elem_id="md_eval_real")
            generated = gr.Textbox(label="Generated images folder", elem_id="md_eval_generated")
        with gr.Row():
            extractor = gr.Radio(["inception", "radimagenet"], value="inception",
                                 label="Network (inception = FID, radimagenet = MFID)")
            weights = gr.Textbox(label="Weights file (empty: look in the usual places)", elem_id="md_eval_weights",
                                 value=ctx.defaults.get("inception_weights", ""))
            mode = gr.Radio(["paper", "clean"], value="paper", label="Preprocessing")
        with gr.Row():
            reps = gr.Number(value=1000, precision=0, label="Bootstrap repetitions (0: none; paper: 1000)",
                             elem_id="md_eval_reps")
            resample = gr.Radio(["both", "generated"], value="both", label="Resample")
            seed = gr.Number(value=0, precision=0, label="Seed")
        fid_btn = gr.Button("Compute", variant="primary", elem_id="md_eval_fid_run")
        fid_text = gr.Markdown(elem_id="md_eval_fid_result")
        fid_json = gr.JSON(label="Result (JSON)")
    with gr.Tab("Classifier experiments"):
        with gr.Row():
            cls_real = gr.Textbox(label="Real data (train/, val/, test/ with neg/ and pos/)", elem_id="md_eval_cls_real")
            cls_syn = gr.Textbox(label="Synthetic folder (neg/, pos/)", elem_id="md_eval_cls_syn")
            cls_out = gr.Textbox(label="Output folder", value=str(ctx.work_dir / "classifier"), elem_id="md_eval_cls_out")
        mixes = gr.Textbox(value="real=all:0\nreal_plus_synthetic=all:2000",
                           label="Mixes, one per line: [NAME=]REAL:SYNTH[:DIR] (Table 2 rows)", lines=3,
                           elem_id="md_eval_cls_mixes")
        with gr.Row():
            cls_weights = gr.Textbox(label="ResNet-18 weights (resnet18-f37072fd.pth)", elem_id="md_eval_cls_weights",
                                     value=ctx.defaults.get("resnet18_weights", ""))
            cls_steps = gr.Number(value=6250, precision=0, label="Steps (paper: 6250)", elem_id="md_eval_cls_steps")
            cls_batch = gr.Number(value=32, precision=0, label="Batch size", elem_id="md_eval_cls_batch")
            cls_size = gr.Number(value=196, precision=0, label="Input size (paper: 196)", elem_id="md_eval_cls_size")
            cls_runs = gr.Number(value=10, precision=0, label="Runs per mix (paper: 10)", elem_id="md_eval_cls_runs")
            cls_bf16 = gr.Checkbox(False, label="bf16 (CPU)")
        with gr.Row():
            estimate_btn = gr.Button("Time estimate", elem_id="md_eval_cls_estimate")
            cls_btn = gr.Button("Run (resumable)", variant="primary", elem_id="md_eval_cls_run")
        cls_log = gr.Textbox(label="Log", lines=8, elem_id="md_eval_cls_log")
        with gr.Row():
            cls_table = gr.Dataframe(headers=["mix", "real", "synthetic", "runs", "mean AUC", "sd"],
                                     interactive=False, elem_id="md_eval_cls_table")
            roc = gr.Image(label="ROC", type="filepath", interactive=False, elem_id="md_eval_cls_roc")

    def stage_progress(progress):
        return lambda stage, done, total: progress(done / max(total, 1), desc=stage)

    @shows_errors
    @tab_hints()
    def do_fid(r, g, ext, w, m, n, rs, sd, progress=gr.Progress()):
        result = compute_fid(ctx.path(r, must_exist=True), ctx.path(g, must_exist=True), extractor=ext,
                             weights=_optional(ctx, w or default_weights(ext)), mode=m, bootstrap_reps=int(n),
                             resample=rs, seed=int(sd), cache_dir=ctx.work_dir / "feature_cache",
                             progress=stage_progress(progress), device=evaluation_device(ctx), workers=None)
        return result.summary(), json.loads(json.dumps(result.to_dict(), default=str))

    def default_weights(ext):
        key = "inception_weights" if ext == "inception" else "radimagenet_weights"
        return ctx.defaults.get(key, "")

    extractor.change(default_weights, [extractor], [weights])
    fid_btn.click(do_fid, [real, generated, extractor, weights, mode, reps, resample, seed], [fid_text, fid_json])

    def classifier_args(r, syn, out, mix_text, w, steps, batch, size, runs, bf16):
        specs = [parse_mix(line.strip(), _optional(ctx, syn)) for line in mix_text.splitlines() if line.strip()]
        weights = _optional(ctx, w or ctx.defaults.get("resnet18_weights", ""))
        config = ClassifierConfig(steps=int(steps), batch_size=int(batch), size=int(size), runs=int(runs),
                                  bf16=bool(bf16), weights=weights, device=str(evaluation_device(ctx)), workers=None)
        return ctx.path(r, must_exist=True), specs, ctx.path(out), config

    cls_inputs = [cls_real, cls_syn, cls_out, mixes, cls_weights, cls_steps, cls_batch, cls_size, cls_runs, cls_bf16]

    @shows_errors
    def do_estimate(*values):
        lines = []
        with tab_hints():
            real_root, specs, out, config = classifier_args(*values)
            run_experiments(real_root, specs, out, config, log=lines.append, estimate_only=True)
        return "\n".join(lines)

    @shows_errors
    def do_classify(*values):
        with tab_hints():
            real_root, specs, out, config = classifier_args(*values)
            job = lambda progress, log: run_experiments(real_root, specs, out, config, log=log,  # noqa: E731
                                                        progress=progress)
            for text, report in stream_job(job):
                if report is None:
                    yield text, gr.update(), gr.update()
                    continue
                rows = [[m["mix"], "all" if m["n_real"] is None else m["n_real"], m["n_synthetic"], m["runs"],
                         round(m["mean_auc"], 4), round(m["sd_auc"], 4)] for m in report["mixes"]]
                roc_path = out / "roc.png"
                yield text, rows, str(roc_path) if roc_path.is_file() else None

    estimate_btn.click(do_estimate, cls_inputs, [cls_log])
    cls_btn.click(do_classify, cls_inputs, [cls_log, cls_table, roc])
