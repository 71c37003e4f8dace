"""CheXpert chest X-rays -> frontal AP images with exactly one positive among chosen observations.

Per image (the paper): crop to the non-zero bounding box, resize the longest edge to 512 keeping the
aspect ratio, zero-pad (centred) to 512x512.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medical_diffusion.datasets.batch import (BatchOptions, BatchResult, ItemFailure, ProgressCallback,
                                            options_to_json, run_batch)
from medical_diffusion.datasets.image_fit import crop_to_nonzero, fit_longest_edge_and_pad
from medical_diffusion.datasets.layout import plan_outputs, slug
from medical_diffusion.datasets.splits import Candidate, select_items
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.png_io import load_image

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS
PAPER_CLASSES = ("No Finding", "Cardiomegaly", "Pleural Effusion", "Pneumonia")
UNCERTAIN_POLICIES = ("zeros", "ones", "exclude")  # -1.0 counts as negative / as positive / drops the row
PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")


#: options that change the pixels of an item (a change redoes finished items on a re-run)
PIXEL_OPTIONS = ("size",)

@dataclass
class ChexpertOptions(BatchOptions):
    """Options for :func:`prepare_chexpert` (defaults = the paper)."""

    csv: str
    root: str
    classes: tuple[str, ...] = PAPER_CLASSES
    view: str = "AP"  # AP/PA value to keep (frontal images only); "" keeps every frontal image
    uncertain: str = "zeros"

    def validate(self) -> None:
        self.check_common()
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise MedDiffError(f"unknown uncertain-label policy {self.uncertain!r} "
                               f"(choose from {', '.join(UNCERTAIN_POLICIES)})")
        bad = [c for c in self.classes if c not in OBSERVATIONS]
        if bad or not self.classes:
            raise MedDiffError(f"unknown CheXpert classes {bad} (choose from {', '.join(OBSERVATIONS)})")
        if not Path(self.root).is_dir():
            raise InputFileError(self.root, "CheXpert image root folder not found")
        if self.splits and len(self.classes) != 2:
            raise MedDiffError("classifier splits need exactly two classes (e.g. No Finding, Cardiomegaly)")


def strip_prefix(path: str) -> str:
    """``CheXpert-v1.0-small/train/...`` -> ``train/...``."""
    p = path.replace("\\", "/")
    for prefix in PREFIXES:
        if p.startswith(prefix):
            return p[len(prefix):]
    return p


def class_folders(classes: tuple[str, ...], splits: tuple[str, ...]) -> dict[str, str]:
    """Folder name per class: neg/pos for a two-class split with No Finding, otherwise a slug."""
    if splits and len(classes) == 2 and "No Finding" in classes:
        return {c: ("neg" if c == "No Finding" else "pos") for c in classes}
    return {c: slug(c) for c in classes}


def _value(text: str, policy: str) -> float | None:
    """1.0/0.0 for a label cell under ``policy``; None means "drop this row"."""
    t = text.strip()
    if not t:
        return 0.0
    v = float(t)
    if v == -1.0:
        return {"zeros": 0.0, "ones": 1.0, "exclude": None}[policy]
    return v


def select_rows(csv_path: str | os.PathLike, classes: tuple[str, ...], uncertain: str = "zeros",
                view: str = "AP", root: str | os.PathLike | None = None
                ) -> tuple[list[tuple[str, str, str]], list[ItemFailure]]:
    """Rows (csv path, class, patient) of frontal ``view`` images with exactly one positive class.

    With ``root``, a row whose image path does not resolve inside ``root`` (absolute, ``..``, a symlink
    pointing out) is a failure naming the CSV line instead."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputFileError(csv_path, "CheXpert CSV not found")
    if csv_path.suffix == ".gz":
        raise InputFileError(csv_path, "compressed CSV: gunzip it first")
    out, bad = [], []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("Path", "Frontal/Lateral", "AP/PA") + tuple(classes) if c not in (reader.fieldnames or [])]
        if missing:
            raise InputFileError(csv_path, f"not a CheXpert CSV (missing columns {missing})")
        for line, row in enumerate(reader, start=2):
            if row["Frontal/Lateral"].strip() != "Frontal" or (view and row["AP/PA"].strip() != view):
                continue
            try:
                values = [_value(row[c] or "", uncertain) for c in classes]
            except ValueError as exc:
                bad.append(ItemFailure(row["Path"], f"{csv_path}:{line}", f"bad label value ({exc})"))
                continue
            if any(v is None for v in values):
                continue
            positives = [c for c, v in zip(classes, values) if v == 1.0]
            if len(positives) != 1:
                continue
            if root is not None:
                try:
                    resolve_image(root, row["Path"])
                except MedDiffError as exc:
                    bad.append(ItemFailure(row["Path"], f"{csv_path}:{line}", str(exc)))
                    continue
            m = re.search(r"(patient\d+)", row["Path"])
            out.append((row["Path"], positives[0], m.group(1) if m else row["Path"]))
    return out, bad


def resolve_image(root: str | os.PathLike, csv_path: str) -> Path:
    """The image file for a CSV path: ``root/<path without prefix>``, else ``root/<path>``; it must
    resolve (symlinks followed) inside ``root``, else MedDiffError."""
    root = Path(root)
    p = root / strip_prefix(csv_path)
    q = root / csv_path
    chosen = p if p.is_file() or not q.is_file() else q
    real_root = root.resolve()
    real = chosen.resolve()
    if real != real_root and real_root not in real.parents:
        raise MedDiffError(f"image path {csv_path!r} leads outside the image root {root} (to {real})")
    return chosen


def process_image(path: str, size: int = 512) -> tuple[np.ndarray, dict]:
    """Grey uint8 radiograph -> crop to non-zero, longest edge ``size``, centred zero-pad."""
    arr = np.asarray(load_image(path, "L"))
    return fit_longest_edge_and_pad(crop_to_nonzero(arr), size), {}


def _process(payload: tuple[str, int]) -> tuple[np.ndarray, dict]:
    return process_image(*payload)


def prepare_chexpert(options: ChexpertOptions, progress: ProgressCallback | None = None) -> BatchResult:
    """Select and prepare CheXpert images into ``options.out`` (resumable)."""
    options.validate()
    rows, rejected = select_rows(options.csv, tuple(options.classes), options.uncertain, options.view,
                                 root=options.root)
    folders = class_folders(tuple(options.classes), tuple(options.splits))
    original = {strip_prefix(path): path for path, _, _ in rows}
    candidates = [Candidate(strip_prefix(path), folders[cls], patient) for path, cls, patient in rows]
    labels = tuple(folders[c] for c in options.classes)
    selected = select_items(candidates, options.n_per_class, tuple(options.splits), options.seed, labels)
    planned = plan_outputs(selected, options.neutral_names)
    payloads = {}
    for item in planned:
        img = resolve_image(options.root, original[item.candidate.key])
        payloads[item.candidate.key] = (str(img), (str(img), options.size))
    return run_batch(planned, payloads, _process, options.out, options_to_json(options), workers=options.workers,
                     progress=progress, rejected=rejected,
                     contact_sheet_title="CheXpert" if options.contact_sheet else None,
                     pixel_options_json=options_to_json(options, only=PIXEL_OPTIONS),
                     provenance=options.provenance)
