"""Between a backend's one trained tensor and an :class:`Embedding`'s per-text-encoder blocks.

A backend's token vector is ONE tensor ``(n, sum(widths))`` whose blocks follow its ``text_widths``
(SD1/SD2: ``{"vectors": W}``; SDXL: ``{"clip_l": 768, "clip_g": 1280}``, CLIP-L first, as A1111's
``encode_embedding_init_text`` concatenates them). An :class:`Embedding` keeps an SDXL pair as
``vectors`` = clip_l and ``extra["clip_g"]``, which the writers store as ``clip_l``/``clip_g``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from medical_diffusion.embeddings.model import Embedding
from medical_diffusion.errors import MedDiffError


def _check_widths(widths: Mapping[str, int]) -> list[tuple[str, int]]:
    items = [(str(k), int(v)) for k, v in widths.items()]
    names = [k for k, _ in items]
    if names not in (["vectors"], ["clip_l", "clip_g"]) or any(w < 1 for _, w in items):
        raise MedDiffError(f"text widths {dict(widths)} are neither {{'vectors': W}} nor {{'clip_l': W, 'clip_g': W}}")
    return items


def embedding_from_vectors(name: str, vectors: torch.Tensor, widths: Mapping[str, int], **meta) -> Embedding:
    """An :class:`Embedding` from a trained tensor ``(n, sum(widths))`` split into ``widths``' blocks.

    ``meta`` goes to :class:`Embedding` (``step``, ``sd_checkpoint``, ``sd_checkpoint_name``).
    """
    items = _check_widths(widths)
    vec = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    if vec.ndim == 1:
        vec = vec.unsqueeze(0)
    total = sum(w for _, w in items)
    if vec.ndim != 2 or vec.shape[1] != total:
        raise MedDiffError(f"embedding {name!r}: vectors of shape {tuple(vec.shape)} do not fit widths "
                           f"{dict(widths)} (need (n, {total}))")
    if len(items) == 1:
        return Embedding(name=name, vectors=vec.clone(), **meta)
    (_, width_l), _ = items
    return Embedding(name=name, vectors=vec[:, :width_l].clone(), extra={"clip_g": vec[:, width_l:].clone()}, **meta)


def embedding_widths(emb: Embedding) -> dict[str, int]:
    """The block widths of ``emb`` (``{"vectors": W}`` or ``{"clip_l": ..., "clip_g": ...}``)."""
    return {part: int(t.shape[1]) for part, t in emb.parts().items()}


def vectors_from_embedding(emb: Embedding, widths: Mapping[str, int] | None = None) -> torch.Tensor:
    """The one tensor a backend takes: ``emb``'s blocks concatenated (SDXL: clip_l then clip_g).

    With ``widths`` (a backend's ``text_widths``) the blocks must match them, else
    :class:`MedDiffError` names both families' layouts.
    """
    have = embedding_widths(emb)
    if widths is not None and have != {str(k): int(v) for k, v in dict(widths).items()}:
        raise MedDiffError(
            f"embedding {emb.name!r} has blocks {have} ({emb.family or 'unknown family'}); the model needs {dict(widths)}"
        )
    parts = list(emb.parts().values())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def is_pair_layout(widths: Mapping[str, int] | None) -> bool:
    """True for SDXL's two-block layout (``clip_l`` + ``clip_g``)."""
    return widths is not None and "clip_g" in widths


def embedding_suffix(widths: Mapping[str, int] | None) -> str:
    """The file suffix an embedding of this layout is saved with: ``.pt`` (A1111) for SD1/SD2,
    ``.safetensors`` with keys ``clip_l``/``clip_g`` for SDXL (what A1111, Forge and ComfyUI load)."""
    return ".safetensors" if is_pair_layout(widths) else ".pt"


def embedding_format(widths: Mapping[str, int] | None) -> str:
    """The :func:`~medical_diffusion.embeddings.writers.save_embedding` format for this layout."""
    return "safetensors" if is_pair_layout(widths) else "a1111"
