"""Run-size defaults that suit the model: the paper's for a real model, a quick run for the tiny demos.

Decided from the model's name alone (never by loading it), so the Train tab can offer them when the
webui starts, before any checkpoint has loaded.
"""

from __future__ import annotations

from medical_diffusion.backend.families import is_tiny_model

#: de Wilde et al. 2024 (SD2 at 512 px, 50,000 steps), checkpoints and previews every 500 steps
PAPER_SIZE = {"steps": 50_000, "resolution": 512, "save_every": 500, "preview_every": 500, "val_every": 500}
#: the random-weight tiny models: a workflow demo that finishes in about a minute on a CPU
TINY_SIZE = {"steps": 200, "resolution": 64, "save_every": 50, "preview_every": 50, "val_every": 50}


def size_defaults(model: object) -> dict[str, int]:
    """``steps``, ``resolution``, ``save_every``, ``preview_every`` and ``val_every`` for ``model`` (a path,
    ``"tiny"``/``"tiny-sd1"``/``"tiny-sdxl"``, or ``"webui"``); a new dict."""
    return dict(TINY_SIZE if is_tiny_model(model) else PAPER_SIZE)
