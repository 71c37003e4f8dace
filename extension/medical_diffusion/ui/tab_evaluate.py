"""Evaluate tab: FID / MFID with a bootstrap CI, and classifier experiments on real + synthetic data."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator, Optional, Tuple

import gradio as gr

from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation.weights import MissingWeightsError
from medical_diffusion.ui.context import UIContext, evaluation_device
from medical_diffusion.ui.feedback import escape_markdown, reports_in_status, status_line
from medical_diffusion.ui.stopping import StepClock, StopFlag, add_stop_button, stopping_progress

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


MIXES_BOX = "Mixes"
#: the paper's Table 2 rows: real only, and real plus 2000 synthetic images (1000 per class)
DEFAULT_MIXES = "real=all:0\nreal_plus_synthetic=all:2000"


def parse_mixes(text: str, synthetic: str | None, resolve: Callable[..., Any] | None = None) -> list:
    """``[(line number, MixSpec)]`` of the Mixes box, one mix per line; an error names the box and the
    line. ``resolve`` (``UIContext.path``) checks a line's own ``:DIR`` like every other path."""
    import dataclasses

    from medical_diffusion.evaluation.classifier import parse_mix

    specs = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            spec = parse_mix(line.strip(), synthetic)
            if resolve is not None and spec.synthetic_dir and spec.synthetic_dir != synthetic:
                folder = resolve(spec.synthetic_dir, must_exist=True, kind="folder", label="synthetic folder")
                spec = dataclasses.replace(spec, synthetic_dir=str(folder))
        except MedDiffError as exc:
            raise MedDiffError(f"{MIXES_BOX} box, line {number}: {exc}") from None
        specs.append((number, spec))
    if not specs:
        raise MedDiffError(f"the {MIXES_BOX} box is empty: give one mix per line, e.g. real=all:0")
    return specs


def most_balanced(n_neg: int, n_pos: int) -> int:
    """The largest count a balanced draw can take from ``n_neg`` and ``n_pos`` images (negatives take
    the odd one): ``ceil(t / 2) <= n_neg`` and ``floor(t / 2) <= n_pos``."""
    return max(0, min(2 * n_neg, 2 * n_pos + 1))


def check_mix_counts(specs: list, real_train) -> None:
    """Each mix asks for no more real or synthetic images than its folders hold; the error names the
    Mixes box, the line, what is available and the most that line can ask for."""
    from medical_diffusion.evaluation.classifier_data import labelled_files

    counted: dict = {}

    def counts(folder) -> tuple[int, int]:
        key = str(folder)
        if key not in counted:
            labels = [label for _, label in labelled_files(folder)]
            counted[key] = (labels.count(0), labels.count(1))
        return counted[key]

    for number, mix in specs:
        for what, want, folder in (("real", mix.n_real, real_train), ("synthetic", mix.n_synthetic, mix.synthetic_dir)):
            if not want:
                continue
            n_neg, n_pos = counts(folder)
            if want > most_balanced(n_neg, n_pos):
                raise MedDiffError(
                    f"{MIXES_BOX} box, line {number} ({mix.name}): asks for {want} {what} images "
                    f"({want - want // 2} neg + {want // 2} pos), but {folder} has {n_neg} neg and {n_pos} pos; "
                    f"ask for at most {most_balanced(n_neg, n_pos)} {what} images on that line")


def mixes_for(ctx: UIContext, synthetic: str, current: str):
    """The default mixes sized to the synthetic folder once one is given (its synthetic count capped at
    what the folder holds, balanced); a Mixes box the user has changed stays as it is."""
    from medical_diffusion.evaluation.classifier_data import labelled_files

    if (current or "").strip() != DEFAULT_MIXES or not (synthetic or "").strip():
        return gr.update()
    try:
        labels = [label for _, label in labelled_files(ctx.path(synthetic, must_exist=True))]
    except MedDiffError:  # not (yet) a neg/pos folder: the run will say so
        return gr.update()
    n = min(2000, most_balanced(labels.count(0), labels.count(1)))
    return DEFAULT_MIXES.replace("all:2000", f"all:{n}") if n else "real=all:0"



def build(ctx: UIContext) -> dict:
    """The FID/MFID and classifier sub-tabs. A failure or a stop says why in the sub-tab's status line
    and clears the result shown before (no old FID value stands for a failed run)."""
    from medical_diffusion.evaluation.classifier import ClassifierConfig, run_experiments
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
        with gr.Row():
            fid_btn = gr.Button("Compute", variant="primary", elem_id="md_eval_fid_run")
            fid_stop = gr.Button("Stop", variant="stop", elem_id="md_eval_fid_stop")
        fid_text = status_line(elem_id="md_eval_fid_result")
        fid_json = gr.JSON(label="Result (JSON)")
    with gr.Tab("Classifier experiments"):
        with gr.Row():
            cls_real = gr.Textbox(label="Real data (train/, val/, test/ with neg/ and pos/)", elem_id="md_eval_cls_real")
            cls_syn = gr.Textbox(label="Synthetic folder (neg/, pos/)", elem_id="md_eval_cls_syn")
            cls_out = gr.Textbox(label="Output folder", value=str(ctx.work_dir / "classifier"), elem_id="md_eval_cls_out")
        mixes = gr.Textbox(value=DEFAULT_MIXES,
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
            cls_stop = gr.Button("Stop", variant="stop", elem_id="md_eval_cls_stop")
        cls_status = status_line(elem_id="md_eval_cls_status")
        cls_log = gr.Textbox(label="Log", lines=8, elem_id="md_eval_cls_log")
        # the table has a row of its own: beside the ROC its last column ("sd") was cut off
        cls_table = gr.Dataframe(headers=["mix", "real", "synthetic", "runs", "mean AUC", "sd"],
                                 interactive=False, wrap=True, elem_id="md_eval_cls_table")
        roc = gr.Image(label="ROC", type="filepath", interactive=False, elem_id="md_eval_cls_roc")

    fid_flag, cls_flag = StopFlag(), StopFlag()

    def stage_progress(progress):
        clocks: dict = {}

        def report(stage, done, total):
            clock = clocks.setdefault(stage, StepClock("batches" if stage.startswith("features") else "steps"))
            progress(done / max(total, 1), desc=f"{stage}: {clock.text(done, total)}")

        return report

    @reports_in_status(2, status=0)
    @tab_hints()
    def do_fid(r, g, ext, w, m, n, rs, sd, progress=gr.Progress()):
        with fid_flag.running(host_session=ctx.job_session, job="FID") as should_stop:
            result = compute_fid(ctx.path(r, must_exist=True), ctx.path(g, must_exist=True), extractor=ext,
                                 weights=_optional(ctx, w or default_weights(ext)), mode=m, bootstrap_reps=int(n),
                                 resample=rs, seed=int(sd), cache_dir=ctx.work_dir / "feature_cache",
                                 progress=stopping_progress(stage_progress(progress), should_stop),
                                 device=evaluation_device(ctx), workers=None)
        return escape_markdown(result.summary()), json.loads(json.dumps(result.to_dict(), default=str))

    def default_weights(ext):
        key = "inception_weights" if ext == "inception" else "radimagenet_weights"
        return ctx.defaults.get(key, "")

    extractor.change(default_weights, [extractor], [weights])
    fid_event = fid_btn.click(do_fid, [real, generated, extractor, weights, mode, reps, resample, seed],
                              [fid_text, fid_json])
    add_stop_button(fid_stop, fid_flag, [fid_event], fid_text)

    def classifier_args(r, syn, out, mix_text, w, steps, batch, size, runs, bf16):
        real_root = ctx.path(r, must_exist=True)
        numbered = parse_mixes(mix_text, _optional(ctx, syn), resolve=ctx.path)
        check_mix_counts(numbered, real_root / "train")
        weights = _optional(ctx, w or ctx.defaults.get("resnet18_weights", ""))
        config = ClassifierConfig(steps=int(steps), batch_size=int(batch), size=int(size), runs=int(runs),
                                  bf16=bool(bf16), weights=weights, device=str(evaluation_device(ctx)), workers=None)
        return real_root, [spec for _, spec in numbered], ctx.path(out), config

    cls_syn.blur(lambda syn, current: mixes_for(ctx, syn, current), [cls_syn, mixes], [mixes], queue=False)
    cls_inputs = [cls_real, cls_syn, cls_out, mixes, cls_weights, cls_steps, cls_batch, cls_size, cls_runs, cls_bf16]

    @reports_in_status(2, keep=[0])
    def do_estimate(*values):
        lines = []
        with tab_hints():
            real_root, specs, out, config = classifier_args(*values)
            run_experiments(real_root, specs, out, config, log=lines.append, estimate_only=True)
        return "\n".join(lines), ""

    @reports_in_status(4, keep=[0])
    def do_classify(*values):
        with tab_hints(), cls_flag.running(host_session=ctx.job_session, job="classifier") as should_stop:
            real_root, specs, out, config = classifier_args(*values)

            def job(progress, log):
                return run_experiments(real_root, specs, out, config, log=log,
                                       progress=stopping_progress(progress, should_stop))

            for text, report in stream_job(job):
                if report is None:
                    yield text, gr.update(), gr.update(), "Running..."
                    continue
                rows = [[m["mix"], "all" if m["n_real"] is None else m["n_real"], m["n_synthetic"], m["runs"],
                         round(m["mean_auc"], 4), round(m["sd_auc"], 4)] for m in report["mixes"]]
                roc_path = out / "roc.png"
                yield (text, rows, str(roc_path) if roc_path.is_file() else None,
                       f"Done: report in {escape_markdown(out / 'report.json')}")

    estimate_btn.click(do_estimate, cls_inputs, [cls_log, cls_status])
    cls_event = cls_btn.click(do_classify, cls_inputs, [cls_log, cls_table, roc, cls_status])
    add_stop_button(cls_stop, cls_flag, [cls_event], cls_status)
    return {"fid": do_fid, "classify": do_classify, "estimate": do_estimate, "stop_fid": fid_flag,
            "stop_classifier": cls_flag}
