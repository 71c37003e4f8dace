"""Inspect and compare say which model family an embedding fits (SD1, SD2, SDXL, unknown width):
the analysis, ``meddiff embedding inspect/compare`` and the Embeddings tab."""

from __future__ import annotations

import json

import gradio as gr
import pytest
import torch

from medical_diffusion.cli import main
from medical_diffusion.embeddings import Embedding, save_embedding
from medical_diffusion.embeddings.inspection import compare_report, fits, format_report, inspect_embedding
from medical_diffusion.errors import MedDiffError

FITS = {
    "sd1": "SD 1.x (CLIP ViT-L, 768)",
    "sd2": "SD 2.x (OpenCLIP ViT-H, 1024)",
    "sdxl": "SDXL (clip_l 768 + clip_g 1280)",
    "tiny": "unknown width 32 (a custom or tiny model)",
}


def _make(name: str, seed: int = 0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    if name == "sdxl":
        return Embedding(name, torch.randn(2, 768, generator=g), extra={"clip_g": torch.randn(2, 1280, generator=g)})
    return Embedding(name, torch.randn(2, {"sd1": 768, "sd2": 1024, "tiny": 32}[name], generator=g))


@pytest.fixture
def files(tmp_path):
    out = {}
    for name in FITS:
        fmt, suffix = ("safetensors", ".safetensors") if name == "sdxl" else ("a1111", ".pt")
        out[name] = save_embedding(_make(name), tmp_path / f"{name}{suffix}", fmt=fmt)
    return out


@pytest.mark.parametrize("name", list(FITS))
def test_fits_names_the_family(name):
    assert fits(_make(name)) == FITS[name]


@pytest.mark.parametrize("name", list(FITS))
def test_inspect_text_and_json_say_what_the_embedding_fits(files, capsys, name):
    expected_width = ["--expected-width", "32"] if name == "tiny" else []
    assert main(["embedding", "inspect", "--json", str(files[name]), *expected_width]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] == FITS[name]
    assert main(["embedding", "inspect", str(files[name]), *expected_width]) == 0
    assert f"fits        {FITS[name]}" in capsys.readouterr().out


@pytest.mark.parametrize("a, b", [("sd1", "sd2"), ("sd2", "sdxl"), ("sd1", "sdxl"), ("tiny", "sd1")])
def test_compare_across_families_explains_instead_of_a_shape_error(a, b):
    with pytest.raises(MedDiffError) as err:
        compare_report(_make(a), _make(b))
    text = str(err.value)
    assert FITS[a] in text and FITS[b] in text and "cannot be compared vector by vector" in text


@pytest.mark.parametrize("name", list(FITS))
def test_compare_within_a_family_reports_what_both_fit(name):
    result = compare_report(_make(name, 1), _make(name, 2))
    assert result["fits_a"] == result["fits_b"] == FITS[name]
    assert set(result["parts"]) == ({"clip_l", "clip_g"} if name == "sdxl" else {"vectors"})


def test_cli_compare_different_families_says_why(files, capsys):
    assert main(["embedding", "compare", str(files["sd2"]), str(files["sdxl"])]) == 1
    err = capsys.readouterr().err
    assert "SD 2.x (OpenCLIP ViT-H, 1024)" in err and "SDXL (clip_l 768 + clip_g 1280)" in err
    assert "1024 vs 768+1280" in err


def test_cli_compare_same_family_prints_the_family(files, tmp_path, capsys):
    other = save_embedding(_make("sdxl", 5), tmp_path / "other.safetensors", fmt="safetensors")
    assert main(["embedding", "compare", str(files["sdxl"]), str(other)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits: A SDXL (clip_l 768 + clip_g 1280), B SDXL (clip_l 768 + clip_g 1280)")
    assert main(["embedding", "compare", "--json", str(files["sdxl"]), str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["fits_b"] == FITS["sdxl"]


def test_format_report_keeps_the_family_code_and_adds_fits(files):
    report = inspect_embedding(files["sd1"])
    assert report["family"] == "SD1" and "fits        SD 1.x (CLIP ViT-L, 768)" in format_report(report)


class _SdxlModel:
    """An SDXL backend as the tab sees it: two blocks with their own token scales."""

    text_widths = {"clip_l": 768, "clip_g": 1280}
    text_width = 2048

    def token_embedding_norm(self) -> float:
        return 1.0

    def block_token_norms(self) -> dict[str, float]:
        return {"clip_l": 0.4, "clip_g": 0.7}


def _tab(tmp_path, files, width):
    from medical_diffusion.ui import tab_embeddings
    from medical_diffusion.ui.context import UIContext

    ctx = UIContext(backend_factory=_SdxlModel, work_dir=tmp_path, embeddings_dir=tmp_path,
                    loaded_text_width=lambda: width)
    with gr.Blocks():
        return tab_embeddings.build(ctx)


def test_tab_inspect_shows_fits_and_uses_per_block_scales_for_sdxl(tmp_path, files):
    text, report, _status = _tab(tmp_path, files, 2048)["inspect"](None, "sdxl.safetensors")
    assert report["fits"] == FITS["sdxl"] and f"fits        {FITS['sdxl']}" in text
    assert report["token_scale"] == {"clip_l": 0.4, "clip_g": 0.7}


def test_tab_compare_of_different_families_shows_why(tmp_path, files):
    *_, text = _tab(tmp_path, files, None)["compare"](None, "sd1.pt", None, "sdxl.safetensors")  # the status line
    text = text.replace("\\_", "_")  # Markdown-escaped there
    assert "cannot be compared vector by vector" in text and FITS["sd1"] in text and FITS["sdxl"] in text
    text, report, _status = _tab(tmp_path, files, None)["compare"](None, "sd2.pt", None, "sd2.pt")
    assert text.startswith(f"fits: A {FITS['sd2']}") and report["fits_a"] == FITS["sd2"]


def test_a_tiny_sdxl_pair_is_not_called_sdxl_and_inspect_takes_the_tiny_model(tmp_path, capsys):
    """A pair at tiny widths fits "an SDXL-shaped model", not SDXL; without a width the report says how to
    give one; ``--model tiny-sdxl`` gives per-block token scales from one model load."""
    pytest.importorskip("diffusers")  # the tiny model of the standalone backend
    from medical_diffusion.backend.diffusers_backend import load_backend

    backend = load_backend("tiny-sdxl")
    widths = backend.text_widths
    pair = Embedding("pair", torch.ones(2, widths["clip_l"]), extra={"clip_g": torch.ones(2, widths["clip_g"])})
    assert fits(pair).startswith("an SDXL-shaped model with clip_l 32 + clip_g 48")
    path = save_embedding(pair, tmp_path / "pair.safetensors", fmt="safetensors")
    assert main(["embedding", "inspect", str(path), "--json"]) == 0  # reported, its family unknown
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "unknown (clip_l 32 + clip_g 48)"
    assert "(80 in all)" in report["notes"][0] and "--expected-width N or --model" in report["notes"][0]
    norms = backend.block_token_norms()
    assert set(norms) == {"clip_l", "clip_g"} and all(v > 0 for v in norms.values())
    for part, table in zip(widths, backend.token_embeddings):
        assert norms[part] == pytest.approx(float(table.weight.float().norm(dim=1).mean()), rel=1e-5)
    assert main(["embedding", "inspect", str(path), "--model", "tiny-sdxl", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    report = report[0] if isinstance(report, list) else report
    assert "SDXL-shaped" in report["fits"]
    assert report["token_scale"] == pytest.approx(norms)
