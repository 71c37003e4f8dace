"""Shared by the tab handler tests: a UI context whose model must not be needed."""

from __future__ import annotations


def ui_context(tmp_path, backend_factory=None, **kwargs):
    """A :class:`UIContext` on ``tmp_path/work`` and ``tmp_path/emb`` for the tiny model; building a model
    fails the test unless ``backend_factory`` is given."""
    from medical_diffusion.ui.context import UIContext

    def no_model():
        raise AssertionError("no model needed")

    return UIContext(backend_factory=backend_factory or no_model, work_dir=tmp_path / "work",
                     embeddings_dir=tmp_path / "emb", loaded_text_width=lambda: None, model_id="tiny", **kwargs)


def count_unet_calls(monkeypatch) -> list:
    """Count the sampler's model calls (one per step, per batch): the returned list grows by one each call."""
    from medical_diffusion.generation import sampling

    calls = []
    real = sampling.run_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "run_model", counting)
    return calls
