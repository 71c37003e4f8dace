"""Sampling defaults that suit the model: the paper's for a real model, a quick look for the tiny demos.

Decided from the model's name alone (never by loading it), as the Train tab's run-size defaults are.
"""

from __future__ import annotations

from medical_diffusion.backend.families import is_tiny_model

#: de Wilde et al. 2024: 100 Euler ancestral steps at 512 px
PAPER_SAMPLING = {"steps": 100, "width": 512, "height": 512}
#: the random-weight tiny models: a picture in seconds on a CPU (they learn noise, not anatomy)
TINY_SAMPLING = {"steps": 20, "width": 128, "height": 128}


def sampling_defaults(model: object) -> dict[str, int]:
    """``steps``, ``width`` and ``height`` the generation tabs offer for ``model`` (a path, a tiny model's
    name, or ``"webui"``); a new dict."""
    return dict(TINY_SAMPLING if is_tiny_model(model) else PAPER_SAMPLING)
