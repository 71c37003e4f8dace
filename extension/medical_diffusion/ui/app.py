"""The one Blocks definition of the Medical Diffusion tabs."""

from __future__ import annotations

import gradio as gr

from medical_diffusion.ui.context import UIContext

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
    """All tabs inside one ``gr.Blocks``; the webui shows it as a top-level tab."""
    import importlib

    with gr.Blocks(analytics_enabled=False, title="Medical Diffusion") as blocks:
        if ctx.model_label:
            gr.Markdown(f"**Model:** {ctx.model_label}", elem_id="md_model_label")
        parts = {}
        with gr.Tabs(elem_id="md_tabs") as tabs:
            for title, module_name in TABS:
                module = importlib.import_module(f"medical_diffusion.ui.{module_name}")
                short = module_name[4:]
                with gr.Tab(title, id=short, elem_id=f"md_tab_{short}") as tab:
                    parts[short] = module.build(ctx) or {}
                if "on_show" in parts[short]:  # embedding lists follow what was trained or loaded meanwhile
                    fn, outputs = parts[short]["on_show"]
                    tab.select(fn, None, outputs)
        # a generated case goes to the Inpaint tab (the paper's "generate, then place a tumour")
        parts["inpaint"]["take_image"](parts["generate"]["to_inpaint"], parts["generate"]["last_image"], tabs)
    return blocks
