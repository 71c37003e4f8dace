"""Callbacks registered with the webui when ``scripts/medical_diffusion.py`` is imported."""

from __future__ import annotations

import os

from pathlib import Path

from medical_diffusion.allowed_roots import ENV_VAR
from medical_diffusion.atomic_io import atomic_write_text

SECTION = ("medical_diffusion", "Medical Diffusion")
#: Template for A1111's own Train tab: the prompt is the embedding's name alone (the paper's setup).
NAME_ONLY_TEMPLATE = "medical_name_only.txt"


def _apply_cmd_opts() -> None:
    """Carry ``--medical-diffusion-roots`` into the environment the core reads."""
    from modules import shared

    roots = getattr(shared.cmd_opts, "medical_diffusion_roots", None)
    if roots:
        os.environ[ENV_VAR] = os.pathsep.join(roots)


def install_name_only_template(templates_dir: str | os.PathLike) -> Path | None:
    """Put a ``[name]``-only template into the webui's template folder (once; never overwritten)."""
    folder = Path(templates_dir)
    if not folder.is_dir():
        return None
    path = folder / NAME_ONLY_TEMPLATE
    if not path.exists():
        atomic_write_text(path, "[name]\n")
    return path


#: (option key, default, label); ``webui.tabs.make_context`` maps them onto ``UIContext.defaults``
SETTINGS = [
    ("medical_diffusion_data_dir", "", "Work folder (prepared data, runs, reports); empty: <webui data>/medical_diffusion"),
    ("medical_diffusion_default_vectors", 64, "Default vectors per embedding (paper: 64)"),
    ("medical_diffusion_default_lr", "0.005", "Default learning rate or schedule (paper: 0.005)"),
    ("medical_diffusion_default_steps", 50000, "Default training steps (paper: 50,000)"),
    ("medical_diffusion_inception_weights", "", "FID Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth)"),
    ("medical_diffusion_radimagenet_weights", "", "MFID RadImageNet weights file (RadImageNet-ResNet50_notop.pth)"),
    ("medical_diffusion_resnet18_weights", "", "Classifier ResNet-18 weights file (resnet18-f37072fd.pth)"),
]


def on_ui_settings() -> None:
    from modules import shared

    for key, default, label in SETTINGS:
        shared.opts.add_option(key, shared.OptionInfo(default, label, section=SECTION))


def register() -> None:
    from modules import script_callbacks

    from medical_diffusion.webui import inpaint_upload
    from medical_diffusion.webui.api import on_app_started
    from medical_diffusion.webui.tabs import on_ui_tabs

    from modules import shared

    _apply_cmd_opts()
    install_name_only_template(shared.cmd_opts.textual_inversion_templates_dir)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_after_component(inpaint_upload.capture)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
