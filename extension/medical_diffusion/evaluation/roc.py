"""ROC curve and AUC in numpy (ties handled as in the Mann-Whitney statistic), and the ROC figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from medical_diffusion.atomic_io import atomic_path
from medical_diffusion.errors import MedDiffError


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve; needs both classes present."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise MedDiffError("AUC needs both negative and positive cases")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr


def save_roc_png(curves: Dict[str, List[tuple]], path: str | os.PathLike, title: str = "") -> Path:
    """Plot ``{label: [(fpr, tpr, auc), ...]}`` (runs faint, their mean curve bold) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    grid = np.linspace(0, 1, 101)
    for k, (label, runs) in enumerate(curves.items()):
        colour = f"C{k % 10}"
        tprs = []
        for fpr, tpr, _ in runs:
            fpr, tpr = np.asarray(fpr), np.asarray(tpr)
            ax.plot(fpr, tpr, color=colour, alpha=0.15, linewidth=0.8)
            tprs.append(np.interp(grid, fpr, tpr))
        if tprs:
            aucs = [a for _, _, a in runs]
            ax.plot(grid, np.mean(tprs, axis=0), color=colour, linewidth=2,
                    label=f"{label}: AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f}")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title or "Test ROC (best-validation checkpoints)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
