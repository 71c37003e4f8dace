"""Each tab builds on its own: a missing package empties only the tab that needs it."""

from __future__ import annotations

import sys

import pytest


def _blocks_by_id(blocks):
    return {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}


def _without_simpleitk(monkeypatch):
    """As on a webui started with --skip-install that lacks SimpleITK: importing it fails."""
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    for name in list(sys.modules):  # modules that imported SimpleITK must import it again
        if name.startswith("medical_diffusion.datasets") or name == "medical_diffusion.ui.tab_prepare":
            monkeypatch.delitem(sys.modules, name)


def _context(tmp_path, in_webui):
    from medical_diffusion.ui.context import UIContext

    def no_model():
        raise AssertionError("the model was asked for while building the tabs")

    return UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                     cache_backend=False, loaded_text_width=lambda: None,
                     send_to_txt2img=(lambda button, box: None) if in_webui else None)


@pytest.mark.parametrize("in_webui", [False, True])
def test_missing_simpleitk_leaves_every_tab_working(monkeypatch, tmp_path, in_webui):
    """Prepare imports its imaging packages only when a job runs: without SimpleITK it still builds,
    says what is missing with the pip command, and every other tab builds."""
    from medical_diffusion.ui.app import build_blocks

    _without_simpleitk(monkeypatch)
    with pytest.raises(ImportError):
        import medical_diffusion.datasets.picai  # noqa: F401  (the situation the tabs must survive)

    by_id = _blocks_by_id(build_blocks(_context(tmp_path, in_webui)))
    note = by_id["md_prep_missing"].value
    assert "SimpleITK" in note and "pip install SimpleITK" in note
    assert "md_prep_out" in by_id  # the tab's own widgets are there (PCam/CheXpert need no SimpleITK)
    assert "md_gen_healthy" in by_id and "md_tab_train" in by_id and "md_tab_embeddings" in by_id
    assert not any(k and k.startswith("md_missing_") for k in by_id)


@pytest.mark.parametrize("in_webui", [False, True])
def test_a_tab_whose_package_is_missing_empties_only_that_tab(monkeypatch, tmp_path, in_webui):
    import importlib

    from medical_diffusion.ui import app

    tab_prepare = importlib.import_module("medical_diffusion.ui.tab_prepare")  # as app imports it

    def build_needing_simpleitk(ctx):
        import gradio as gr

        gr.Textbox(label="made before the failed import", elem_id="md_prep_out")
        raise ModuleNotFoundError("No module named 'SimpleITK'", name="SimpleITK")

    monkeypatch.setattr(tab_prepare, "build", build_needing_simpleitk)
    blocks = app.build_blocks(_context(tmp_path, in_webui))
    by_id = _blocks_by_id(blocks)
    message = by_id["md_missing_prepare"].value
    assert "Prepare data is unavailable" in message and "SimpleITK is not installed" in message
    assert "pip install SimpleITK" in message
    assert ("--skip-install" in message) == in_webui
    # the other tabs are there and work
    assert "md_gen_healthy" in by_id and "md_tab_train" in by_id and "md_tab_embeddings" in by_id
    assert not any(k and k.startswith("md_missing_") and k != "md_missing_prepare" for k in by_id)
    # the prepare tab's partial widgets (made before the failed import) are hidden
    assert not _visible_path(blocks, by_id["md_prep_out"])


def _visible_path(blocks, block) -> bool:
    """False when the block or a column above it is hidden."""
    parents = {id(child): parent for parent in blocks.blocks.values()
               for child in getattr(parent, "children", [])}
    node = block
    while node is not None:
        if getattr(node, "visible", True) is False:
            return False
        node = parents.get(id(node))
    return True


def test_missing_package_message_for_other_import_errors():
    from medical_diffusion.ui.missing_package import missing_package_message

    exc = ModuleNotFoundError("No module named 'skimage.filters'", name="skimage.filters")
    assert "run `pip install scikit-image` in this Python" in missing_package_message("X", exc, in_webui=False)
    exc = ImportError("cannot import name 'foo' from 'h5py'", name="h5py")
    assert missing_package_message("X", exc, in_webui=True) == (
        "**X is unavailable:** cannot import name 'foo' from 'h5py'")
