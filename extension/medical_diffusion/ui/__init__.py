"""The Medical Diffusion tabs, defined once with gradio Blocks.

Used by the webui (``medical_diffusion.webui.tabs`` through ``on_ui_tabs``) and by the
standalone app (``meddiff ui``). Tabs only translate widgets to calls into the core;
everything they do has a CLI twin.
"""
