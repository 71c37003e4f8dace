"""The one Blocks definition of the Medical Diffusion tabs."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import gradio as gr

from medical_diffusion.ui.context import UIContext
from medical_diffusion.ui.feedback import quiet_http_request_logs, quiet_user_error_tracebacks
from medical_diffusion.ui.missing_package import missing_package_message

log = logging.getLogger(__name__)

#: the extension's stylesheet (the webui loads it by itself; the standalone app through ``gr.Blocks(css=)``)
STYLE_CSS = Path(__file__).resolve().parents[3] / "style.css"

#: (tab title, module name under medical_diffusion.ui) in display order
TABS = [
    ("Prepare data", "tab_prepare"),
    ("Train embedding", "tab_train"),
    ("Interpolate & compose", "tab_generate"),
    ("Inpaint", "tab_inpaint"),
    ("Evaluate", "tab_evaluate"),
    ("Embeddings", "tab_embeddings"),
]


def build_blocks(ctx: UIContext) -> gr.Blocks:
    """All tabs inside one ``gr.Blocks``; the webui shows it as a top-level tab.

    Each tab is built on its own: one whose module or build step fails to import a package shows
    what is missing and the pip command instead of its widgets, and the other tabs still work.
    """
    quiet_user_error_tracebacks()
    in_webui = ctx.send_to_txt2img is not None
    if not in_webui:  # the webui's logging is its own business
        quiet_http_request_logs()
    css = STYLE_CSS.read_text(encoding="utf-8") if STYLE_CSS.is_file() and not in_webui else None
    with gr.Blocks(analytics_enabled=False, title="Medical Diffusion", css=css) as blocks:
        if ctx.model_label:
            gr.Markdown(f"**Model:** {ctx.model_label}", elem_id="md_model_label")
        parts = {}
        with gr.Tabs(elem_id="md_tabs") as tabs:
            for title, module_name in TABS:
                short = module_name[4:]
                with gr.Tab(title, id=short, elem_id=f"md_tab_{short}") as tab:
                    built = _build_tab(ctx, title, module_name)
                if built is None:
                    continue
                parts[short] = built
                if "on_show" in built:  # embedding lists follow what was trained or loaded meanwhile
                    fn, outputs = built["on_show"]
                    tab.select(fn, None, outputs)
        if "inpaint" in parts and "generate" in parts:
            # a generated case goes to the Inpaint tab (the paper's "generate, then place a tumour")
            gen = parts["generate"]
            parts["inpaint"]["take_image"](gen["to_inpaint"], gen["last_image"], tabs, gen["cell"])
    return blocks


def _build_tab(ctx: UIContext, title: str, module_name: str) -> dict | None:
    """The tab's parts, or None (and a message in the tab) when a package it needs is missing."""
    with gr.Column() as body:
        try:
            module = importlib.import_module(f"medical_diffusion.ui.{module_name}")
            return module.build(ctx) or {}
        except ImportError as exc:
            log.warning("Medical Diffusion: the %s tab is unavailable: %s", title, exc)
            failure = exc
    body.visible = False  # hide whatever the build made before it failed
    gr.Markdown(missing_package_message(title, failure, in_webui=ctx.send_to_txt2img is not None),
                elem_id=f"md_missing_{module_name[4:]}")
    return None
