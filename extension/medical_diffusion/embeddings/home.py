"""The embeddings home: the one folder that training publishes into and every command and tab reads.

Like the webui's ``embeddings/`` folder beside its launch: ``./embeddings`` in the folder the command runs
in (beside ``runs/``), or ``$MEDDIFF_EMBEDDINGS_DIR``; each command's ``--embeddings-dir`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable that moves the embeddings home
ENV_VAR = "MEDDIFF_EMBEDDINGS_DIR"
#: the home's name relative to the current folder when the variable is unset
DEFAULT_NAME = "embeddings"


def embeddings_home(override: str | os.PathLike | None = None) -> Path:
    """``override`` if given, else ``$MEDDIFF_EMBEDDINGS_DIR``, else ``./embeddings`` (absolute, not created)."""
    chosen = override or os.environ.get(ENV_VAR) or DEFAULT_NAME
    return Path(chosen).expanduser().resolve()


def describe_home(override: str | os.PathLike | None = None) -> str:
    """``/abs/embeddings (from --embeddings-dir|$MEDDIFF_EMBEDDINGS_DIR|the default ./embeddings)`` for messages."""
    if override:
        how = "--embeddings-dir"
    elif os.environ.get(ENV_VAR):
        how = f"${ENV_VAR}"
    else:
        how = f"the default ./{DEFAULT_NAME}; set ${ENV_VAR} or --embeddings-dir to move it"
    return f"{embeddings_home(override)} ({how})"
