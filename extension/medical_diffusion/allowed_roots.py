"""Which folders the extension may read and write (``--medical-diffusion-roots``).

Paths typed in the UI or sent to the API are resolved (symlinks and ``..`` included)
and must lie inside one of the allowed roots. With no roots configured every path is
allowed, which is the CLI's default.
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
    resolved = Path(path).expanduser().resolve()
    if not roots:
        return resolved
    for root in roots:
        if resolved == root or root in resolved.parents:
            return resolved
    raise MedDiffError(
        f"{path}: outside the folders this extension may use ({', '.join(map(str, roots))})"
    )


def check_all_allowed(paths: Iterable[str | os.PathLike], roots: Sequence[Path] | None = None) -> list[Path]:
    return [check_allowed(p, roots) for p in paths]
