"""The in-memory embedding: named token vectors plus the metadata A1111 keeps with them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medical_diffusion.errors import InputFileError

#: text-encoder token width -> model family (SD1: CLIP ViT-L/14, SD2: OpenCLIP ViT-H/14)
FAMILY_BY_WIDTH = {768: "SD1", 1024: "SD2"}
#: SDXL embeddings hold one block per text encoder: CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280)
SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}

_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class Embedding:
    """A textual-inversion embedding: ``vectors`` ``(n_vectors, width)`` float32, detached, on CPU.

    SDXL pair embeddings keep their CLIP-L block in ``vectors`` and the CLIP-G block in
    ``extra["clip_g"]``; ``extra`` is empty for SD1/SD2 embeddings.
    """

    name: str
    vectors: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vec = torch.as_tensor(self.vectors).detach().to("cpu", torch.float32)
        if vec.ndim == 1:
            vec = vec.unsqueeze(0)
        self.vectors = vec.contiguous()
        self.extra = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous() for k, v in self.extra.items()}

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        """Token width; for SDXL the sum of both encoders' widths (as A1111 reports it)."""
        return int(self.vectors.shape[1]) + sum(int(t.shape[1]) for t in self.extra.values())

    @property
    def is_sdxl(self) -> bool:
        return "clip_g" in self.extra

    @property
    def family(self) -> str | None:
        """``"SD1"``, ``"SD2"``, ``"SDXL"``, or None when the width matches no known model."""
        if self.is_sdxl:
            return "SDXL"
        return FAMILY_BY_WIDTH.get(int(self.vectors.shape[1]))

    def parts(self) -> dict[str, torch.Tensor]:
        """The vector blocks by name: ``{"vectors": ...}`` or ``{"clip_l": ..., "clip_g": ...}``."""
        if self.is_sdxl:
            return {"clip_l": self.vectors, "clip_g": self.extra["clip_g"]}
        return {"vectors": self.vectors}


def check_name(name: str) -> str:
    """Return ``name`` if usable as an embedding name (lowercase, no spaces), else raise ValueError."""
    if not _NAME_OK.match(name):
        raise ValueError(
            f"embedding name {name!r} must be lowercase letters, digits, '.', '_' or '-' "
            "(a mixed-case token breaks diffusers' multi-vector expansion)"
        )
    return name


def name_from_token(token: str) -> str:
    """A usable name from a diffusers token such as ``<Cat-Toy>`` -> ``cat-toy``."""
    name = token.strip().strip("<>").lower()
    return re.sub(r"[^a-z0-9._-]+", "_", name).strip("_") or "embedding"


def _model_label(widths: dict[str, int]) -> str:
    """``"SDXL (clip_l 768 + clip_g 1280)"``, ``"SD2 (1024 wide)"``, ``"a 32-wide model"``."""
    if "clip_g" in widths:
        return f"SDXL (clip_l {widths['clip_l']} + clip_g {widths['clip_g']})"
    width = int(next(iter(widths.values())))
    family = FAMILY_BY_WIDTH.get(width)
    return f"{family} ({width} wide)" if family else f"{width} wide (no SD family)"


def _embedding_label(emb: Embedding) -> str:
    return _model_label({part: int(t.shape[1]) for part, t in emb.parts().items()})


def validate(
    emb: Embedding,
    path: str | os.PathLike,
    expected_width: int | None = None,
    expected_widths: dict[str, int] | None = None,
    check_width: bool = True,
) -> Embedding:
    """Raise :class:`InputFileError` naming ``path`` when ``emb`` is unusable.

    Checks: at least one vector, finite values, and a width that matches a known model
    (768 SD1, 1024 SD2, 768+1280 SDXL), or the model's: ``expected_widths`` (a backend's
    ``text_widths``, e.g. a tiny SDXL model's ``{"clip_l": 32, "clip_g": 48}``: then the blocks must
    be exactly those, and a message names both families on a mismatch) or ``expected_width`` (one
    total width: an SD1/SD2-style width, or an SDXL pair's sum; 2048 keeps the strict 768/1280 check).
    ``check_width=False`` skips the width checks (for inspecting or converting a file of any model).
    """
    path = Path(path)
    for part, tensor in emb.parts().items():
        label = "" if part == "vectors" else f" ({part})"
        if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
            raise InputFileError(path, f"embedding tensor{label} has shape {tuple(tensor.shape)}, expected (n_vectors, width)")
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise InputFileError(path, f"embedding{label} contains {bad} NaN/inf value(s) in {tensor.numel()}")
    if emb.is_sdxl and emb.extra["clip_g"].shape[0] != emb.vectors.shape[0]:
        raise InputFileError(
            path,
            f"SDXL embedding blocks disagree on vector count: clip_l {emb.vectors.shape[0]}, clip_g {emb.extra['clip_g'].shape[0]}",
        )
    if not check_width:
        return emb
    if expected_widths is not None:
        want = {str(k): int(v) for k, v in dict(expected_widths).items()}
        have = {part: int(t.shape[1]) for part, t in emb.parts().items()}
        if have != want:
            raise InputFileError(
                path,
                f"the embedding is for {_embedding_label(emb)} but the model is {_model_label(want)}"
                + ("; an SDXL embedding is a .safetensors with clip_l and clip_g" if "clip_g" in want else ""),
            )
        return emb
    if emb.is_sdxl:
        total = emb.width
        custom = expected_width is not None and expected_width != sum(SDXL_WIDTHS.values())
        if custom and expected_width != total:
            raise InputFileError(path, f"SDXL embedding ({_embedding_label(emb)}) does not fit a model of width {expected_width}")
        if not custom:
            for part, want_width in SDXL_WIDTHS.items():
                got = emb.parts()[part].shape[1]
                if got != want_width:
                    hint = "" if expected_width is not None else (
                        f" (for a custom or tiny SDXL-shaped model give its width, e.g. --expected-width {total})")
                    raise InputFileError(path, f"SDXL embedding block {part} has width {got}, expected {want_width}{hint}")
        return emb
    width = emb.vectors.shape[1]
    if expected_width is not None:
        if width != expected_width:
            raise InputFileError(path, f"embedding width {width} does not match the model's token width {expected_width}")
    elif width not in FAMILY_BY_WIDTH:
        raise InputFileError(
            path,
            f"embedding width {width} matches no Stable Diffusion text encoder "
            "(768 SD1, 1024 SD2, 768+1280 SDXL); for a custom or tiny model give its width (--expected-width N) "
            "or the model (--model)",
        )
    return emb
