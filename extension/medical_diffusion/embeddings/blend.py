"""Interpolate between two embeddings in embedding space (linear or spherical) into a new one.

An alternative to A1111's composable prompts (``0.25*<a> AND 0.75*<b>``): one embedding, one
token, one denoiser pass per step.
"""

from __future__ import annotations

import torch

from medical_diffusion.embeddings.model import Embedding, check_name
from medical_diffusion.embeddings.similarity import check_compatible
from medical_diffusion.errors import MedDiffError

MODES = ("linear", "slerp")


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise spherical interpolation from ``a`` (weight 0) to ``b`` (weight 1).

    Directions move along the great circle between the two rows; lengths are interpolated
    linearly, so the result keeps the scale of its inputs. Rows that are (anti)parallel or zero,
    where the great circle is undefined, fall back to linear interpolation.
    """
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    dot = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - weight) * omega) * ua + torch.sin(weight * omega) * ub) / sin.clamp_min(eps)
    spherical = direction * ((1 - weight) * na + weight * nb)
    linear = (1 - weight) * a + weight * b
    degenerate = (sin.abs() < 1e-4) | (na < eps) | (nb < eps)
    return torch.where(degenerate, linear, spherical)


def blend_embeddings(a: Embedding, b: Embedding, weight: float, mode: str = "linear", name: str = "blend") -> Embedding:
    """``(1 - weight) * a + weight * b`` per vector (``mode="linear"``) or its spherical version."""
    if mode not in MODES:
        raise MedDiffError(f"unknown blend mode {mode!r}; choose {' or '.join(MODES)}")
    if not 0.0 <= weight <= 1.0:
        raise MedDiffError(f"blend weight {weight} must lie in [0, 1] (0 gives {a.name!r}, 1 gives {b.name!r})")
    try:
        check_name(name)
    except ValueError as exc:
        raise MedDiffError(str(exc)) from None
    check_compatible(a, b)
    if a.n_vectors != b.n_vectors:
        raise MedDiffError(
            f"cannot blend {a.name!r} ({a.n_vectors} vectors) with {b.name!r} ({b.n_vectors} vectors): "
            "vector counts must match (blending pairs vector i with vector i)"
        )
    mix = {
        part: (slerp(va, b.parts()[part], weight) if mode == "slerp" else (1 - weight) * va + weight * b.parts()[part])
        for part, va in a.parts().items()
    }
    same_ckpt = a.sd_checkpoint == b.sd_checkpoint
    vectors = mix.pop("clip_l") if "clip_l" in mix else mix.pop("vectors")
    return Embedding(
        name=name,
        vectors=vectors,
        step=None,
        sd_checkpoint=a.sd_checkpoint if same_ckpt else None,
        sd_checkpoint_name=a.sd_checkpoint_name if same_ckpt else None,
        extra=mix,
    )
