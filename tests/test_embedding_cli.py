"""``meddiff embedding inspect|compare|convert|blend`` and the analysis behind them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from medical_diffusion.cli import main
from medical_diffusion.embeddings import Embedding, load_embedding, save_embedding
from medical_diffusion.embeddings.blend import blend_embeddings, slerp
from medical_diffusion.embeddings.inspection import human_size, inspect_embedding, token_embedding_scale
from medical_diffusion.embeddings.similarity import compare_embeddings
from medical_diffusion.errors import MedDiffError


def _emb(name: str, n: int = 4, width: int = 1024, seed: int = 0, scale: float = 0.4, **kw) -> Embedding:
    return Embedding(name, torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * scale, **kw)


@pytest.fixture
def files(tmp_path):
    a = save_embedding(_emb("a", 64, seed=1, step=50000, sd_checkpoint="ad2a33c361", sd_checkpoint_name="v2-1_512"), tmp_path / "healthy.pt")
    b = save_embedding(_emb("b", 64, seed=2), tmp_path / "tumour.pt")
    short = save_embedding(_emb("s", 8, seed=3), tmp_path / "short.safetensors", fmt="safetensors")
    return a, b, short


# -- inspect ------------------------------------------------------------------------------
def test_inspect_json_reports_shape_family_metadata_size_and_norms(files, capsys):
    a, _, _ = files
    assert main(["embedding", "inspect", str(a), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    vec = load_embedding(a).vectors
    assert (report["name"], report["vectors"], report["width"], report["family"]) == ("healthy", 64, 1024, "SD2")
    assert (report["step"], report["sd_checkpoint"], report["sd_checkpoint_name"]) == (50000, "ad2a33c361", "v2-1_512")
    assert report["format"] == "A1111 .pt"
    assert report["file_size_bytes"] == a.stat().st_size and report["file_size"].endswith("(< 1 MB)")
    norms = vec.norm(dim=1)
    assert math.isclose(report["norms"]["vectors"]["mean"], float(norms.mean()), rel_tol=1e-5)
    assert math.isclose(report["norms"]["vectors"]["max"], float(norms.max()), rel_tol=1e-5)
    assert len(report["norms"]["vectors"]["per_vector"]) == 64
    assert report["warnings"] == [] and "skipped" in report["notes"][0]


def test_inspect_text_and_norm_warning_against_given_scale(files, capsys):
    a, _, _ = files
    mean = float(load_embedding(a).vectors.norm(dim=1).mean())
    assert main(["embedding", "inspect", str(a), "--token-norm", str(mean)]) == 0
    out = capsys.readouterr().out
    assert "64 x 1024  (SD2)" in out and "WARNING" not in out and "step        50000" in out
    assert main(["embedding", "inspect", str(a), "--token-norm", str(mean / 10)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: mean vector norm" in out and "10x the model's token scale" in out


def test_token_scale_read_from_model_files(tmp_path, files):
    a, _, _ = files
    rows = torch.randn(50, 1024, generator=torch.Generator().manual_seed(9))
    expected = float(rows.norm(dim=1).mean())
    ckpt = tmp_path / "sd2.safetensors"  # ldm layout, as in v2-1_512-ema-pruned.safetensors
    save_file({"cond_stage_model.model.token_embedding.weight": rows, "other.weight": torch.zeros(2)}, str(ckpt))
    assert math.isclose(token_embedding_scale(ckpt, 1024), expected, rel_tol=1e-6)
    folder = tmp_path / "diffusers_model" / "text_encoder"  # diffusers layout
    folder.mkdir(parents=True)
    save_file({"text_model.embeddings.token_embedding.weight": rows}, str(folder / "model.safetensors"))
    assert math.isclose(token_embedding_scale(folder.parent, 1024), expected, rel_tol=1e-6)
    with pytest.raises(MedDiffError, match="do not match the embedding's width 768"):
        token_embedding_scale(ckpt, 768)
    report = inspect_embedding(a, token_scale=expected)
    ratio = report["norms"]["vectors"]["mean"] / expected  # ~12.8 / ~32
    assert report["token_scale"] == expected and 1 / 3 < ratio < 1 and report["warnings"] == []
    assert len(inspect_embedding(a, token_scale=expected, tolerance=2.0)["warnings"]) == 1


def test_inspect_with_model_option(tmp_path, capsys):
    rows = torch.randn(50, 1024, generator=torch.Generator().manual_seed(9))
    ckpt = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": rows}, str(ckpt))
    scale = float(rows.norm(dim=1).mean())
    far = save_embedding(Embedding("far", torch.ones(2, 1024) * scale), tmp_path / "far.pt")  # norm 32x scale
    near = save_embedding(Embedding("near", rows[:3].clone()), tmp_path / "near.pt")
    assert main(["embedding", "inspect", str(far), "--model", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isclose(report["token_scale"], scale, rel_tol=1e-6) and len(report["warnings"]) == 1
    assert main(["embedding", "inspect", str(near), "--model", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


def test_inspect_sdxl_and_zero_vectors(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.ones(2, 1280)}, str(path))
    report = inspect_embedding(path)
    assert report["family"] == "SDXL" and report["width"] == 2048 and set(report["norms"]) == {"clip_l", "clip_g"}
    assert any("clip_l: 2 vector(s) are all zeros" in w for w in report["warnings"])


def test_inspect_batch_collects_failures_and_goes_on(files, tmp_path, capsys):
    a, b, _ = files
    bad = tmp_path / "bad.pt"
    torch.save({"string_to_param": {"*": torch.full((2, 768), float("nan"))}}, bad)
    assert main(["embedding", "inspect", str(a), str(bad), str(b), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["name"] for r in out["reports"]] == ["healthy", "tumour"]
    assert len(out["errors"]) == 1 and "bad.pt" in out["errors"][0] and "NaN" in out["errors"][0]
    assert "bad.pt" in captured.err
    assert main(["embedding", "inspect", str(bad)]) == 1
    assert "bad.pt: embedding contains 1536 NaN/inf value(s)" in capsys.readouterr().err


def test_human_size():
    assert human_size(266_000) == "259.8 KB (< 1 MB)"
    assert human_size(3 * 1024 * 1024) == "3.0 MB"
    assert human_size(12) == "12 B (< 1 MB)"


# -- compare ------------------------------------------------------------------------------
def test_compare_identical_scaled_and_opposite():
    a = _emb("a", 3)
    res = compare_embeddings(a, Embedding("b", a.vectors * 2))["parts"]["vectors"]
    assert all(math.isclose(c, 1.0, abs_tol=1e-5) for c in res["per_vector_cosine"])
    assert math.isclose(res["norm_ratio"], 2.0, rel_tol=1e-5) and math.isclose(res["mean_cosine"], 1.0, abs_tol=1e-5)
    res = compare_embeddings(a, Embedding("c", -a.vectors))["parts"]["vectors"]
    assert math.isclose(res["mean_cosine"], -1.0, abs_tol=1e-5)


def test_compare_cli_handles_different_vector_counts(files, capsys):
    a, _, short = files
    assert main(["embedding", "compare", str(a), str(short), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["vectors_a"], res["vectors_b"]) == (64, 8)
    assert len(res["parts"]["vectors"]["per_vector_cosine"]) == 8
    assert "vector counts differ" in res["notes"][0]
    va, vb = load_embedding(a).vectors, load_embedding(short).vectors
    expected = torch.nn.functional.cosine_similarity(va[:8], vb, dim=1).mean()
    assert math.isclose(res["parts"]["vectors"]["mean_cosine"], float(expected), abs_tol=1e-5)
    assert main(["embedding", "compare", str(a), str(short)]) == 0
    assert "vector counts differ" in capsys.readouterr().out


def test_compare_refuses_different_models(tmp_path, capsys):
    sd1 = save_embedding(_emb("x", 2, 768), tmp_path / "sd1.pt")
    sd2 = save_embedding(_emb("y", 2, 1024), tmp_path / "sd2.pt")
    assert main(["embedding", "compare", str(sd1), str(sd2)]) == 1
    assert "different models" in capsys.readouterr().err


# -- blend --------------------------------------------------------------------------------
def test_linear_blend_and_endpoints():
    a, b = _emb("a", 3, seed=1), _emb("b", 3, seed=2)
    mid = blend_embeddings(a, b, 0.25, "linear", "mid")
    assert torch.allclose(mid.vectors, 0.75 * a.vectors + 0.25 * b.vectors)
    for mode in ("linear", "slerp"):
        assert torch.allclose(blend_embeddings(a, b, 0.0, mode, "x").vectors, a.vectors, atol=1e-5)
        assert torch.allclose(blend_embeddings(a, b, 1.0, mode, "x").vectors, b.vectors, atol=1e-5)


def test_slerp_follows_the_arc_and_keeps_norms():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 4.0], [2.0, 0.0]])  # last row parallel: linear fallback
    out = slerp(a, b, 0.5)
    s = math.sqrt(0.5)
    assert torch.allclose(out[0], torch.tensor([s, s]), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([3 * s, 3 * s]), atol=1e-6)  # norm 3 = mean of 2 and 4
    assert torch.allclose(out[2], torch.tensor([1.5, 0.0]))
    # random high-dimensional vectors: linear blending shrinks norms, slerp does not
    x, y = _emb("x", 4, seed=1), _emb("y", 4, seed=2)
    lin = blend_embeddings(x, y, 0.5, "linear", "l").vectors.norm(dim=1)
    sph = blend_embeddings(x, y, 0.5, "slerp", "s").vectors.norm(dim=1)
    target = 0.5 * (x.vectors.norm(dim=1) + y.vectors.norm(dim=1))
    assert torch.allclose(sph, target, rtol=1e-4) and (lin < 0.8 * target).all()


def test_blend_cli_writes_new_embedding(files, tmp_path, capsys):
    a, b, _ = files
    assert main(["embedding", "blend", str(a), str(b), "--weight", "0.3", "--mode", "slerp", "--name", "progression-30"]) == 0
    out_path = a.parent / "progression-30.pt"
    assert "wrote" in capsys.readouterr().out
    mixed = load_embedding(out_path)
    expected = slerp(load_embedding(a).vectors, load_embedding(b).vectors, 0.3)
    assert mixed.name == "progression-30" and torch.allclose(mixed.vectors, expected, atol=1e-6)
    # refuses to overwrite, then overwrites with --force
    assert main(["embedding", "blend", str(a), str(b), "--weight", "0.5", "--name", "progression-30"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert torch.allclose(load_embedding(out_path).vectors, expected, atol=1e-6)
    assert main(["embedding", "blend", str(a), str(b), "--weight", "0.5", "--name", "progression-30", "--force"]) == 0
    assert not torch.allclose(load_embedding(out_path).vectors, expected, atol=1e-6)
    out_st = tmp_path / "x" / "mix.safetensors"
    assert main(["embedding", "blend", str(a), str(b), "--weight", "0.5", "--name", "mix", "-o", str(out_st), "--to", "safetensors"]) == 0
    assert load_embedding(out_st).name == "mix"


@pytest.mark.parametrize("other, argv_tail, problem", [
    (2, ["--weight", "0.5", "--name", "m"], "cannot blend 'healthy' (64 vectors) with 'short' (8 vectors)"),
    (1, ["--weight", "1.5", "--name", "m"], "weight 1.5 must lie in [0, 1]"),
    (1, ["--weight", "0.5", "--name", "Mixed"], "must be lowercase"),
    (1, ["--weight", "0.5", "--name", "m", "-o", "other.pt"], "file stem differs from --name"),
])
def test_blend_cli_errors(files, capsys, other, argv_tail, problem):
    a, b = files[0], files[other]
    assert main(["embedding", "blend", str(a), str(b), *argv_tail]) == 1
    assert problem in capsys.readouterr().err
    assert sorted(p.name for p in a.parent.iterdir()) == ["healthy.pt", "short.safetensors", "tumour.pt"]


# -- convert ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, out_name", [("a1111", "out.pt"), ("safetensors", "out.safetensors"), ("diffusers", "out_folder")])
def test_convert_round_trips_every_writer(files, tmp_path, capsys, fmt, out_name):
    a, _, _ = files
    out = tmp_path / "converted" / out_name
    assert main(["embedding", "convert", str(a), str(out), "--to", fmt]) == 0
    back = load_embedding(out)
    assert torch.equal(back.vectors, load_embedding(a).vectors)
    assert back.name == ("learned_embeds" if fmt == "diffusers" else "out")  # the webui names files by stem
    if fmt != "diffusers":
        assert back.step == 50000
    assert main(["embedding", "convert", str(a), str(out), "--to", fmt]) == 1
    assert "already exists (use --force" in capsys.readouterr().err
    assert main(["embedding", "convert", str(a), str(out), "--to", fmt, "--force"]) == 0


def test_convert_bad_input_names_file(tmp_path, capsys):
    bad = tmp_path / "nan.pt"
    torch.save({"string_to_param": {"*": torch.tensor([[float("nan")] * 1024])}}, bad)
    assert main(["embedding", "convert", str(bad), str(tmp_path / "o.pt"), "--to", "a1111"]) == 1
    err = capsys.readouterr().err
    assert "nan.pt" in err and "NaN" in err and not (tmp_path / "o.pt").exists()
    two = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 1024), "x": torch.zeros(1, 1024)}}, two)
    assert main(["embedding", "convert", str(two), str(tmp_path / "o.pt"), "--to", "a1111"]) == 1
    assert "two.pt: 'string_to_param' holds 2 params" in capsys.readouterr().err
    assert main(["embedding", "convert", str(tmp_path / "gone.pt"), str(tmp_path / "o.pt"), "--to", "a1111"]) == 1
    assert "gone.pt: no such file" in capsys.readouterr().err


def test_custom_width_through_cli(tmp_path, capsys):
    """A tiny model's embedding is reported, its family unknown, with the flags that name the model
    (not a Python argument); a width given that the file does not fit is a warning of the report."""
    tiny = save_embedding(Embedding("t", torch.randn(2, 32)), tmp_path / "tiny.pt")
    assert main(["embedding", "inspect", str(tiny), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "unknown (width 32)" and report["fits"] == "unknown width 32 (a custom or tiny model)"
    assert "give --expected-width N or --model" in report["notes"][0] and "expected_width" not in report["notes"][0]
    assert main(["embedding", "inspect", str(tiny), "--expected-width", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "unknown (width 32)" and report["warnings"] == [] and len(report["notes"]) == 1
    assert main(["embedding", "inspect", str(tiny), "--expected-width", "1024"]) == 0
    assert "WARNING: does not fit the model: embedding width 32 does not match the model's token width 1024" in (
        capsys.readouterr().out)
    assert main(["embedding", "convert", str(tiny), str(tmp_path / "t.safetensors"), "--to", "safetensors"]) == 0
    assert "2 x 32; fits unknown width 32 (a custom or tiny model)" in capsys.readouterr().out
    assert main(["embedding", "convert", str(tiny), str(tmp_path / "u.pt"), "--to", "a1111",
                 "--expected-width", "768"]) == 1
    assert "does not match the model's token width 768" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_model_tiny_uses_the_backend_token_scale(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from medical_diffusion.backend.diffusers_backend import load_backend

    backend = load_backend("tiny")
    scale = backend.token_embedding_norm()
    rows = backend.text_to_vectors("prostate").detach()  # real token rows: on the token scale
    path = save_embedding(Embedding("tinyemb", rows), tmp_path / "tinyemb.pt")
    assert main(["embedding", "inspect", str(path), "--model", "tiny", "--expected-width", str(backend.text_width), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isclose(report["token_scale"], scale, rel_tol=1e-5) and report["warnings"] == []
    # --model tiny alone knows the tiny model's width
    assert main(["embedding", "inspect", str(path), "--model", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == backend.text_width
