"""Publishing a run's final embedding into the embeddings home, so every command and tab finds it.

The run's ``<name>.pt`` (SDXL: ``<name>.safetensors``) is copied byte for byte, atomically, to
``HOME/<name>.<suffix>``. A different embedding of that name already there is never replaced silently:
it may be replaced only when it came from this run folder (a hidden ``.<name>.meddiff-source.json``
beside it records the run and the file's SHA-256), when the run folder holds the same bytes under that
file name, or when the caller forces it. Nor is it published where another file of that name (in a
subfolder, in another case, an image) would be loaded instead of it or beside it: the loaders scan the
home recursively (:func:`~medical_diffusion.embeddings.readers.embedding_paths_on_disk`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medical_diffusion.atomic_io import atomic_write_bytes, atomic_write_text
from medical_diffusion.embeddings.readers import embedding_file, embedding_files_by_name
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.file_digest import file_sha256

#: what an embedding of one name may be saved as (one per family; ``.bin``: diffusers' and A1111's)
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
SOURCE_SUFFIX = ".meddiff-source.json"
#: the caller's way to replace anyway, in refusals (the tab and API say their own)
CLI_HINT = "pass --force-publish to replace it, or train with another --name (or --no-publish)"


def source_record_path(home: str | os.PathLike, name: str) -> Path:
    """The hidden record of where ``HOME/<name>.*`` was published from."""
    return Path(home) / f".{name}{SOURCE_SUFFIX}"


def _record(home: Path, name: str) -> dict:
    try:
        data = json.loads(source_record_path(home, name).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ours(existing: Path, record: dict, run_dir: Path) -> bool:
    """Whether ``existing`` may be replaced by this run: published from it and unchanged since, or the
    same bytes as the run's own file of that name."""
    digest = file_sha256(existing)
    if record.get("run_dir") == str(run_dir) and record.get("file") == existing.name \
            and record.get("sha256") == digest:
        return True
    own = run_dir / existing.name
    return own.is_file() and file_sha256(own) == digest


def _own_files(home: Path, name: str) -> set[Path]:
    """The files publishing ``name`` writes or removes: ``HOME/<name>.{pt,safetensors,bin}``."""
    return {home / f"{name}{suffix}" for suffix in EMBEDDING_SUFFIXES}


def _check_no_other_file(home: Path, name: str) -> None:
    """Refuse when a file other than ``HOME/<name>.*`` goes by ``name`` (as the loaders name files: a
    subfolder's, another case's, an image's stored name): which of them loads would not be the published one."""
    others = [p for p in embedding_files_by_name(home).get(name.lower(), []) if p not in _own_files(home, name)]
    if others:
        listed = ", ".join(map(str, others))
        raise MedDiffError(f"{listed}: another embedding file named {name.lower()!r} is in the embeddings folder "
                           f"{home} (subfolders are read too), so a prompt word {name!r} would not be sure to load "
                           f"the published file; rename it or move it out of {home}, or train with another name")


def check_publishable(home: str | os.PathLike, name: str, run_dir: str | os.PathLike, *, force: bool = False,
                      hint: str = CLI_HINT) -> None:
    """Raise :class:`MedDiffError` when publishing ``run_dir``'s ``name`` into ``home`` would replace a
    different embedding of that name (checked before training too, so a long run is not wasted), or, even
    when forced, when another file in ``home`` goes by that name (the loaders would read it instead)."""
    home, run = Path(home), Path(run_dir).expanduser().resolve()
    if not home.is_dir():
        return
    _check_no_other_file(home, name)
    if force:
        return
    record = _record(home, name)
    for suffix in EMBEDDING_SUFFIXES:
        existing = home / f"{name}{suffix}"
        if existing.is_file() and not _ours(existing, record, run):
            origin = f" (published from {record['run_dir']})" if isinstance(record.get("run_dir"), str) else ""
            raise MedDiffError(f"{existing}: a different embedding named {name!r} is already in the embeddings "
                               f"folder{origin} and is not replaced; {hint}")


def publish_embedding(source: str | os.PathLike, home: str | os.PathLike, name: str, run_dir: str | os.PathLike,
                      *, force: bool = False, hint: str = CLI_HINT) -> Path:
    """Copy the run's final embedding ``source`` to ``HOME/<name><its suffix>`` atomically; the file.

    Another file of that name with another suffix (the other family's) is removed, so a prompt word
    means one embedding. Refuses as :func:`check_publishable` says.
    """
    source = Path(source)
    if not source.is_file():
        raise InputFileError(source, "no trained embedding to publish")
    home = Path(home)
    check_publishable(home, name, run_dir, force=force, hint=hint)
    data = source.read_bytes()
    home.mkdir(parents=True, exist_ok=True)
    target = atomic_write_bytes(home / f"{name}{source.suffix}", data)
    for suffix in EMBEDDING_SUFFIXES:
        if suffix != source.suffix:
            (home / f"{name}{suffix}").unlink(missing_ok=True)
    record = {"run_dir": str(Path(run_dir).expanduser().resolve()), "file": target.name,
              "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_text(source_record_path(home, name), json.dumps(record, indent=2) + "\n")
    loaded = embedding_file(name, home)
    if loaded is None or loaded.resolve() != target.resolve():
        raise MedDiffError(f"{target}: published, but the name {name.lower()!r} loads "
                           f"{loaded or 'nothing'} from {home}; remove the other file")
    return target
