"""Output folder layout and file names.

``OUT/embedding/<class>/`` holds the images for training embeddings (the train split when splits are
made); ``OUT/classifier/{train,val,test}/<class>/`` holds the classifier experiment sets; ``OUT`` also
holds ``manifest.csv`` (output, split, class, slice, sha256: no case IDs, no source paths) and the
contact sheet, so ``OUT`` can be shared. Provenance (the full manifest with case IDs and source paths,
``failures.csv`` and the resume journal) goes to a separate folder, by default the sibling
``OUT.provenance/``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from medical_diffusion.datasets.splits import Candidate
from medical_diffusion.errors import MedDiffError

EMBEDDING_DIR = "embedding"
CLASSIFIER_DIR = "classifier"
MANIFEST_NAME = "manifest.csv"
FAILURES_NAME = "failures.csv"
JOURNAL_NAME = ".prepare_journal.jsonl"
CONTACT_SHEET_NAME = "contact_sheet.png"
PROVENANCE_SUFFIX = ".provenance"


def provenance_folder(out: str | os.PathLike, provenance: str | os.PathLike | None = None) -> Path:
    """The provenance folder for ``out``: ``provenance``, or the sibling ``OUT.provenance``; never inside ``out``."""
    out_p = Path(out).expanduser().resolve()
    prov = Path(provenance).expanduser().resolve() if provenance else out_p.with_name(out_p.name + PROVENANCE_SUFFIX)
    if prov == out_p or out_p in prov.parents:
        raise MedDiffError(f"{prov}: the provenance folder must be outside the output folder {out_p} "
                           "(it holds case IDs and source paths)")
    return prov


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_plain_name(name: str, what: str) -> str:
    """``name`` if it is a plain folder name (letters, digits, ``_``, ``-``, ``.``; not ``.``/``..``), else raise."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise MedDiffError(f"bad {what} name {name!r}: use letters, digits, '_', '-' or '.' only "
                           "(no path separators, not '.' or '..')")
    return name


def slug(text: str) -> str:
    """Folder/file-safe lower-case name."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s or "item"


@dataclass
class PlannedItem:
    """One image to make: the candidate, its split ('' for none) and output paths (relative)."""

    candidate: Candidate
    split: str
    outputs: list[str] = field(default_factory=list)


def plan_outputs(selected: dict[str, list[Candidate]] | list[Candidate], neutral_names: bool = True,
                 embedding_split: str = "train") -> list[PlannedItem]:
    """Assign output paths. ``selected`` is a list (no splits) or ``{split: candidates}``."""
    planned: list[PlannedItem] = []
    groups = {"": list(selected)} if isinstance(selected, list) else dict(selected)
    for split, cands in groups.items():
        if split:
            check_plain_name(split, "split")
        for label in {c.label for c in cands}:
            check_plain_name(label, "class")
        counters: dict[str, int] = {}
        for c in sorted(cands, key=lambda c: (c.label, c.key)):
            counters[c.label] = counters.get(c.label, 0) + 1
            name = f"{c.label}_{counters[c.label]:04d}.png" if neutral_names else f"{slug(c.key)}.png"
            outs = []
            if split == "" or split == embedding_split:
                outs.append(f"{EMBEDDING_DIR}/{c.label}/{name}")
            if split:
                outs.append(f"{CLASSIFIER_DIR}/{split}/{c.label}/{name}")
            planned.append(PlannedItem(c, split, outs))
    return planned


def split_names_from(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"train,val,test"`` -> tuple; empty/None -> ()."""
    if not text:
        return ()
    if isinstance(text, str):
        text = text.split(",")
    return tuple(s.strip() for s in text if s.strip())


def embedding_class_folders(out: str | os.PathLike) -> dict[str, Path]:
    """``{class: OUT/embedding/<class>}`` for each class folder under ``OUT/embedding/``, sorted by class
    (absolute; empty when there is none)."""
    base = Path(out).expanduser().resolve() / EMBEDDING_DIR
    if not base.is_dir():
        return {}
    return {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")}
