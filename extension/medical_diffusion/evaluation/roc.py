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


#: every mix's mean curve gets its own colour, line style and marker, so equal curves stay told apart
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: mean curves are sampled on this grid; markers every ``_MARK_STEP`` points, offset per curve
_GRID_POINTS = 101
_MARK_STEP = 10


def curve_styles(n: int) -> List[dict]:
    """Matplotlib keywords for ``n`` mean curves drawn in this order, each visible when curves coincide.

    Colour, line style and marker differ; each curve's markers sit at other false-positive rates than
    the others'; and each curve is narrower than the ones drawn before it (under it), so a curve lying
    exactly under a later one still shows on both sides of it.
    """
    styles = []
    for k in range(n):
        styles.append(dict(color=f"C{k % 10}", linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                           marker=MARKERS[k % len(MARKERS)], markersize=max(4.0, 8.0 - 0.5 * k),
                           markevery=(1 + round(k * _MARK_STEP / max(n, 1)) % _MARK_STEP, _MARK_STEP),
                           linewidth=1.2 + 0.8 * (n - 1 - k), zorder=3 + k))
    return styles


def roc_figure(curves: Dict[str, List[tuple]], title: str = ""):
    """The matplotlib figure of ``{label: [(fpr, tpr, auc), ...]}``: runs faint, each mix's mean curve bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    grid = np.linspace(0, 1, _GRID_POINTS)
    for (label, runs), style in zip(curves.items(), curve_styles(len(curves))):
        tprs = []
        for fpr, tpr, _ in runs:
            fpr, tpr = np.asarray(fpr), np.asarray(tpr)
            ax.plot(fpr, tpr, color=style["color"], alpha=0.15, linewidth=0.8, zorder=2)
            tprs.append(np.interp(grid, fpr, tpr))
        if tprs:
            aucs = [a for _, _, a in runs]
            # from (0, 0): the interpolated mean alone would start at the top of a vertical first step
            ax.plot(np.r_[0.0, grid], np.r_[0.0, np.mean(tprs, axis=0)], **style,
                    label=f"{label}: AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0:.3f}")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, zorder=1)
    ax.set_xlim(-0.03, 1.03)  # curves along the border (a perfect classifier) stay clear of the frame
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title or "Test ROC (best-validation checkpoints)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_roc_png(curves: Dict[str, List[tuple]], path: str | os.PathLike, title: str = "") -> Path:
    """Plot ``{label: [(fpr, tpr, auc), ...]}`` (:func:`roc_figure`) to a PNG."""
    fig = roc_figure(curves, title)
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
