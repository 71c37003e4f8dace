"""How alike two embeddings are: cosine similarity and norm ratio, per vector and overall."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medical_diffusion.embeddings.model import Embedding
from medical_diffusion.errors import MedDiffError


def check_compatible(a: Embedding, b: Embedding) -> None:
    """Raise when ``a`` and ``b`` come from text encoders of different widths."""
    if set(a.parts()) != set(b.parts()) or any(a.parts()[k].shape[1] != b.parts()[k].shape[1] for k in a.parts()):
        raise MedDiffError(
            f"embeddings {a.name!r} ({a.width} wide, {a.family or 'unknown'}) and {b.name!r} "
            f"({b.width} wide, {b.family or 'unknown'}) belong to different models and cannot be compared"
        )


def compare_embeddings(a: Embedding, b: Embedding) -> dict[str, Any]:
    """Cosine similarity and norm ratio (``|b| / |a|``) of ``a`` and ``b``.

    Per-vector values pair vector ``i`` of ``a`` with vector ``i`` of ``b``. When the counts
    differ only the first ``min(n_a, n_b)`` pairs are compared (and a note says so); the
    similarity of the mean vectors is reported either way.
    """
    check_compatible(a, b)
    out: dict[str, Any] = {"a": a.name, "b": b.name, "vectors_a": a.n_vectors, "vectors_b": b.n_vectors, "parts": {}, "notes": []}
    n = min(a.n_vectors, b.n_vectors)
    if a.n_vectors != b.n_vectors:
        out["notes"].append(
            f"vector counts differ ({a.name}: {a.n_vectors}, {b.name}: {b.n_vectors}); per-vector values compare "
            f"the first {n} pairs, 'mean_vector_cosine' compares the mean vectors"
        )
    for part, va in a.parts().items():
        vb = b.parts()[part]
        cos = F.cosine_similarity(va[:n], vb[:n], dim=1)
        na, nb = va[:n].norm(dim=1), vb[:n].norm(dim=1)
        ratio = torch.where(na > 0, nb / na.clamp_min(1e-12), torch.full_like(na, float("nan")))
        out["parts"][part] = {
            "per_vector_cosine": [round(float(x), 6) for x in cos],
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "mean_vector_cosine": float(F.cosine_similarity(va.mean(0), vb.mean(0), dim=0)),
            "per_vector_norm_ratio": [round(float(x), 6) for x in ratio],
            "norm_ratio": float(vb.norm(dim=1).mean() / va.norm(dim=1).mean().clamp_min(1e-12)),
        }
    return out


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"A = {result['a']} ({result['vectors_a']} vectors), B = {result['b']} ({result['vectors_b']} vectors)"]
    for part, r in result["parts"].items():
        prefix = "" if part == "vectors" else f"[{part}] "
        lines.append(f"  {prefix}mean cosine {r['mean_cosine']:.4f} (min {r['min_cosine']:.4f}), "
                     f"mean-vector cosine {r['mean_vector_cosine']:.4f}, norm ratio |B|/|A| {r['norm_ratio']:.4f}")
        lines.append("  " + prefix + "per vector (cosine, norm ratio):")
        for i, (c, q) in enumerate(zip(r["per_vector_cosine"], r["per_vector_norm_ratio"])):
            lines.append(f"    #{i:<3} {c:+.4f}  {q:.4f}")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)
