"""Read an embedding from any format users meet: A1111 ``.pt``/``.safetensors``/images,
diffusers ``learned_embeds``, and bare tensors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from medical_diffusion.embeddings.image_format import read_image_embedding
from medical_diffusion.embeddings.model import Embedding, name_from_token, validate
from medical_diffusion.embeddings.safe_pickle import safe_torch_load
from medical_diffusion.errors import InputFileError, MedDiffError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin")  # as A1111: .ckpt/.pth are models, not embeddings
IMAGE_SUFFIXES = (".png", ".webp")
EMBEDDING_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",) + IMAGE_SUFFIXES
#: file stem diffusers uses for textual-inversion weights (the webui names such a file by this stem,
#: not by the token inside, and so do we)
DIFFUSERS_STEM = "learned_embeds"
#: folder scans skip bigger files: the largest embedding A1111 can use (75 vectors x 2048 SDXL
#: widths x 4 bytes) is about 0.6 MB, so a file 100x that size is a model or LoRA, not worth reading
MAX_SCAN_BYTES = 64 * 1024 * 1024


class NoEmbeddingInImage(InputFileError):
    """An image without an embedding (e.g. a plain preview picture)."""


def _as_tensor(value: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif hasattr(value, "_parameters") and isinstance(getattr(value, "_parameters"), Mapping):
        raise InputFileError(path, f"{what} is a module, not a tensor")
    else:
        raise InputFileError(path, f"{what} is a {type(value).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise InputFileError(path, f"{what} has dtype {tensor.dtype}, expected floating point")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise InputFileError(path, f"{what} has shape {tuple(tensor.shape)}, expected (n_vectors, width) or (width,)")
    return tensor.detach().to("cpu", torch.float32)


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def embedding_from_data(data: Any, path: str | os.PathLike, name: str, metadata: Mapping[str, str] | None = None) -> Embedding:
    """Interpret a loaded object (A1111 dict, SDXL pair, diffusers ``{token: tensor}``, bare tensor)."""
    path = Path(path)
    meta: dict[str, Any] = dict(metadata or {})
    if isinstance(data, torch.Tensor):
        return Embedding(name, _as_tensor(data, path, "tensor"), _optional_int(meta.get("step")),
                         _optional_str(meta.get("sd_checkpoint")), _optional_str(meta.get("sd_checkpoint_name")))
    if not isinstance(data, Mapping):
        raise InputFileError(path, f"holds a {type(data).__name__}, not an embedding (expected a dict or a tensor)")
    if not data:
        raise InputFileError(path, "holds an empty dictionary, not an embedding")

    if "string_to_param" in data:  # A1111 / original textual-inversion repo
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping):
            raise InputFileError(path, f"'string_to_param' is a {type(params).__name__}, expected a dict of one tensor")
        if len(params) != 1:
            keys = ", ".join(map(repr, list(params)[:5]))
            raise InputFileError(path, f"'string_to_param' holds {len(params)} params ({keys}); an embedding file holds exactly one")
        key, value = next(iter(params.items()))
        vectors = _as_tensor(value, path, f"string_to_param[{key!r}]")
        meta.update({k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name") if data.get(k) is not None})
        return Embedding(name, vectors, _optional_int(meta.get("step")), _optional_str(meta.get("sd_checkpoint")),
                         _optional_str(meta.get("sd_checkpoint_name")))

    if "clip_l" in data or "clip_g" in data:  # SDXL pair (kohya / A1111)
        missing = [k for k in ("clip_l", "clip_g") if k not in data]
        if missing:
            raise InputFileError(path, f"SDXL embedding lacks {' and '.join(missing)} (needs both clip_l and clip_g)")
        clip_l = _as_tensor(data["clip_l"], path, "clip_l")
        clip_g = _as_tensor(data["clip_g"], path, "clip_g")
        return Embedding(name, clip_l, _optional_int(meta.get("step")), _optional_str(meta.get("sd_checkpoint")),
                         _optional_str(meta.get("sd_checkpoint_name")), extra={"clip_g": clip_g})

    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = [k for k in data if k not in tensors]
    if len(tensors) == 1 and not others:  # diffusers {token: tensor}, kohya {"emb_params": tensor}
        key, value = next(iter(tensors.items()))
        return Embedding(name, _as_tensor(value, path, f"tensor {key!r}"), _optional_int(meta.get("step")),
                         _optional_str(meta.get("sd_checkpoint")), _optional_str(meta.get("sd_checkpoint_name")))
    if len(tensors) > 1:
        keys = ", ".join(map(repr, list(tensors)[:5]))
        raise InputFileError(path, f"holds {len(tensors)} tensors ({keys}); an embedding file holds exactly one (or SDXL clip_l + clip_g)")
    keys = ", ".join(map(repr, list(data)[:8]))
    raise InputFileError(path, f"unexpected keys ({keys}); expected A1111 'string_to_param', SDXL 'clip_l'/'clip_g', or one {{token: tensor}}")


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise InputFileError(path, "empty file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            keys = list(fh.keys())
            if len(keys) > 2 or (len(keys) == 2 and set(keys) != {"clip_l", "clip_g"}):
                shown = ", ".join(map(repr, keys[:5])) + (", ..." if len(keys) > 5 else "")
                raise InputFileError(path, f"holds {len(keys)} tensors ({shown}); an embedding file holds exactly one (or SDXL clip_l + clip_g)")
            return {k: fh.get_tensor(k) for k in keys}, metadata
    except InputFileError:
        raise
    except Exception as exc:  # safetensors' own error type moved between releases
        raise InputFileError(path, f"not a readable safetensors file (truncated or corrupt: {exc})") from None


def describe_data(data: Any, path: Path, image_source: str | None = None) -> str:
    """A short label of the on-disk layout, e.g. ``"A1111 .pt"`` or ``"diffusers learned_embeds"``."""
    if image_source:
        return f"A1111 image ({image_source})"
    if isinstance(data, torch.Tensor):
        return "bare tensor"
    if isinstance(data, Mapping) and "string_to_param" in data:
        return "A1111 .pt" if path.suffix.lower() != ".safetensors" else "A1111 dict in .safetensors"
    if isinstance(data, Mapping) and "clip_g" in data:
        return f"SDXL pair (clip_l + clip_g) {path.suffix.lower()}"
    key = next(iter(data)) if isinstance(data, Mapping) and data else "?"
    if path.stem.lower() == DIFFUSERS_STEM:
        return f"diffusers {path.name} (token {key!r})"
    return f"single tensor {key!r} in {path.suffix.lower()}"


def read_embedding(path: str | os.PathLike, expected_width: int | None = None,
                   expected_widths: dict[str, int] | None = None,
                   check_width: bool = True) -> tuple[Embedding, str, Path]:
    """Like :func:`load_embedding`, also returning the format label and the file actually read."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file")
    if path.is_dir():
        candidates = [path / f"{DIFFUSERS_STEM}.safetensors", path / f"{DIFFUSERS_STEM}.bin"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise InputFileError(path, f"folder has no {DIFFUSERS_STEM}.safetensors or {DIFFUSERS_STEM}.bin")
        path = found
    suffix = path.suffix.lower()
    name = path.stem.lower()
    metadata: dict[str, str] = {}
    image_source = None
    if suffix == ".safetensors":
        data, metadata = _load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        data = safe_torch_load(path)
    elif suffix in IMAGE_SUFFIXES:
        found_data = read_image_embedding(path, with_source=True)
        if found_data is None:
            raise NoEmbeddingInImage(path, "image holds no embedding (no 'sd-ti-embedding' chunk or data strip)")
        data, image_source = found_data
        stored = data.get("name")
        if isinstance(stored, str) and stored.strip():
            name = name_from_token(stored)
    else:
        raise InputFileError(path, f"unsupported embedding file type {suffix or '(none)'}; expected one of {', '.join(EMBEDDING_SUFFIXES)}")
    emb = embedding_from_data(data, path, name, metadata)
    return (validate(emb, path, expected_width, expected_widths, check_width), describe_data(data, path, image_source),
            path)


def load_embedding(path: str | os.PathLike, expected_width: int | None = None,
                   expected_widths: dict[str, int] | None = None, check_width: bool = True) -> Embedding:
    """Read an embedding file of any supported format.

    The name is the lowercased file stem, as the webui names embeddings (a diffusers
    ``learned_embeds.*`` is "learned_embeds" there too, whatever token it stores), except for
    images (the name stored inside, as the webui reads it).
    ``expected_width`` admits a custom text width (e.g. a tiny test model); otherwise the width
    must match SD1, SD2 or SDXL. ``expected_widths`` (a backend's ``text_widths``) asks for exactly
    that model's blocks: an SDXL pair for an SDXL model, one tensor of that width otherwise (see
    :func:`~medical_diffusion.embeddings.model.validate`); ``check_width=False`` takes any width (to
    inspect or convert a file). Raises :class:`InputFileError` naming the file and problem.
    """
    return read_embedding(path, expected_width, expected_widths, check_width)[0]


def load_embeddings_dir(folder: str | os.PathLike, expected_width: int | None = None,
                        expected_widths: dict[str, int] | None = None) -> dict[str, Embedding]:
    """Every readable embedding under ``folder`` (recursively), keyed by name.

    Unreadable files are logged as warnings and skipped; images without an embedding and
    A1111 ``*.preview.png`` files are skipped silently. On a name clash an A1111 file wins over
    other formats, then the first in sorted path order, whatever order the folders are walked in;
    each clash is logged once per process.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "not a folder")
    candidates: dict[str, list[tuple[str, Path, Embedding]]] = {}
    for path in _candidate_files(folder):
        try:
            emb, fmt, _ = read_embedding(path, expected_width, expected_widths)
        except NoEmbeddingInImage:
            continue
        except MedDiffError as exc:
            _warn_once(f"skipping embedding: {exc}")
            continue
        candidates.setdefault(emb.name, []).append((fmt, path, emb))
    found: dict[str, Embedding] = {}
    for name, entries in candidates.items():
        entries.sort(key=lambda entry: preference(entry[1], entry[0]))
        found[name] = entries[0][2]
        if len(entries) > 1:
            skipped = ", ".join(str(entry[1]) for entry in entries[1:])
            _warn_once(f"embedding name {name!r}: using {entries[0][1]}, skipping {skipped}")
    return found


def preference(path: Path, fmt: str) -> tuple[int, str]:
    """Which of several files of one name a folder scan takes (the smallest wins): A1111's own formats
    (label from :func:`describe_data`) first, then sorted path order."""
    return (0 if fmt.startswith("A1111") else 1, str(path))


def _candidate_files(folder: Path):
    """The files of ``folder`` (recursively, sorted) that a folder scan reads as embeddings."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in EMBEDDING_SUFFIXES or path.name.startswith("."):
            continue
        if suffix in IMAGE_SUFFIXES and Path(path.stem).suffix.lower() == ".preview":
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if size > MAX_SCAN_BYTES and suffix not in IMAGE_SUFFIXES:
            _warn_once(f"skipping embedding: {path}: {size / 2**20:.0f} MB is too large for an embedding (a model or LoRA?)")
            continue
        yield path


def _name_on_disk(path: Path) -> str | None:
    """The name ``path`` goes by (its lowercased stem; an image's stored name); None for a picture
    without an embedding."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return path.stem.lower()
    try:
        image = read_image_embedding(path, with_source=True)
    except MedDiffError:
        return None
    if image is None:  # a plain picture
        return None
    stored = image[0].get("name")
    return name_from_token(stored) if isinstance(stored, str) and stored.strip() else path.stem.lower()


def embedding_files_by_name(folder: str | os.PathLike | None = None, files=()) -> dict[str, list[Path]]:
    """``{name: [file, ...]}``: every file in ``folder`` (recursively, sorted) and then in ``files`` that
    goes by each name, without reading tensors; more than one file is a name clash."""
    paths = list(_candidate_files(Path(folder))) if folder else []
    found: dict[str, list[Path]] = {}
    for path in [*paths, *map(Path, files)]:
        name = _name_on_disk(path)
        if name is not None:
            found.setdefault(name, []).append(path)
    return found


def _loaded_from_folder(paths: list[Path]) -> Path:
    """The file of several of one name that :func:`load_embeddings_dir` takes (unreadable ones are skipped
    as it skips them; the width check needs the model and is not made here)."""
    if len(paths) == 1:
        return paths[0]
    ranked = []
    for path in paths:
        try:
            _, fmt, _ = read_embedding(path, check_width=False)
        except MedDiffError:
            continue
        ranked.append(preference(path, fmt))
    return Path(min(ranked)[1]) if ranked else paths[0]


def embedding_paths_on_disk(folder: str | os.PathLike | None = None, files=()) -> dict[str, Path]:
    """``{name: file}``: the file each embedding name loads from, as the loaders choose it (a folder
    scan's :func:`preference` on a clash, then ``files`` in order, the later winning as in
    :func:`~medical_diffusion.generation.loading.load_embedding_table`), for checking a command's names
    before loading a model and for recording which file a picture used. Only clashes are read."""
    in_folder = embedding_files_by_name(folder)
    found = {name: _loaded_from_folder(paths) for name, paths in in_folder.items()}
    for name, paths in embedding_files_by_name(None, files).items():
        found[name] = paths[-1]
    return found


def embedding_file(name: str, folder: str | os.PathLike | None = None, files=()) -> Path | None:
    """The file that the embedding ``name`` (a prompt word, any case) loads from; None when no file has it."""
    return embedding_paths_on_disk(folder, files).get(name.lower())


def embedding_names_on_disk(folder: str | os.PathLike | None = None, files=()) -> set[str]:
    """The names the embeddings in ``folder`` and ``files`` go by (see :func:`embedding_paths_on_disk`)."""
    return set(embedding_paths_on_disk(folder, files))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a folder-scan warning the first time it occurs (the tabs rescan the same folder often)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)
