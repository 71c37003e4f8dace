"""Prepare data tab: PI-CAI, CheXpert, PatchCamelyon and generic images -> training folders.

The dataset modules (and SimpleITK, h5py, pydicom behind them) are imported inside the handlers, so the
tab shows, and says which packages are missing (:func:`missing_dependencies`), when some are absent.
"""

from __future__ import annotations

import importlib.util
import sys

import gradio as gr

from medical_diffusion.errors import MedDiffError
from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import reports_in_status, status_line

SPLITS = ("train", "val", "test")
FAILURE_HEADERS = ["item", "source", "problem"]
#: the contact sheet's display height (px): a one-image sheet is not blown up to the page's width
SHEET_HEIGHT = 512
#: module -> pip package, per dataset kind
DEPENDENCIES = {
    "picai": {"SimpleITK": "SimpleITK"},
    "chexpert": {},
    "pcam": {"h5py": "h5py"},
    "images": {"SimpleITK": "SimpleITK", "pydicom": "pydicom"},
}


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked (or known missing)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_dependencies(dataset: str | None = None) -> list[str]:
    """pip names of the packages that preparing ``dataset`` (default: any dataset) needs and that are not
    importable; checked without importing them."""
    kinds = [dataset] if dataset else list(DEPENDENCIES)
    missing: list[str] = []
    for kind in kinds:
        for module, package in DEPENDENCIES[kind].items():
            if package not in missing and not _importable(module):
                missing.append(package)
    return missing


def require_dependencies(dataset: str) -> None:
    """Raise "SimpleITK is missing: pip install SimpleITK" (etc.) when ``dataset`` cannot be prepared."""
    missing = missing_dependencies(dataset)
    if missing:
        raise MedDiffError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
                           f"pip install {' '.join(missing)}")


def _n(value) -> int | None:
    """Images per class from the number box: 0 (or empty) = all; negative is an error."""
    if value in (None, ""):
        return None
    n = int(value)
    if n < 0:
        raise MedDiffError(f"images per class must be 0 (all) or more, got {n}")
    return n or None


def failure_table(failures) -> dict:
    """The failures as a Dataframe value that keeps its headers when empty."""
    rows = [[f.key, f.source, f.error] for f in failures]
    return {"headers": FAILURE_HEADERS, "data": rows or [["" for _ in FAILURE_HEADERS]]}


def summary(result) -> tuple[str, dict, str | None]:
    """Markdown summary, failure table and the contact sheet path of a :class:`BatchResult`."""
    sheet = result.out_dir / "contact_sheet.png"
    text = (f"Made **{result.processed}**, skipped **{result.skipped}** (already done), "
            f"failed **{len(result.failures)}**. Output: `{result.out_dir}` "
            f"(manifest: `{result.manifest_path.name}`).")
    provenance = getattr(result, "provenance_dir", None)
    if provenance is not None:
        text += (f" Case IDs and source paths (provenance, failures, resume journal) are kept apart in "
                 f"`{provenance}`: share the output folder, not that one.")
    warnings = getattr(result, "warnings", [])
    if warnings:
        text += "\n\nWarnings:\n" + "\n".join(f"- `{w.key}`: {w.error}" for w in warnings[:20])
    return text, failure_table(result.failures), str(sheet) if sheet.is_file() else None


def build(ctx: UIContext) -> dict:
    """Add the tab's widgets; returns its handlers (``picai``, ``chexpert``, ``pcam``, ``generic``). A
    failed run says why in the status line and clears the failure table and contact sheet of the run
    before (a batch's per-item failures are its table, and the batch goes on)."""
    missing = missing_dependencies()
    if missing:
        needs = {p: [k for k, deps in DEPENDENCIES.items() if p in deps.values()] for p in missing}
        gr.Markdown("**Not installed:** " + "; ".join(
            f"{p} (needed for {', '.join(kinds)}): `pip install {p}`" for p, kinds in needs.items()),
            elem_id="md_prep_missing")
    with gr.Row():
        out = gr.Textbox(label="Output folder", value=str(ctx.work_dir / "prepared"), elem_id="md_prep_out")
        n_per_class = gr.Number(value=100, precision=0, label="Images per class (exactly N at random; 0: all; paper: 100)",
                                elem_id="md_prep_n")
        make_splits = gr.Checkbox(False, label="Also make patient-disjoint train/val/test sets")
        seed = gr.Number(value=0, precision=0, label="Seed")
        workers = gr.Slider(1, 16, value=1, step=1, label="Workers")
    with gr.Tabs():
        with gr.Tab("PI-CAI prostate MRI", elem_id="md_prep_picai"):
            with gr.Row():
                picai_images = gr.Textbox(label="images/ folder (<pid>/<pid>_<sid>_{t2w,adc,hbv}.mha)",
                                          elem_id="md_prep_picai_images")
                picai_labels = gr.Textbox(label="picai_labels folder", elem_id="md_prep_picai_labels")
            with gr.Row():
                picai_mode = gr.Radio(["paper", "aligned"], value="paper", label="Mode")
                picai_channels = gr.Radio(["rgb", "t2w", "adc", "hbv"], value="rgb",
                                          label="Channels (rgb = T2W/ADC/HBV)")
                picai_labels_from = gr.Radio(["combined", "human", "marksheet"], value="combined",
                                             label="Label source")
            picai_btn = gr.Button("Prepare PI-CAI", variant="primary", elem_id="md_prep_picai_run")
        with gr.Tab("CheXpert chest X-ray"):
            with gr.Row():
                cx_csv = gr.Textbox(label="train.csv")
                cx_root = gr.Textbox(label="Image root (folder holding train/...)")
            with gr.Row():
                cx_classes = gr.Textbox(value="No Finding, Cardiomegaly, Pleural Effusion, Pneumonia",
                                        label="Classes (comma-separated; exactly one positive per image)")
                cx_uncertain = gr.Radio(["zeros", "ones", "exclude"], value="zeros",
                                        label="Uncertain (-1) labels count as")
            cx_btn = gr.Button("Prepare CheXpert", variant="primary")
        with gr.Tab("PatchCamelyon histopathology"):
            with gr.Row():
                pcam_x = gr.Textbox(label="x HDF5 (…_x.h5)")
                pcam_y = gr.Textbox(label="y HDF5 (…_y.h5)")
            pcam_btn = gr.Button("Prepare PatchCamelyon", variant="primary")
        with gr.Tab("DICOM / NIfTI / PNG"):
            with gr.Row():
                gen_inputs = gr.Textbox(label="Files or folders (one per line)", lines=3, elem_id="md_prep_gen_inputs")
                gen_label = gr.Textbox(value="images", label="Class name", elem_id="md_prep_gen_label")
            with gr.Row():
                gen_window = gr.Textbox(value="auto", label="Window: auto, minmax, percentile, or C,W")
                gen_slice = gr.Textbox(value="middle", label="Slice(s) of volumes and series: middle, 9, all, "
                                                             "5-12 or 3,5,9-11 (chosen slices: NAME_s009.png)")
                gen_mask = gr.Textbox(label="Mask file/folder for slice choice (optional)")
            gen_btn = gr.Button("Import", variant="primary", elem_id="md_prep_gen_run")
    status = status_line(elem_id="md_prep_status")
    failures = gr.Dataframe(headers=FAILURE_HEADERS, label="Failures (the batch went on)",
                            interactive=False, wrap=True)
    # no label: it would cover the sheet's title; a height, and shown no larger than it is (style.css):
    # a one-image sheet is not blown up to the page's width
    sheet = gr.Image(label="Contact sheet", show_label=False, height=SHEET_HEIGHT, type="filepath",
                     interactive=False, elem_id="md_prep_sheet", elem_classes=["md-natural-size"])

    def common(o, n, sp, sd, w):
        out_dir = ctx.path(o)
        from medical_diffusion.datasets.layout import provenance_folder

        provenance = ctx.path(provenance_folder(out_dir))  # beside the output folder, inside the allowed roots
        return dict(out=str(out_dir), provenance=str(provenance), n_per_class=_n(n), splits=SPLITS if sp else (),
                    seed=int(sd), workers=int(w))

    def progress_cb(progress):
        if progress is None:
            return None
        return lambda done, total, message="": progress(done / max(total, 1), desc=message or None)

    reports = reports_in_status(3, status=0)

    @reports
    def run_picai(images, labels, mode, channels, src, o, n, sp, sd, w, progress=gr.Progress()):
        require_dependencies("picai")
        from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai

        opts = PicaiOptions(images=str(ctx.path(images, must_exist=True)), labels=str(ctx.path(labels, must_exist=True)),
                            mode=mode, channels=channels, label_source=src, **common(o, n, sp, sd, w))
        return summary(prepare_picai(opts, progress=progress_cb(progress)))

    @reports
    def run_chexpert(csv, root, classes, unc, o, n, sp, sd, w, progress=gr.Progress()):
        from medical_diffusion.datasets.chexpert import ChexpertOptions, prepare_chexpert

        names = tuple(c.strip() for c in classes.split(",") if c.strip())
        opts = ChexpertOptions(csv=str(ctx.path(csv, must_exist=True)), root=str(ctx.path(root, must_exist=True)),
                               classes=names, uncertain=unc, **common(o, n, sp, sd, w))
        return summary(prepare_chexpert(opts, progress=progress_cb(progress)))

    @reports
    def run_pcam(x, y, o, n, sp, sd, w, progress=gr.Progress()):
        require_dependencies("pcam")
        from medical_diffusion.datasets.pcam import PcamOptions, prepare_pcam

        opts = PcamOptions(x=str(ctx.path(x)), y=str(ctx.path(y)), **common(o, n, sp, sd, w))
        return summary(prepare_pcam(opts, progress=progress_cb(progress)))

    @reports
    def run_generic(inputs, label, window, sl, mask, o, n, sp, sd, w, progress=gr.Progress()):
        require_dependencies("images")
        from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images

        paths = tuple(str(ctx.path(line.strip(), must_exist=True)) for line in inputs.splitlines() if line.strip())
        if not paths:
            raise ValueError("give at least one file or folder")
        opts = ImportOptions(inputs=paths, label=label.strip() or "images", window=window.strip() or "auto",
                             slice_index=str(sl or "").strip() or None,
                             mask=str(ctx.path(mask, must_exist=True)) if mask.strip() else None,
                             **common(o, n, sp, sd, w))
        return summary(prepare_images(opts, progress=progress_cb(progress)))

    shared_inputs = [out, n_per_class, make_splits, seed, workers]
    outputs = [status, failures, sheet]
    picai_btn.click(run_picai, [picai_images, picai_labels, picai_mode, picai_channels, picai_labels_from,
                                *shared_inputs], outputs)
    cx_btn.click(run_chexpert, [cx_csv, cx_root, cx_classes, cx_uncertain, *shared_inputs], outputs)
    pcam_btn.click(run_pcam, [pcam_x, pcam_y, *shared_inputs], outputs)
    gen_btn.click(run_generic, [gen_inputs, gen_label, gen_window, gen_slice, gen_mask, *shared_inputs], outputs)
    return {"picai": run_picai, "chexpert": run_chexpert, "pcam": run_pcam, "generic": run_generic}
