"""Issue 19 review: a published embedding is the file its name loads; the TI hashes name the file the
loader used; one duration format; one on-disk prompt-name check."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from medical_diffusion.embeddings import Embedding, load_embeddings_dir, save_embedding
from medical_diffusion.embeddings.readers import embedding_file, embedding_paths_on_disk
from medical_diffusion.errors import MedDiffError


def _vectors(seed: int) -> torch.Tensor:
    return torch.randn(2, 768, generator=torch.Generator().manual_seed(seed))


def _run(tmp_path, name="cxr", seed=1):
    run = tmp_path / "run"
    save_embedding(Embedding(name, _vectors(seed)), run / f"{name}.pt")
    return run


@pytest.mark.parametrize("other", ["archive/cxr.pt", "CXR.pt", "old/CXR.safetensors"])
def test_publish_refuses_when_another_file_of_that_name_would_load(tmp_path, other):
    from medical_diffusion.training.publish import check_publishable, publish_embedding

    run, home = _run(tmp_path), tmp_path / "home"
    suffix = other.rsplit(".", 1)[1]
    made = save_embedding(Embedding("cxr", _vectors(2)), tmp_path / f"cxr.{suffix}", fmt="a1111" if suffix == "pt" else suffix)
    (home / other).parent.mkdir(parents=True, exist_ok=True)
    made.rename(home / other)  # a case variant is written by hand (the writer wants lowercase names)
    for force in (False, True):  # forcing replaces HOME/cxr.*, never a file elsewhere: still refused
        with pytest.raises(MedDiffError, match="another embedding file named 'cxr'") as err:
            check_publishable(home, "cxr", run, force=force)
        assert str(home / other) in str(err.value) and "rename it or move it out" in str(err.value)
        with pytest.raises(MedDiffError, match="another embedding file named 'cxr'"):
            publish_embedding(run / "cxr.pt", home, "cxr", run, force=force)
    assert not (home / "cxr.pt").exists()
    (home / other).rename(tmp_path / "moved.pt")  # the fix the message gives
    target = publish_embedding(run / "cxr.pt", home, "cxr", run)
    assert embedding_file("cxr", home) == target == home / "cxr.pt"
    assert torch.equal(load_embeddings_dir(home)["cxr"].vectors, _vectors(1))


def test_publish_checks_after_writing_that_the_name_loads_the_published_file(tmp_path, monkeypatch):
    from medical_diffusion.training import publish

    run, home = _run(tmp_path), tmp_path / "home"
    monkeypatch.setattr(publish, "_check_no_other_file", lambda home, name: None)  # a file slipped in meanwhile
    save_embedding(Embedding("cxr", _vectors(2)), home / "a" / "cxr.pt")
    with pytest.raises(MedDiffError, match=r"published, but the name 'cxr' loads .*a/cxr\.pt"):
        publish.publish_embedding(run / "cxr.pt", home, "cxr", run)


def test_paths_on_disk_name_the_file_the_folder_loader_uses(tmp_path):
    """A1111 files win a clash in the loader; the recorded file (TI hashes) is that one, not the first by path."""
    from medical_diffusion.generation.outputs import embedding_hashes

    (tmp_path / "a").mkdir()
    save_file({"<cxr>": _vectors(2)}, str(tmp_path / "a" / "cxr.safetensors"))  # diffusers: sorted first
    save_embedding(Embedding("cxr", _vectors(1)), tmp_path / "b" / "cxr.pt")  # A1111: the loader's choice
    assert torch.equal(load_embeddings_dir(tmp_path)["cxr"].vectors, _vectors(1))
    assert embedding_paths_on_disk(tmp_path)["cxr"] == tmp_path / "b" / "cxr.pt"
    assert embedding_file("CXR", tmp_path) == tmp_path / "b" / "cxr.pt"
    assert embedding_hashes(tmp_path, ["a cxr scan"])["cxr"]["file"] == str(tmp_path / "b" / "cxr.pt")


def test_a_named_file_overrides_the_folder_as_the_table_loader_does(tmp_path):
    save_embedding(Embedding("cxr", _vectors(1)), tmp_path / "home" / "cxr.pt")
    single = save_embedding(Embedding("cxr", _vectors(2)), tmp_path / "mine" / "cxr.pt")
    assert embedding_paths_on_disk(tmp_path / "home", [single])["cxr"] == single


def test_one_on_disk_prompt_name_check_serves_the_command_and_the_api(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from medical_diffusion.cli import generate as cli_generate
    from medical_diffusion.generation import loading
    from medical_diffusion.generation.prompts import UnknownEmbeddingError
    from medical_diffusion.ui import api_routes

    save_embedding(Embedding("cxr", _vectors(1)), tmp_path / "home" / "sub" / "cxr.pt")
    single = save_embedding(Embedding("knee", _vectors(2)), tmp_path / "knee.pt")
    loading.check_prompt_names(["a CXR scan", "knee AND cxr", ""], tmp_path / "home", [single], where="here")
    with pytest.raises(UnknownEmbeddingError, match="here") as err:
        loading.check_prompt_names(["a cxrr scan"], tmp_path / "home", where="here")
    assert err.value.parts == ["a cxrr scan"]
    loading.check_prompt_names(["a cxrr scan"], tmp_path / "home", where="here", allow_plain=True)
    loading.check_prompt_names(["cxr"], tmp_path / "missing", where="here", allow_plain=True)

    calls = []
    monkeypatch.setattr(loading, "check_prompt_names", lambda *a, **k: calls.append((a, k)))
    args = SimpleNamespace(embeddings_dir=str(tmp_path / "home"), embedding=[str(single)], embeddings_where="w",
                           allow_plain_prompt=False)
    cli_generate.check_prompt_names(args, ["cxr"])
    api_routes.check_prompt_names(SimpleNamespace(embeddings_dir=tmp_path / "home"), ["cxr"], True)
    assert [a[0] for a, _ in calls] == [["cxr"], ["cxr"]]
    assert calls[0][1]["where"] == "w" and calls[1][1]["allow_plain"] is True
    assert calls[1][1]["plain_hint"] == api_routes.PLAIN_HINT


def test_one_duration_format_for_etas_estimates_and_training():
    from medical_diffusion.experiment import estimates, views
    from medical_diffusion.training.progress import format_duration
    from medical_diffusion.ui import stopping

    assert [format_duration(s) for s in (0, 43.4, 980, 59213, 90061)] == \
        ["0 s", "43 s", "0:16:20", "16:26:53", "1 d 1 h 01 min"]
    now = [0.0]
    clock = stopping.StepClock("steps", clock=lambda: now[0])
    clock.text(1, 100)
    now[0] = 10.0  # 10 s a step, 98 steps left
    assert clock.text(2, 100) == "2/100 steps, about 0:16:20 left"
    now[0] = 10.0 + 10 * 95  # 97 done, 3 left
    assert clock.text(97, 100).endswith("about 30 s left")
    assert views.format_duration is format_duration
    assert not hasattr(estimates, "format_seconds") and not hasattr(stopping, "format_seconds")


def test_image_fit_keeps_only_what_is_used():
    """``fit_square`` had no caller (the importers fit through ``SliceGeometry``); the used helpers remain."""
    import numpy as np

    from medical_diffusion.datasets import image_fit

    assert not hasattr(image_fit, "fit_square")
    image = np.zeros((8, 4), np.uint8)
    image[2:6, 1:3] = 200
    assert image_fit.crop_to_nonzero(image).shape == (4, 2)
    assert image_fit.fit_longest_edge_and_pad(image, 16).shape == (16, 16)


def test_names_used_finds_whole_word_names_with_one_pattern():
    from medical_diffusion.generation.outputs import names_in
    from medical_diffusion.generation.prompts import names_used

    prompts = ["a CXR scan, knee-2 AND cxr_old", None, "hipster"]
    names = ["cxr", "knee", "knee-2", "cxr_old", "hip"]
    assert names_used(prompts, names) == ["cxr", "cxr_old", "knee-2"] == names_in(prompts, names)
    assert names_used(["anything"], []) == [] and names_used(["a cxr"], {"cxr": "file"}) == ["cxr"]
