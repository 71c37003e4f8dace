"""prepare -> train -> generate/interpolate -> evaluate on the tiny model and phantom data.

Every stage writes into one folder and is resumable: a second run reuses what the first made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medical_diffusion.demo.report import Section, render_report

log = logging.getLogger(__name__)

CLASSES = ("neg", "pos")
DEMO_NOTE = ("Workflow demo: a tiny random-weight SD2-shaped model and synthetic phantom scans. Every stage "
             "runs for real, but the model has never seen an image, so its pictures are noise and the "
             "metrics say nothing about medical image quality. Use --model with a real SD2 for real work.")


@dataclass
class DemoOptions:
    out: Path
    cases_per_class: int = 12
    split_per_class: int = 4  # phantoms per class in each of train/val/test
    train_steps: int = 60
    vectors: int = 64  # the paper's embedding size
    resolution: int = 64
    sample_steps: int = 12
    frames: int = 5
    images_per_class: int = 6
    # the classifier experiment, shortened for the demo (paper: 6250 steps of 32 at 196 px, 10 runs)
    classifier_steps: int = 12
    classifier_batch: int = 8
    classifier_size: int = 32
    classifier_runs: int = 2
    seed: int = 0
    #: where the tiny model runs (``meddiff demo --device/--precision``); default: the CPU in fp32
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    attention: str = "auto"
    timings: dict[str, float] = field(default_factory=dict)


def _stage(opts: DemoOptions, name: str):
    class _Timer:
        def __enter__(self):
            log.info("== %s", name)
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            opts.timings[name] = time.perf_counter() - self.t

    return _Timer()


def run_demo(opts: DemoOptions) -> Path:
    """Run every stage; returns the HTML report's path."""
    from medical_diffusion.backend.tiny import TINY_LABEL, build_tiny_backend
    from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai
    from medical_diffusion.demo.phantoms import write_phantom_cohort
    from medical_diffusion.embeddings import load_embedding, save_embedding
    from medical_diffusion.generation.interpolation import frames_grid, interpolate_prompts
    from medical_diffusion.generation.synthetic_set import SetParams, generate_set
    from medical_diffusion.png_io import save_png
    from medical_diffusion.training.config import TrainConfig
    from medical_diffusion.training.loop import train

    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []

    with _stage(opts, "phantoms"):
        phantoms = out / "phantoms"
        if not (phantoms / "labels").is_dir():
            write_phantom_cohort(phantoms, opts.cases_per_class, seed=opts.seed)
    with _stage(opts, "prepare"):
        prepared = prepare_picai(PicaiOptions(images=str(phantoms / "images"), labels=str(phantoms / "labels"),
                                              out=str(out / "prepared"), size=128, seed=opts.seed,
                                              n_per_class=opts.split_per_class, splits=("train", "val", "test")))
        sections.append(Section(
            "1. Prepare (PI-CAI paper mode)",
            f"{len(prepared.rows)} slices from {2 * opts.cases_per_class} phantom cases (T2W/ADC/HBV as RGB), "
            f"{len(prepared.failures)} failures. Command twin: meddiff prepare picai.",
            [("contact sheet", out / "prepared" / "contact_sheet.png")]))

    backend = build_tiny_backend(seed=opts.seed, device=opts.device, dtype=opts.dtype, attention=opts.attention)
    names = {cls: f"phantom_{cls}" for cls in CLASSES}
    with _stage(opts, "train"):
        train_rows, images = [["embedding", "steps", "final loss", "vectors", "file size"]], []
        for cls, name in names.items():
            config = TrainConfig(name=name, data_dir=str(out / "prepared" / "embedding" / cls), model="tiny",
                                 n_vectors=opts.vectors, steps=opts.train_steps, resolution=opts.resolution,
                                 save_every=opts.train_steps, preview_every=opts.train_steps,
                                 preview_steps=opts.sample_steps, seed=opts.seed)
            run_dir = out / "runs" / name
            resume = (run_dir / "run_config.json").is_file()
            result = train(config, backend, run_dir, resume=resume)
            emb = load_embedding(result.embedding_path, expected_width=backend.text_width)
            target = save_embedding(emb, out / "embeddings" / f"{name}.pt", force=True)
            loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "-"
            train_rows.append([name, str(result.steps_done), loss, str(emb.n_vectors), f"{target.stat().st_size} B"])
            if (run_dir / "loss.png").is_file():
                images.append((f"{name} loss", run_dir / "loss.png"))
        sections.append(Section(
            "2. Train embeddings (template-free prompt = the name)",
            f"{opts.vectors} vectors per embedding, as in the paper (the tiny model's text encoder has the "
            f"same 77 positions as SD2's, so they fit the prompt). {opts.train_steps} steps each (paper: 50,000). "
            "The two loss curves look alike: the loss is the error of the random UNet's noise prediction, which "
            "the embedding can hardly change, and both runs use the same seed, so they draw the same noise and "
            "timesteps at every step. With a real SD2 the curves differ. Command twin: meddiff train.",
            images, train_rows))

    vectors = {name: load_embedding(out / "embeddings" / f"{name}.pt", expected_width=backend.text_width).vectors
               for name in names.values()}
    sample = dict(steps=opts.sample_steps, cfg_scale=2.0, width=opts.resolution, height=opts.resolution)
    with _stage(opts, "interpolate"):
        frames = interpolate_prompts(backend, names["neg"], names["pos"], opts.frames, embeddings=vectors,
                                     seed=opts.seed, **sample)
        grid_path = out / "interpolation.png"
        save_png(frames_grid(frames, title="healthy -> diseased (composable diffusion)", cell=128), grid_path)
        change = frame_change(frames[0].image, frames[-1].image)
        sections.append(Section(
            "3. Interpolate healthy -> diseased",
            "; ".join(f.prompt for f in frames) + f". The first and last frames differ by {change:.2f} grey "
            "levels per pixel on average (0-255): the frames look identical because every frame starts from the "
            "same seed and the random-weight model's cross-attention barely lets the prompt steer the picture. "
            "With a real SD2 and trained embeddings the lesion appears gradually. Command twin: meddiff interpolate.",
            [("interpolation", grid_path)]))
    with _stage(opts, "generate"):
        params = SetParams(classes={cls: names[cls] for cls in CLASSES}, seed=opts.seed, model="tiny", **sample)
        result = generate_set(backend, params, out / "synthetic", opts.images_per_class, embeddings=vectors)
        sheet = out / "synthetic_sheet.png"
        save_png(synthetic_sheet(out / "synthetic"), sheet)
        sections.append(Section(
            "4. Generate a synthetic set",
            f"{result.generated} new, {result.skipped} reused, {len(result.failures)} failed, in neg/ and pos/ "
            f"({opts.resolution} px, {opts.sample_steps} steps, CFG 2). Different seeds give different noise "
            "patterns; none of them is anatomy (random-weight model). Command twin: meddiff generate.",
            [("generated images (top: neg, bottom: pos)", sheet)]))

    with _stage(opts, "evaluate"):
        sections += _evaluation_sections(opts, out)
    timing = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in opts.timings.items()]
    sections.append(Section("Timings", f"Model: {TINY_LABEL}.", table=timing))
    return render_report(out / "report.html", "Medical Diffusion workflow demo", DEMO_NOTE, sections)


def frame_change(first, last) -> float:
    """Mean absolute difference of two pictures in 8-bit grey levels."""
    import numpy as np

    a = np.asarray(first.convert("RGB"), np.float64)
    b = np.asarray(last.convert("RGB").resize(first.size), np.float64)
    return float(np.abs(a - b).mean())


def synthetic_sheet(folder: Path, cell: int = 96):
    """One row per class of the generated images, captioned with their file names."""
    from PIL import Image

    from medical_diffusion.image_grid import make_grid

    rows = [sorted((folder / cls).glob("*.png")) for cls in CLASSES]
    cols = max(len(r) for r in rows)
    images, labels = [], []
    for cls, files in zip(CLASSES, rows):
        for i in range(cols):
            if i < len(files):
                with Image.open(files[i]) as im:
                    images.append(im.convert("RGB"))
                labels.append(f"{cls}/{files[i].name}")
            else:
                images.append(Image.new("RGB", (cell, cell), "white"))
                labels.append("")
    return make_grid(images, labels, cols=cols, cell=cell)


def _evaluation_sections(opts: DemoOptions, out: Path) -> list[Section]:
    """FID with a bootstrap CI (when Inception weights are on this machine) and a classifier experiment."""
    import torch
    from torchvision.models import resnet18

    from medical_diffusion.evaluation.classifier import ClassifierConfig, parse_mix, run_experiments
    from medical_diffusion.evaluation.fid import compute_fid
    from medical_diffusion.evaluation.weights import MissingWeightsError, find_inception_weights

    sections = []
    try:
        find_inception_weights(None)
    except MissingWeightsError as exc:
        sections.append(Section("5. FID", f"Skipped: {exc.description} (install the 'fid' extra to get them)."))
    else:
        fid = compute_fid(out / "prepared" / "embedding" / "pos", out / "synthetic" / "pos", bootstrap_reps=200,
                          seed=opts.seed, cache_dir=out / "feature_cache")
        sections.append(Section("5. FID (Inception-v3, real weights), real vs synthetic positives",
                                fid.summary() + ". Command twin: meddiff fid."))

    # ResNet-18 with random initial weights stands in for the ImageNet file the paper uses
    weights = out / "weights" / "resnet18-random-init.pth"
    if not weights.is_file():
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(opts.seed)
        torch.save(resnet18(weights=None).state_dict(), weights)
    config = ClassifierConfig(steps=opts.classifier_steps, batch_size=opts.classifier_batch,
                              size=opts.classifier_size, runs=opts.classifier_runs, weights=str(weights),
                              seed=opts.seed)
    mixes = [parse_mix("real=all:0"), parse_mix(f"real_plus_synthetic=all:{2 * opts.images_per_class}",
                                                 str(out / "synthetic"))]
    report = run_experiments(out / "prepared" / "classifier", mixes, out / "classifier", config,
                             log=lambda msg: log.info("%s", msg))
    rows = [["mix", "real", "synthetic", "runs", "test AUC mean", "sd"]]
    rows += [[m["mix"], "all" if m["n_real"] is None else str(m["n_real"]), str(m["n_synthetic"]), str(m["runs"]),
              f"{m['mean_auc']:.3f}", f"{m['sd_auc']:.3f}"] for m in report["mixes"]]
    roc = out / "classifier" / "roc.png"
    sections.append(Section(
        "6. Classifier experiment (paper section 3.2 protocol, shortened)",
        f"ResNet-18 from random initial weights (the paper starts from ImageNet weights), {config.steps} steps "
        f"of {config.batch_size} at {config.size} px, {config.runs} runs per mix (paper: 6250 steps of 32 at "
        "196 px, 10 runs), kept short so the demo takes a few minutes on a CPU: AUCs from so short a run on "
        "so few images say little. Command twin: meddiff classify.",
        [("ROC", roc)] if roc.is_file() else [], rows))
    return sections
