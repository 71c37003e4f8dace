"""Callbacks registered with the webui when ``scripts/medical_diffusion.py`` is imported."""

from __future__ import annotations

import os

from medical_diffusion.allowed_roots import ENV_VAR

SECTION = ("medical_diffusion", "Medical Diffusion")


def _apply_cmd_opts() -> None:
    """Carry ``--medical-diffusion-roots`` into the environment the core reads."""
    from modules import shared

    roots = getattr(shared.cmd_opts, "medical_diffusion_roots", None)
    if roots:
        os.environ[ENV_VAR] = os.pathsep.join(roots)


def on_ui_settings() -> None:
    from modules import shared

    shared.opts.add_option(
        "medical_diffusion_data_dir",
        shared.OptionInfo("", "Default folder for prepared training data", section=SECTION),
    )
    shared.opts.add_option(
        "medical_diffusion_default_vectors",
        shared.OptionInfo(64, "Default vectors per embedding", section=SECTION),
    )


def register() -> None:
    from modules import script_callbacks

    _apply_cmd_opts()
    script_callbacks.on_ui_settings(on_ui_settings)
