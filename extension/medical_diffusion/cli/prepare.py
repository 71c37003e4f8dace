"""``meddiff prepare picai|chexpert|pcam|images``: dataset preparation into PNG training folders."""

from __future__ import annotations

import argparse

from medical_diffusion.datasets.volume_limits import DEFAULT_MAX_VOXELS


def _common(p: argparse.ArgumentParser, default_n: int | None = None) -> None:
    p.add_argument("--out", required=True, help="output folder to share: embedding/<class>/, "
                                                "classifier/<split>/<class>/, manifest.csv (no case IDs or source "
                                                "paths), contact_sheet.png")
    p.add_argument("--provenance", default=None, metavar="DIR",
                   help="folder for what names cases and sources: the full manifest, failures.csv and the resume "
                        "journal (default: OUT.provenance beside OUT; must be outside OUT); keep it private")
    p.add_argument("--per-class", type=int, default=default_n, metavar="N",
                   help="exactly N images per class, sampled at random (per split with --splits); 0 = every "
                        "eligible image (not with --splits); a class with fewer than N is an error that says how "
                        "many it has; default: " + ("0 (all)" if default_n is None else str(default_n)))
    p.add_argument("--splits", default="", metavar="LIST",
                   help="patient-disjoint classifier splits, e.g. train,val,test (paper: 100 neg + 100 pos each; "
                        "needs --per-class N > 0); names: letters, digits, _ - .")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and splits (default 0)")
    p.add_argument("--source-names", action="store_true",
                   help="name outputs after the source case instead of neutral neg_0001.png names")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS, metavar="N",
                   help="refuse volumes/DICOM items whose header claims more than N voxels, before reading "
                        f"their pixels (default {DEFAULT_MAX_VOXELS:,} = 512 x 512 x 1024)")
    p.add_argument("--no-contact-sheet", action="store_true", help="do not write contact_sheet.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    prep = subparsers.add_parser("prepare", help="prepare a dataset as 512x512 PNG training folders",
                                 description="Prepare PI-CAI, CheXpert, PatchCamelyon or generic medical images. "
                                             "Re-running with the same options skips finished items. Items that "
                                             "fail are listed in OUT.provenance/failures.csv and the others are still made "
                                             "(exit code 3 when any failed).")
    sub = prep.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    p = sub.add_parser("picai", help="PI-CAI prostate MRI (paper mode or aligned mode)")
    p.add_argument("--images", required=True, help="PI-CAI images folder (<pid>/<pid>_<sid>_t2w.mha ...)")
    p.add_argument("--labels", required=True, help="picai_labels folder")
    p.add_argument("--mode", choices=("paper", "aligned"), default="paper",
                   help="paper: each modality resampled on its own grid (the authors' method); "
                        "aligned: ADC/HBV resampled onto the cropped T2W grid")
    p.add_argument("--channels", choices=("rgb", "t2w", "adc", "hbv"), default="rgb",
                   help="rgb = T2W/ADC/HBV as R/G/B (default), or one modality as grey")
    p.add_argument("--label-source", choices=("combined", "human", "marksheet"), default="combined",
                   help="combined: human delineation, AI (Bosma22a) when missing (default); human only; "
                        "marksheet case_csPCa")
    p.add_argument("--resampler", choices=("fast", "sitk"), default="fast",
                   help="fast: separable B-spline, same maths as SimpleITK (default); sitk: SimpleITK itself")
    p.add_argument("--negative-slice", choices=("slices", "voxels"), default="slices",
                   help="slice of a negative case: slices = median of the distinct slices holding gland voxels "
                        "(the authors, default); voxels = median z of all gland voxels (area-weighted)")
    p.add_argument("--cases", default="", help="comma-separated <pid>_<sid> ids to restrict to")
    _common(p)
    p.set_defaults(func=run_picai)

    p = sub.add_parser("chexpert", help="CheXpert chest X-rays (frontal AP, exactly one positive class)")
    p.add_argument("--csv", required=True, help="CheXpert train.csv / valid.csv")
    p.add_argument("--root", required=True, help="folder holding train/ and valid/ (CSV prefix is stripped)")
    p.add_argument("--classes", default="No Finding,Cardiomegaly,Pleural Effusion,Pneumonia",
                   help="comma-separated observations (default: the paper's four)")
    p.add_argument("--uncertain", choices=("zeros", "ones", "exclude"), default="zeros",
                   help="uncertain (-1) labels count as negative (default), as positive, or drop the image")
    p.add_argument("--view", default="AP", help="AP/PA value to keep among frontal images ('' = all)")
    _common(p)
    p.set_defaults(func=run_chexpert)

    p = sub.add_parser("pcam", help="PatchCamelyon HDF5 patches")
    p.add_argument("--x", required=True, help="camelyonpatch_level_2_split_*_x.h5 (gunzipped)")
    p.add_argument("--y", required=True, help="camelyonpatch_level_2_split_*_y.h5 (gunzipped)")
    _common(p, default_n=100)
    p.set_defaults(func=run_pcam)

    p = sub.add_parser("images", help="generic import: DICOM files/series, NIfTI/MHA/NRRD, PNG/JPEG")
    p.add_argument("inputs", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--label", default="images", help="class folder name (default: images)")
    p.add_argument("--class-from-folder", action="store_true", help="class = each item's parent folder name")
    p.add_argument("--window", default="auto",
                   help="auto (DICOM window tags, else min-max), minmax, percentile, or CENTER,WIDTH")
    p.add_argument("--slice", default=None, metavar="CHOICE",
                   help="axial slice(s) of volumes and DICOM series: middle (default), an index (9), all, a range "
                        "(5-12) or a list (3,5,9-11); chosen slices are written as NAME_s009.png, one per slice")
    p.add_argument("--mask", default=None, help="mask file (or folder of same-named masks) choosing the slice")
    p.add_argument("--mask-rule", choices=("max", "median"), default="max",
                   help="max: slice with the largest mask sum; median: median slice of the mask")
    p.add_argument("--color", choices=("auto", "grey", "rgb"), default="auto")
    p.add_argument("--fit", choices=("pad", "stretch"), default="pad",
                   help="pad: keep aspect ratio with zero borders (default); stretch")
    p.add_argument("--crop-nonzero", action="store_true", help="crop to the non-zero bounding box first")
    p.add_argument("--replace-nonfinite", type=float, default=None, metavar="VALUE",
                   help="replace NaN/inf pixels by VALUE (default: an item holding any fails)")
    _common(p)
    p.set_defaults(func=run_images)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _progress(args):
    if args.quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="item")

    def update(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message[-40:], refresh=False)
        bar.refresh()

    return update, bar


def _common_kwargs(args) -> dict:
    return dict(out=args.out, n_per_class=args.per_class, splits=_split_list(args.splits), seed=args.seed,
                neutral_names=not args.source_names, workers=max(1, args.workers), max_voxels=args.max_voxels,
                provenance=args.provenance,
                contact_sheet=not args.no_contact_sheet)


def _report(result, source_names: bool = False) -> int:
    print(f"{result.processed} made, {result.skipped} already done, {len(result.failures)} failed")
    print(f"output: {result.out_dir.resolve()} (shareable: its manifest.csv holds no case IDs or source paths"
          + ("; but --source-names put case IDs into the file names" if source_names else "") + ")")
    _print_training_folders(result)
    print(f"provenance: {result.provenance_dir} (case IDs, source paths, failures, resume journal: keep it private)")
    if result.failures:
        for f in result.failures[:10]:
            print(f"  failed {f.key}: {f.error}")
        if len(result.failures) > 10:
            print(f"  ... {len(result.failures) - 10} more in {result.failures_path}")
    for w in result.warnings[:10]:
        print(f"  warning {w.key}: {w.error}")
    if len(result.warnings) > 10:
        print(f"  ... {len(result.warnings) - 10} more warnings")
    return 0 if not result.failures else 3


def _print_training_folders(result) -> None:
    """Each class's exact ``--data`` folder and a ready ``meddiff train`` line (never OUT itself: it also
    holds the contact sheet and the classifier sets)."""
    import shlex

    from medical_diffusion.datasets.layout import embedding_class_folders
    from medical_diffusion.embeddings.model import name_from_token
    from medical_diffusion.training.data_folder import image_files

    folders = embedding_class_folders(result.out_dir)
    if not folders:
        print("no training folders were made")
        return
    print("train an embedding per class (--data is the class folder, not the output folder):")
    for label, folder in folders.items():
        count = len(image_files(folder))  # what training on it uses: this run's images and earlier runs'
        print(f"  {label}: --data {shlex.quote(str(folder))}  ({count} images)")
        print(f"    meddiff train --model MODEL --data {shlex.quote(str(folder))} --name {name_from_token(label)}")


def _run(fn, options, args) -> int:
    update, bar = _progress(args)
    try:
        result = fn(options, progress=update)
    finally:
        if bar is not None:
            bar.close()
    return _report(result, args.source_names)


def run_picai(args) -> int:
    from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai

    options = PicaiOptions(images=args.images, labels=args.labels, mode=args.mode, channels=args.channels,
                           label_source=args.label_source, resampler=args.resampler,
                           negative_slice=args.negative_slice,
                           cases=_split_list(args.cases), **_common_kwargs(args))
    return _run(prepare_picai, options, args)


def run_chexpert(args) -> int:
    from medical_diffusion.datasets.chexpert import ChexpertOptions, prepare_chexpert

    options = ChexpertOptions(csv=args.csv, root=args.root, classes=_split_list(args.classes),
                              uncertain=args.uncertain, view=args.view, **_common_kwargs(args))
    return _run(prepare_chexpert, options, args)


def run_pcam(args) -> int:
    from medical_diffusion.datasets.pcam import PcamOptions, prepare_pcam

    options = PcamOptions(x=args.x, y=args.y, **_common_kwargs(args))
    return _run(prepare_pcam, options, args)


def run_images(args) -> int:
    from medical_diffusion.datasets.generic_import import ImportOptions, prepare_images

    options = ImportOptions(inputs=tuple(args.inputs), label=args.label,
                            class_from="folder" if args.class_from_folder else "label", window=args.window,
                            slice_index=args.slice, mask=args.mask, mask_rule=args.mask_rule, color=args.color,
                            fit=args.fit, crop_nonzero=args.crop_nonzero, nonfinite=args.replace_nonfinite,
                            **_common_kwargs(args))
    return _run(prepare_images, options, args)
