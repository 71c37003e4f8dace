"""Model and embeddings for the generation commands and tabs, plus prompt sanity warnings."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import InputFileError
from medical_diffusion.generation.prompts import budget_warnings, check_token_budget, parse_composable

log = logging.getLogger(__name__)


def load_model(model: str, device: "str | torch.device | Runtime" = "cpu") -> ModelBackend:
    """A backend from a diffusers folder, a ``.ckpt``/``.safetensors`` file, or a tiny demo model
    (``"tiny"``, ``"tiny-sd1"``, ``"tiny-sdxl"``).

    ``device`` is a device (fp32 weights) or a resolved :class:`~medical_diffusion.devices.Runtime`
    (device, weight dtype and attention kernel, from ``--device/--precision/--attention``).
    """
    from medical_diffusion.backend.diffusers_backend import load_backend
    from medical_diffusion.devices import Runtime

    if isinstance(device, Runtime):
        backend = load_backend(model, device=device.device, dtype=device.dtype, attention=device.attention)
    else:
        backend = load_backend(model, device=device)
    label = getattr(backend, "label", "")
    if label:
        log.warning("model: %s", label)
    return backend


def check_model_path(model: str) -> None:
    """Fail at once (before the slow model load) when ``model`` names no model."""
    from medical_diffusion.backend.families import is_tiny_model

    if is_tiny_model(model):
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise InputFileError(path, "model not found (give a diffusers folder, a .ckpt/.safetensors file, "
                                   "or 'tiny' / 'tiny-sd1' / 'tiny-sdxl')")
    if not path.is_dir() and path.suffix.lower() not in (".ckpt", ".safetensors"):
        raise InputFileError(path, "not a model: expected a diffusers folder or a .ckpt/.safetensors file")


def check_embedding_sources(embeddings_dir: str | None, files: Sequence[str] = ()) -> None:
    """Fail at once when the embeddings folder or a named embedding file is missing."""
    if embeddings_dir and not Path(embeddings_dir).is_dir():
        raise InputFileError(embeddings_dir, "not a folder (--embeddings-dir)")
    for file in files or ():
        if not Path(file).is_file():
            raise InputFileError(file, "no such embedding file (--embedding)")


def check_output_folder(out: str) -> None:
    """An output folder must not be an existing file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise InputFileError(out, "not a folder (output)")


def load_embedding_table(
    backend: ModelBackend, embeddings_dir: str | None = None, files: Sequence[str] = ()
) -> dict:
    """``{name: Embedding}`` from a folder (all readable files) and single files (later wins).

    Only embeddings of the backend's family load: its ``text_widths`` blocks (an SDXL model takes
    clip_l + clip_g pairs; a file of another family is refused naming the file and both families,
    a folder's skipped with that warning).
    """
    from medical_diffusion.embeddings import load_embedding, load_embeddings_dir
    from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

    widths = dict(backend.text_widths)
    table = {}
    if embeddings_dir:
        table.update(load_embeddings_dir(embeddings_dir, expected_widths=widths))
    for path in files or ():
        emb = load_embedding(path, expected_widths=widths)
        table[emb.name] = emb
    for emb in table.values():
        vectors_from_embedding(emb, widths)  # the blocks fit (MedDiffError naming both layouts if not)
    return table


def vectors_of(table: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """``{name: vectors}`` as the sampler wants it (an SDXL pair as one ``(n, clip_l + clip_g)`` tensor)."""
    from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

    return {name: vectors_from_embedding(emb) for name, emb in table.items()}


def backend_token_counter(backend: ModelBackend):
    """Count CLIP tokens of plain text with the backend's tokenizer."""
    return lambda text: int(backend.text_to_vectors(text).shape[0])


def prompt_warnings(backend: ModelBackend, prompt: str, vectors: Mapping[str, torch.Tensor]) -> list[str]:
    """Token-budget warnings, and parts that use none of the loaded embeddings (typos)."""
    lengths = {name: int(v.shape[0]) for name, v in vectors.items()}
    warnings = budget_warnings(check_token_budget(prompt, lengths, backend_token_counter(backend)))
    for text, _ in parse_composable(prompt):
        odd = re.search(r":\s*([-+]?\d*\.?\d+)\s*%\s*$", text)
        if odd:
            warnings.append(f"weight '{odd.group(0).strip()}' in part {text.strip()!r} is not read as a weight "
                            f"(A1111 takes decimals: write :{float(odd.group(1)) / 100:g})")
    if lengths:
        names = "|".join(re.escape(n) for n in lengths)
        for text, _ in parse_composable(prompt):
            if text.strip() and not re.search(rf"(?<![\w-])({names})(?![\w-])", text):
                warnings.append(f"prompt part {text.strip()!r} uses none of the loaded embeddings "
                                f"({', '.join(sorted(lengths))})")
    elif prompt.strip():
        warnings.append("no embeddings loaded: the prompt is plain text")
    return warnings
