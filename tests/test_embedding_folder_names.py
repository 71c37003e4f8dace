"""Embedding names in a folder follow the webui's rule (file stem); clashes resolve the same way
whatever order the folders are walked in, and are reported once."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from medical_diffusion.embeddings import Embedding, load_embeddings_dir, save_embedding


def _vectors(seed: int) -> torch.Tensor:
    return torch.randn(2, 1024, generator=torch.Generator().manual_seed(seed))


def test_diffusers_file_is_named_by_its_stem_like_the_webui(tmp_path):
    save_embedding(Embedding("prostate_neg", _vectors(1)), tmp_path / "prostate_neg.pt")
    (tmp_path / "copy").mkdir()  # a diffusers copy of the same embedding (token "prostate_neg")
    save_file({"prostate_neg": _vectors(2)}, str(tmp_path / "copy" / "learned_embeds.safetensors"))
    found = load_embeddings_dir(tmp_path)
    assert sorted(found) == ["learned_embeds", "prostate_neg"]
    assert torch.equal(found["prostate_neg"].vectors, _vectors(1))


@pytest.mark.parametrize("a1111_folder, other_folder", [("a", "b"), ("b", "a")])
def test_a1111_file_wins_a_clash_whatever_the_folder_order(tmp_path, caplog, a1111_folder, other_folder):
    from medical_diffusion.embeddings import readers

    readers._WARNED.clear()
    save_embedding(Embedding("prostate_neg", _vectors(1)), tmp_path / a1111_folder / "prostate_neg.pt")
    (tmp_path / other_folder).mkdir()
    save_file({"<prostate_neg>": _vectors(2)}, str(tmp_path / other_folder / "prostate_neg.safetensors"))
    with caplog.at_level(logging.WARNING):
        first = load_embeddings_dir(tmp_path)
        second = load_embeddings_dir(tmp_path)  # the tabs rescan often: one warning, not one per scan
    assert torch.equal(first["prostate_neg"].vectors, _vectors(1))
    assert torch.equal(second["prostate_neg"].vectors, _vectors(1))
    clashes = [r.getMessage() for r in caplog.records if "prostate_neg" in r.getMessage()]
    assert len(clashes) == 1, clashes
    assert f"using {tmp_path / a1111_folder / 'prostate_neg.pt'}" in clashes[0]
    assert f"skipping {tmp_path / other_folder / 'prostate_neg.safetensors'}" in clashes[0]
