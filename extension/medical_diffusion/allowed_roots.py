"""Which folders the extension may read and write (``--medical-diffusion-roots`` in the webui,
``meddiff ui --allowed-roots`` or ``MEDDIFF_ALLOWED_ROOTS`` standalone).

Every path typed in the UI or sent to the API goes through :func:`resolve_user_path`: it is
resolved (symlinks and ``..`` included) and must lie inside one of the allowed roots; an empty
path is an error, never "the current folder". With no roots configured every path is allowed,
which is the CLI's default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from medical_diffusion.errors import MedDiffError

ENV_VAR = "MEDDIFF_ALLOWED_ROOTS"


def parse_roots(value: str | None) -> list[Path]:
    """Split an ``os.pathsep``-separated list of folders into resolved paths."""
    if not value:
        return []
    return [Path(part).expanduser().resolve() for part in value.split(os.pathsep) if part.strip()]


def roots_from_env() -> list[Path]:
    return parse_roots(os.environ.get(ENV_VAR))


def check_allowed(path: str | os.PathLike, roots: Sequence[Path] | None = None) -> Path:
    """Return the resolved ``path`` if it lies inside an allowed root, else raise."""
    roots = roots_from_env() if roots is None else list(roots)
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, name too long, NUL byte
        raise MedDiffError(f"{path}: not a usable path ({exc})") from None
    if not roots:
        return resolved
    for root in roots:
        if resolved == root or root in resolved.parents:
            return resolved
    raise MedDiffError(
        f"{path}: outside the folders this extension may use ({', '.join(map(str, roots))})"
    )


PATH_KINDS = ("path", "file", "folder")


def resolve_user_path(
    path: str | os.PathLike | None,
    *,
    must_exist: bool = False,
    kind: str = "path",
    label: str = "path",
    base: str | os.PathLike | None = None,
    roots: Sequence[Path] | None = None,
) -> Path:
    """The one entry point for paths from the UI and the API.

    ``path``: what the user gave (``~`` expanded; relative paths are taken under ``base`` when
    given, else the working folder). The result is the fully resolved path (symlinks followed),
    refused with :class:`MedDiffError` when it lands outside the allowed roots (``roots``; default
    :func:`roots_from_env`). ``must_exist`` checks that it exists; ``kind`` ``"file"`` or ``"folder"``
    checks what it is when it exists; ``label`` names the setting in messages ("training images
    folder"). Empty or blank paths are refused.
    """
    if kind not in PATH_KINDS:
        raise ValueError(f"kind must be one of {PATH_KINDS}, got {kind!r}")
    text = "" if path is None else os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise MedDiffError(f"{label}: no path given")
    if "\x00" in text:
        raise MedDiffError(f"{label}: {text!r} is not a valid path")
    candidate = Path(text).expanduser()
    if base is not None and not candidate.is_absolute():
        candidate = Path(base) / candidate
    resolved = check_allowed(candidate, roots)
    if must_exist and not resolved.exists():
        raise MedDiffError(f"{text}: no such {'file or folder' if kind == 'path' else kind} ({label})")
    if resolved.exists():
        if kind == "file" and not resolved.is_file():
            raise MedDiffError(f"{text}: not a file ({label})")
        if kind == "folder" and not resolved.is_dir():
            raise MedDiffError(f"{text}: not a folder ({label})")
    return resolved


def is_inside_roots(path: str | os.PathLike, roots: Sequence[Path] | None = None) -> bool:
    """True when ``path`` (resolved) lies inside the allowed roots (always, with none configured)."""
    try:
        check_allowed(path, roots)
    except MedDiffError:
        return False
    return True


def check_all_allowed(paths: Iterable[str | os.PathLike], roots: Sequence[Path] | None = None) -> list[Path]:
    return [check_allowed(p, roots) for p in paths]
