"""Class-balanced sampling and patient-disjoint train/val/test splits (seeded, deterministic)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from medical_diffusion.errors import MedDiffError


@dataclass(frozen=True)
class Candidate:
    """An item that could be prepared: unique ``key``, its ``label`` and patient ``group``."""

    key: str
    label: str
    group: str


def balanced_sample(candidates: Sequence[Candidate], n_per_class: int | None, seed: int,
                    labels: Sequence[str] | None = None) -> list[Candidate]:
    """``n_per_class`` random candidates of each label (all when None or 0), in a stable order."""
    by_label: dict[str, list[Candidate]] = defaultdict(list)
    for c in sorted(candidates, key=lambda c: c.key):
        by_label[c.label].append(c)
    wanted = list(labels) if labels is not None else sorted(by_label)
    rng = random.Random(seed)
    out: list[Candidate] = []
    for label in wanted:
        pool = by_label.get(label, [])
        if not n_per_class:
            out.extend(pool)
            continue
        if len(pool) < n_per_class:
            raise MedDiffError(f"class {label!r}: only {len(pool)} eligible items, {n_per_class} requested "
                               f"(ask for {len(pool)} or fewer images per class, or 0 for all)")
        out.extend(rng.sample(pool, n_per_class))
    return out


def patient_disjoint_splits(candidates: Sequence[Candidate], n_per_class: int, labels: Sequence[str],
                            split_names: Sequence[str] = ("train", "val", "test"),
                            seed: int = 0) -> dict[str, list[Candidate]]:
    """Fill each split with ``n_per_class`` items of every label; no patient appears in two splits.

    Patients are visited in a seeded random order; all chosen items of a patient go to the first
    split that still has room for them (a patient's extra items beyond the room are left out).
    """
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in sorted(candidates, key=lambda c: c.key):
        if c.label in labels:
            groups[c.group].append(c)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    filled = {s: Counter() for s in split_names}
    result: dict[str, list[Candidate]] = {s: [] for s in split_names}
    for g in order:
        items = groups[g]
        for s in split_names:
            room = {lab: n_per_class - filled[s][lab] for lab in labels}
            take = []
            for c in items:
                if room[c.label] > 0:
                    room[c.label] -= 1
                    take.append(c)
            if take:
                for c in take:
                    filled[s][c.label] += 1
                result[s].extend(take)
                break
        if all(filled[s][lab] >= n_per_class for s in split_names for lab in labels):
            break
    short = [f"{s}/{lab}: {filled[s][lab]}/{n_per_class}" for s in split_names for lab in labels
             if filled[s][lab] < n_per_class]
    if short:
        raise MedDiffError("not enough eligible items for patient-disjoint splits (" + ", ".join(short) + "): "
                           "ask for fewer images per class, or prepare without splits")
    return result


def select_items(candidates: Sequence[Candidate], n_per_class: int | None, splits: Sequence[str], seed: int,
                 labels: Sequence[str]) -> dict[str, list[Candidate]] | list[Candidate]:
    """Class-balanced selection (a list), or patient-disjoint splits (``{split: items}``) when ``splits``."""
    if splits:
        if not n_per_class:
            raise MedDiffError("patient-disjoint splits need a number of images per class (N > 0; 0 = all "
                               "works only without splits)")
        return patient_disjoint_splits(candidates, n_per_class, labels, splits, seed)
    return balanced_sample(candidates, n_per_class, seed, labels if n_per_class else None)
