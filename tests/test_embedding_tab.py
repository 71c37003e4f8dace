"""Embeddings tab handlers, called directly (no browser)."""

from __future__ import annotations

import types

import gradio as gr
import torch

from medical_diffusion.embeddings import Embedding, save_embedding


class _Model:
    """What the tab asks of a model: its text width and token-vector scale."""

    text_width = 8

    def token_embedding_norm(self) -> float:
        return 2.5


def _tab(tmp_path, width=8):
    from medical_diffusion.ui import tab_embeddings
    from medical_diffusion.ui.context import UIContext

    for seed, name in enumerate(["healthy", "tumour"]):
        vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(seed))
        save_embedding(Embedding(name, vectors), tmp_path / "emb" / f"{name}.pt")
    ctx = UIContext(backend_factory=_Model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    loaded_text_width=lambda: _Model.text_width)
    with gr.Blocks():
        return tab_embeddings.build(ctx)


def test_inspect_compares_with_the_loaded_models_token_scale(tmp_path):
    text, report, _status = _tab(tmp_path)["inspect"](None, "healthy.pt")
    assert report["token_scale"] == 2.5 and "token scale 2.5" in text
    assert "--model" not in text and "notes" not in report


def test_blend_shows_the_blended_file_in_both_reports(tmp_path):
    parts = _tab(tmp_path)
    parts["inspect"](None, "healthy.pt")  # something inspected before
    text, report, *_ = parts["blend"](None, "healthy.pt", None, "tumour.pt", 0.5, "linear", "mix")
    assert report["name"] == "mix" and report["file"] == str(tmp_path / "emb" / "mix.pt")
    assert text.startswith(str(tmp_path / "emb" / "mix.pt")) and report["token_scale"] == 2.5
    assert "--model" not in text


def test_inspect_without_a_loaded_model_says_so_in_ui_terms(tmp_path):
    from medical_diffusion.ui import tab_embeddings
    from medical_diffusion.ui.context import UIContext

    save_embedding(Embedding("sd2", torch.zeros(2, 1024) + 0.1), tmp_path / "emb" / "sd2.pt")

    def no_model():
        raise AssertionError("no model is loaded: the tab must not ask for one")

    ctx = UIContext(backend_factory=no_model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    loaded_text_width=lambda: None, cache_backend=False)
    with gr.Blocks():
        parts = tab_embeddings.build(ctx)
    text, report, _status = parts["inspect"](None, "sd2.pt")
    assert report["token_scale"] is None and "load a Stable Diffusion model" in text and "--model" not in text


def test_interpolation_result_has_no_label_over_the_grid_title(tmp_path):
    from medical_diffusion.ui.app import build_blocks
    from medical_diffusion.ui.context import UIContext

    ctx = UIContext(backend_factory=_Model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    loaded_text_width=lambda: None)
    blocks = build_blocks(ctx)
    result = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "md_gen_result")
    assert result.show_label is False
