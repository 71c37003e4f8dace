"""Model and embeddings for the generation commands and tabs; prompt checks (unknown embedding names are
refused, token-budget problems warned about)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import InputFileError
from medical_diffusion.generation.prompts import (PLAIN_PROMPT_HINT, budget_warnings, check_prompt_embeddings,
                                                  check_token_budget, parse_composable, parts_without_embeddings)

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


def check_prompt_names(prompts: Sequence[str], folder: str | Path | None, files: Sequence[str] = (), *,
                       where: str, allow_plain: bool = False, plain_hint: str = PLAIN_PROMPT_HINT) -> None:
    """Refuse, before the model loads, prompts with a part that names none of the embeddings on disk in
    ``folder`` (when it is one) and ``files`` (their names, not their tensors): the
    :class:`~medical_diffusion.generation.prompts.UnknownEmbeddingError` says ``where`` was looked."""
    from medical_diffusion.embeddings.readers import embedding_names_on_disk

    prompts = [p for p in prompts if p]
    if not prompts:
        return
    known = embedding_names_on_disk(folder if folder and Path(folder).is_dir() else None, files or ())
    check_prompt_embeddings(prompts, sorted(known), where, allow_plain=allow_plain, plain_hint=plain_hint)


@dataclass
class EmbeddingSources:
    """Where a command reads its embeddings: a folder (or none), single files, and that in words."""

    folder: Path | None
    files: list[str] = field(default_factory=list)
    where: str = ""


def embedding_sources(embeddings_dir: str | None = None, files: Sequence[str] = ()) -> EmbeddingSources:
    """``--embeddings-dir`` and ``--embedding`` as given; with neither, the embeddings home
    (:func:`~medical_diffusion.embeddings.home.embeddings_home`: ``./embeddings`` or
    ``$MEDDIFF_EMBEDDINGS_DIR``), read when it exists. Fails at once on a missing folder or file."""
    from medical_diffusion.embeddings.home import describe_home, embeddings_home

    files = [str(f) for f in files or ()]
    check_embedding_sources(embeddings_dir, files)
    places = []
    folder = None
    if embeddings_dir:
        folder = Path(embeddings_dir).expanduser().resolve()
        places.append(f"--embeddings-dir {folder}")
    elif not files:
        home = embeddings_home()
        folder = home if home.is_dir() else None
        missing = "" if folder else (", which is not a folder" if home.exists() else ", which does not exist")
        places.append(f"the embeddings home {describe_home()}{missing}")
    if files:
        places.append(f"--embedding {', '.join(files)}")
    return EmbeddingSources(folder, files, " and ".join(places))


class EmbeddingTable(dict):
    """``{name: Embedding or vectors}`` that also says where the embeddings were looked for (``where``),
    for messages about names that are not in it."""

    def __init__(self, items: Mapping = (), where: str = ""):
        super().__init__(items)
        self.where = where


def check_output_folder(out: str) -> None:
    """An output folder must not be an existing file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise InputFileError(out, "not a folder (output)")


def load_embedding_table(
    backend: ModelBackend, embeddings_dir: str | None = None, files: Sequence[str] = (), where: str | None = None
) -> EmbeddingTable:
    """``{name: Embedding}`` from a folder (all readable files) and single files (later wins).

    Only embeddings of the backend's family load: its ``text_widths`` blocks (an SDXL model takes
    clip_l + clip_g pairs; a file of another family is refused naming the file and both families,
    a folder's skipped with that warning). ``where`` (default: the folder and files) is kept on the
    table for :func:`prompt_warnings`' refusals.
    """
    from medical_diffusion.embeddings import load_embedding, load_embeddings_dir
    from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

    widths = dict(backend.text_widths)
    if where is None:
        where = " and ".join(filter(None, [str(Path(embeddings_dir).resolve()) if embeddings_dir else "",
                                           ", ".join(map(str, files or ()))])) or "no folder or file"
    table = EmbeddingTable(where=where)
    if embeddings_dir:
        table.update(load_embeddings_dir(embeddings_dir, expected_widths=widths))
    for path in files or ():
        emb = load_embedding(path, expected_widths=widths)
        table[emb.name] = emb
    for emb in table.values():
        vectors_from_embedding(emb, widths)  # the blocks fit (MedDiffError naming both layouts if not)
    return table


def vectors_of(table: Mapping[str, object]) -> EmbeddingTable:
    """``{name: vectors}`` as the sampler wants it (an SDXL pair as one ``(n, clip_l + clip_g)`` tensor),
    keeping the table's ``where``."""
    from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

    return EmbeddingTable({name: vectors_from_embedding(emb) for name, emb in table.items()},
                          where=getattr(table, "where", ""))


def backend_token_counter(backend: ModelBackend):
    """Count CLIP tokens of plain text with the backend's tokenizer."""
    return lambda text: int(backend.text_to_vectors(text).shape[0])


def prompt_warnings(backend: ModelBackend, prompt: str, vectors: Mapping[str, torch.Tensor],
                    allow_plain: bool = False, plain_hint: str = PLAIN_PROMPT_HINT) -> list[str]:
    """Refuse a prompt with a part that uses none of the loaded embeddings (a misspelt name: the
    :class:`~medical_diffusion.generation.prompts.UnknownEmbeddingError` names the part and where the
    table was loaded from, ``vectors.where``); else token-budget and weight-syntax warnings.

    ``allow_plain`` (opt-in) lets such parts through with a warning instead.
    """
    check_prompt_embeddings([prompt], list(vectors), getattr(vectors, "where", "") or "the loaded embeddings",
                            allow_plain=allow_plain, plain_hint=plain_hint)
    lengths = {name: int(v.shape[0]) for name, v in vectors.items()}
    warnings = budget_warnings(check_token_budget(prompt, lengths, backend_token_counter(backend)))
    for text, _ in parse_composable(prompt):
        odd = re.search(r":\s*([-+]?\d*\.?\d+)\s*%\s*$", text)
        if odd:
            warnings.append(f"weight '{odd.group(0).strip()}' in part {text.strip()!r} is not read as a weight "
                            f"(A1111 takes decimals: write :{float(odd.group(1)) / 100:g})")
    if lengths:
        for text in parts_without_embeddings(prompt, list(lengths)):
            warnings.append(f"prompt part {text!r} uses none of the loaded embeddings "
                            f"({', '.join(sorted(lengths))}): sampled as plain text")
    elif prompt.strip():
        warnings.append("no embeddings loaded: the prompt is plain text")
    return warnings


def prompts_warnings(backend: ModelBackend, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor],
                     allow_plain: bool = False, plain_hint: str = PLAIN_PROMPT_HINT) -> list[str]:
    """:func:`prompt_warnings` for every prompt of a job (the frames of a grid, the stages of a strip):
    one refusal names every unknown part of all of them, before any is sampled; the warnings are
    listed once each."""
    check_prompt_embeddings(list(prompts), list(vectors), getattr(vectors, "where", "") or "the loaded embeddings",
                            allow_plain=allow_plain, plain_hint=plain_hint)
    warnings: list[str] = []
    for prompt in prompts:
        warnings += [w for w in prompt_warnings(backend, prompt, vectors, allow_plain=True) if w not in warnings]
    return warnings
