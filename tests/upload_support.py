"""What a tab's ``gr.File`` handler gets for a file the page uploaded (gradio 3.41): the file stored as the
``/upload`` route stores it (a random folder under gradio's temp folder), then through ``File.preprocess``."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path


def gradio_upload(*paths, file_count: str = "single"):
    """The preprocessed value of a ``gr.File`` (``file_count`` as the component's) for ``paths`` uploaded
    through the page; gradio's temp folder is ``GRADIO_TEMP_DIR`` when set."""
    import gradio as gr

    component = gr.File(file_count=file_count)
    payload = []
    for path in paths:
        stored = Path(component.DEFAULT_TEMP_DIR) / secrets.token_hex(20) / Path(path).name
        stored.parent.mkdir(parents=True)
        shutil.copyfile(path, stored)
        payload.append({"name": str(stored), "orig_name": Path(path).name, "is_file": True, "data": None})
    return component.preprocess(payload if file_count != "single" else payload[0])
