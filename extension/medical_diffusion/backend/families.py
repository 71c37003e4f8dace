"""Which Stable Diffusion family a model is (SD1, SD2, SDXL), told from names, configs or key names.

Light on purpose (no torch/diffusers at import): the CLI and UI use :func:`is_tiny_model` to check a
``--model`` value before loading anything.

- SD1: CLIP ViT-L/14 (768 wide), epsilon, VAE scaling 0.18215;
- SD2: OpenCLIP ViT-H/14 (1024 wide), epsilon or v-prediction, VAE scaling 0.18215;
- SDXL: CLIP ViT-L/14 (768) + OpenCLIP ViT-bigG/14 (1280), epsilon, VAE scaling 0.13025.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from medical_diffusion.errors import InputFileError

FAMILIES = ("SD1", "SD2", "SDXL")
#: random-weight demo models by name (``load_backend("tiny-sdxl")``)
TINY_MODELS = {"tiny": "SD2", "tiny-sd1": "SD1", "tiny-sdxl": "SDXL"}
#: key of the family marker this package writes into a saved folder's ``model_index.json``
#: (a leading underscore: diffusers ignores such keys when it loads the pipeline)
FAMILY_MARKER = "_medical_diffusion_family"
#: how a family's token vector is split into per-text-encoder blocks (real models)
TEXT_WIDTHS = {"SD1": {"vectors": 768}, "SD2": {"vectors": 1024}, "SDXL": {"clip_l": 768, "clip_g": 1280}}

#: key prefixes of the original (LDM/sgm) checkpoint layout, checked in this order
_KEY_PREFIXES = (
    ("conditioner.embedders.1.", "SDXL"),  # sgm: CLIP-L (embedders.0) + OpenCLIP bigG (embedders.1)
    ("cond_stage_model.model.", "SD2"),  # ldm FrozenOpenCLIPEmbedder
    ("cond_stage_model.transformer.", "SD1"),  # ldm FrozenCLIPEmbedder (HF CLIPTextModel inside)
)


def tiny_family(model: object) -> str | None:
    """The family of a tiny demo model name (``"tiny"``, ``"tiny-sd1"``, ``"tiny-sdxl"``), else None."""
    return TINY_MODELS.get(str(model).strip().lower())


def is_tiny_model(model: object) -> bool:
    """True for the names of the random-weight demo models."""
    return tiny_family(model) is not None


def family_from_keys(keys: Iterable[str]) -> str | None:
    """The family of an original-layout checkpoint from its tensor names, or None when unknown.

    SDXL has ``conditioner.embedders.1.model...`` (its refiner only ``embedders.0``: not supported),
    SD2 ``cond_stage_model.model...``, SD1 ``cond_stage_model.transformer.text_model...``.
    """
    found = set()
    for key in keys:
        for prefix, family in _KEY_PREFIXES:
            if key.startswith(prefix):
                found.add(family)
    for _, family in _KEY_PREFIXES:
        if family in found:
            return family
    return None


def checkpoint_keys(path: str | Path) -> list[str]:
    """Tensor names of a ``.safetensors`` (header only) or ``.ckpt`` (memory-mapped, weights only)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                return list(fh.keys())
        except Exception as exc:  # safetensors' error type moved between releases
            raise InputFileError(path, f"not a readable safetensors file: {exc}") from None
    import torch

    from medical_diffusion.embeddings.safe_pickle import TORCHSCRIPT_RECIPE, UnsafePickleError, is_torchscript_archive

    if is_torchscript_archive(path):  # holds code: never loaded (torch.load would hand it to torch.jit)
        raise UnsafePickleError(path, f"refused to load: a TorchScript archive, not a checkpoint; {TORCHSCRIPT_RECIPE}")
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputFileError(path, f"cannot read the checkpoint's tensors (weights only): {first}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise InputFileError(path, f"holds a {type(data).__name__}, not a state dict")
    return [str(k) for k in data]


def family_of_checkpoint(path: str | Path) -> str:
    """The family of a single-file checkpoint; :class:`InputFileError` when no text encoder is recognised."""
    family = family_from_keys(checkpoint_keys(path))
    if family is None:
        raise InputFileError(
            path,
            "no SD1/SD2/SDXL text encoder found (expected keys cond_stage_model.transformer... for SD1, "
            "cond_stage_model.model... for SD2, conditioner.embedders.0/1... for SDXL)",
        )
    return family


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def family_of_folder(folder: str | Path) -> str:
    """The family of a diffusers folder.

    The marker this package writes (:data:`FAMILY_MARKER`) wins; then SDXL is told by
    ``text_encoder_2/`` (or an XL pipeline class), SD1 by a 768-wide or ``quick_gelu`` CLIP text
    encoder, SD2 by a 1024-wide one. An unmarked folder of another width (an old tiny model) is SD2.
    """
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    marked = index.get(FAMILY_MARKER)
    if marked in FAMILIES:
        return str(marked)
    if (folder / "text_encoder_2" / "config.json").is_file() or "XL" in str(index.get("_class_name", "")):
        return "SDXL"
    text = _json(folder / "text_encoder" / "config.json")
    width = text.get("hidden_size")
    if width == 768 or text.get("hidden_act") == "quick_gelu":
        return "SD1"
    if width == 1024:
        return "SD2"
    cross = _json(folder / "unet" / "config.json").get("cross_attention_dim")
    if cross == 768:
        return "SD1"
    return "SD2"
