"""QUICK ESTIMATE, NOT THE PAPER'S PROTOCOL: frozen ResNet-18 features + logistic regression.

Gives a rough, minutes-not-hours signal of whether synthetic images help, by fitting an
L2-regularised logistic regression on frozen ImageNet ResNet-18 pooled features of each mix's
training images and reporting test AUC. It does not fine-tune, augment or select checkpoints, so
its numbers are not comparable to Table 2.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation.classifier import MixSpec, mix_seed, build_resnet18, to_unit_float
from medical_diffusion.evaluation.classifier_data import ImageSet, balanced_subset, labelled_files, load_image_set
from medical_diffusion.evaluation.limits import check_limit
from medical_diffusion.evaluation.roc import roc_auc

LABEL = "quick estimate (frozen ResNet-18 features + logistic regression; NOT the paper's protocol)"


def frozen_features(model: torch.nn.Module, images: ImageSet, batch_size: int = 64) -> np.ndarray:
    """512-d pooled ResNet-18 features (the head removed)."""
    body = torch.nn.Sequential(*list(model.children())[:-1]).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(torch.flatten(body(to_unit_float(images.images[start:start + batch_size])), 1))
    return torch.cat(out).numpy().astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 200):
    """Standardise, then fit weights/bias by L-BFGS; returns a scoring function."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    w_np, b_np = w.detach().numpy(), float(b.detach())
    return lambda z: ((z - mu) / sd) @ w_np + b_np


def quick_probe(real_root: str | os.PathLike, mixes: Sequence[MixSpec], out_dir: str | os.PathLike | None = None,
                weights: str | os.PathLike | None = None, size: int = 196, seed: int = 0, l2: float = 1e-2,
                log: Callable[[str], None] = print) -> dict:
    """Test AUC of a logistic regression on frozen features per mix; writes ``quick_probe.json`` if ``out_dir``."""
    if not mixes:
        raise MedDiffError("no mixes given")
    size, seed = check_limit("size", size), check_limit("seed", seed)
    real_root = Path(real_root)
    torch.manual_seed(seed)
    model = build_resnet18(weights)
    test = load_image_set(labelled_files(real_root / "test"), size)
    test.check_both_classes(str(real_root / "test"))
    f_test = frozen_features(model, test)
    real_items = labelled_files(real_root / "train")
    rows = []
    for mix in mixes:
        s = mix_seed(seed, mix.name)
        items = balanced_subset(real_items, mix.n_real, s, str(real_root / "train"))
        if mix.n_synthetic:
            items += balanced_subset(labelled_files(mix.synthetic_dir), mix.n_synthetic, s + 1, str(mix.synthetic_dir))
        train = load_image_set(items, size)
        train.check_both_classes(f"training set of mix {mix.name}")
        score = fit_logistic(frozen_features(model, train), train.labels.numpy(), l2)
        auc = roc_auc(test.labels.numpy(), score(f_test))
        rows.append({**asdict(mix), "n_train": len(train), "test_auc": auc})
        log(f"[{mix.name}] {LABEL}: test AUC {auc:.4f} ({len(train)} training images)")
    report = {"label": LABEL, "size": size, "seed": seed, "l2": l2, "mixes": rows}
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "quick_probe.json", json.dumps(report, indent=2))
    return report
