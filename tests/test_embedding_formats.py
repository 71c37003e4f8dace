"""Embedding files: every format read and written, strict pickle loading, bad input."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from medical_diffusion.embeddings import Embedding, UnsafePickleError, load_embedding, load_embeddings_dir, save_embedding
from medical_diffusion.errors import InputFileError, MedDiffError


def _vectors(n: int = 3, width: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.4


def _a1111_dict(vec: torch.Tensor, name: str = "whatever") -> dict:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": name,
        "step": 1500,
        "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "v2-1_512-ema-pruned",
    }


# -- reading ------------------------------------------------------------------------------
def test_reads_a1111_pt_with_requires_grad_and_metadata(tmp_path):
    vec = _vectors(4).requires_grad_(True)
    path = tmp_path / "T2W-Healthy.pt"
    torch.save(_a1111_dict(vec), path)
    emb = load_embedding(path)
    assert emb.name == "t2w-healthy"  # lowercased file stem, as A1111 names embeddings
    assert emb.vectors.shape == (4, 1024) and emb.vectors.dtype == torch.float32
    assert not emb.vectors.requires_grad
    assert torch.equal(emb.vectors, vec.detach())
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (1500, "a1b2c3d4", "v2-1_512-ema-pruned")
    assert emb.family == "SD2"


def test_reads_a1111_pt_half_precision_parameter(tmp_path):
    vec = torch.nn.Parameter(_vectors(2, 768).half())
    path = tmp_path / "sd1.pt"
    torch.save(_a1111_dict(vec), path)
    emb = load_embedding(path)
    assert emb.vectors.dtype == torch.float32 and emb.family == "SD1"
    assert torch.allclose(emb.vectors, vec.detach().float())


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4),
                    reason="torch < 2.4 cannot allow-list ParameterDict for weights_only loading (refused safely)")
def test_reads_original_textual_inversion_parameterdict(tmp_path):
    # rinongal/textual_inversion saves string_to_param as an nn.ParameterDict and the token as a tensor
    vec = _vectors(2, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "old.pt")
    emb = load_embedding(tmp_path / "old.pt")
    assert torch.equal(emb.vectors, vec) and emb.step is None


def test_reads_single_key_safetensors(tmp_path):
    vec = _vectors(5)
    save_file({"emb_params": vec}, str(tmp_path / "civitai.safetensors"))
    emb = load_embedding(tmp_path / "civitai.safetensors")
    assert emb.name == "civitai" and torch.equal(emb.vectors, vec)


def test_reads_sdxl_pair_safetensors(tmp_path):
    clip_l, clip_g = _vectors(2, 768), _vectors(2, 1280, seed=1)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert emb.family == "SDXL" and emb.is_sdxl and emb.width == 768 + 1280 and emb.n_vectors == 2
    assert torch.equal(emb.vectors, clip_l) and torch.equal(emb.extra["clip_g"], clip_g)


@pytest.mark.parametrize("shape", [(1024,), (1, 1024), (6, 1024)])
def test_reads_diffusers_learned_embeds_safetensors_and_bin(tmp_path, shape):
    vec = torch.randn(*shape)
    save_file({"<Cat-Toy>": vec}, str(tmp_path / "learned_embeds.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save({"<Cat-Toy>": vec}, tmp_path / "bin" / "learned_embeds.bin")
    for path in (tmp_path / "learned_embeds.safetensors", tmp_path / "bin" / "learned_embeds.bin", tmp_path / "bin"):
        emb = load_embedding(path)
        assert emb.name == "learned_embeds"  # the file stem, as the webui names it (not the token)
        assert emb.vectors.shape == (shape[0] if len(shape) == 2 else 1, 1024)
        assert torch.equal(emb.vectors.flatten(), vec.flatten())


def test_reads_bare_tensor(tmp_path):
    vec = _vectors(3, 768)
    torch.save(vec, tmp_path / "bare.pt")
    emb = load_embedding(tmp_path / "bare.pt")
    assert emb.name == "bare" and torch.equal(emb.vectors, vec) and emb.step is None


# -- strict pickle loading ----------------------------------------------------------------
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = _a1111_dict(_vectors(1))
    payload["string_to_param"] = {"*": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError) as info:
        load_embedding(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message and "system" in message
    assert not marker.exists()


def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"string_to_param": {"*": torch.nn.Linear(2, 2)}}, path)
    with pytest.raises(UnsafePickleError, match="refused"):
        load_embedding(path)


# -- bad input ----------------------------------------------------------------------------
def test_truncated_files_name_file_and_problem(tmp_path):
    good = save_embedding(Embedding("x", _vectors()), tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputFileError, match=r"cut\.pt: .*truncated or corrupt"):
        load_embedding(cut)
    st = save_embedding(Embedding("x", _vectors()), tmp_path / "good.safetensors", fmt="safetensors")
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(InputFileError, match=r"cut\.safetensors: .*truncated or corrupt"):
        load_embedding(cut_st)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty file"):
        load_embedding(tmp_path / "empty.pt")


@pytest.mark.parametrize(
    "payload, problem",
    [
        ({"string_to_param": {"*": _vectors(), "**": _vectors()}}, "holds 2 params"),
        ({"weights": "nope", "other": 3}, "unexpected keys"),
        ({"a": _vectors(), "b": _vectors()}, "holds 2 tensors"),
        ({"string_to_param": {"*": torch.full((2, 1024), float("nan"))}}, "NaN/inf"),
        ({"string_to_param": {"*": torch.zeros(2, 512)}}, "width 512 matches no Stable Diffusion"),
        ({"string_to_param": {"*": torch.zeros(2, 3, 1024)}}, "expected \\(n_vectors, width\\)"),
        ({"clip_l": torch.zeros(2, 768)}, "lacks clip_g"),
        ({"string_to_param": {"*": torch.zeros(2, 1024, dtype=torch.long)}}, "expected floating point"),
        ([1, 2, 3], "holds a list"),
    ],
)
def test_bad_contents_name_file_and_problem(tmp_path, payload, problem):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(InputFileError, match=problem) as info:
        load_embedding(path)
    assert str(path) in str(info.value)


def test_safetensors_with_many_tensors_is_refused_without_reading_them(tmp_path):
    save_file({f"lora_unet_{i}.weight": torch.zeros(4, 4) for i in range(7)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(InputFileError, match=r"lora.safetensors: holds 7 tensors \('lora_unet_0.weight'"):
        load_embedding(tmp_path / "lora.safetensors")
    save_file({"emb_params": torch.zeros(2, 1024), "other": torch.zeros(2, 1024)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InputFileError, match="holds 2 tensors"):
        load_embedding(tmp_path / "two.safetensors")


def test_custom_width_needs_expected_width(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 32)}}, path)
    assert load_embedding(path, expected_width=32).width == 32
    with pytest.raises(InputFileError, match="does not match the model's token width 1024"):
        load_embedding(path, expected_width=1024)
    with pytest.raises(InputFileError, match="matches no Stable Diffusion"):
        load_embedding(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        load_embedding(tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputFileError, match="unsupported embedding file type .txt"):
        load_embedding(tmp_path / "notes.txt")


# -- writing ------------------------------------------------------------------------------
def test_writes_a1111_pt_exactly(tmp_path):
    emb = Embedding("ignored", _vectors(4).double().requires_grad_(True), step=7, sd_checkpoint="abcd", sd_checkpoint_name="v2")
    path = save_embedding(emb, tmp_path / "prostate-t2w.pt")
    data = torch.load(path, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    vec = data["string_to_param"]["*"]
    assert vec.dtype == torch.float32 and not vec.requires_grad and vec.shape == (4, 1024)
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == ("prostate-t2w", 7, "abcd", "v2")
    assert path.stat().st_size < 1_000_000


#: AUTOMATIC1111 v1.10 ``modules/safe.py`` ``allowed_zip_names_re``: any other zip entry -> "may be malicious"
A1111_ALLOWED_ZIP_NAMES = r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"


@pytest.mark.parametrize("target", ["case.pt", "learned_embeds.bin"])
def test_pickled_files_pass_the_webui_safe_unpickle_check(tmp_path, target):
    """A plain torch.save from torch >= 2.x adds .format_version/.storage_alignment, which the webui refuses."""
    import re
    import zipfile

    emb = Embedding("case", torch.randn(3, 1024))
    path = save_embedding(emb, tmp_path / target, fmt="a1111" if target.endswith(".pt") else "diffusers")
    names = zipfile.ZipFile(path).namelist()
    assert names and all(re.match(A1111_ALLOWED_ZIP_NAMES, n) for n in names), names
    assert len({n.split("/")[0] for n in names}) == 1
    assert torch.equal(load_embedding(path).vectors, emb.vectors)


def test_writes_safetensors_that_a1111_and_comfyui_accept(tmp_path):
    emb = Embedding("e", _vectors(3), step=12, sd_checkpoint="ffff")
    path = save_embedding(emb, tmp_path / "adc.safetensors", fmt="safetensors")
    tensors = load_file(str(path))
    # A1111 (create_embedding_from_data) and ComfyUI (load_embed) take a dict holding one tensor
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], emb.vectors)
    back = load_embedding(path)
    assert (back.name, back.step, back.sd_checkpoint) == ("adc", 12, "ffff")


def test_writes_sdxl_pair_safetensors_and_refuses_other_formats(tmp_path):
    emb = Embedding("xl", _vectors(2, 768), extra={"clip_g": _vectors(2, 1280)})
    path = save_embedding(emb, tmp_path / "xl.safetensors", fmt="safetensors")
    assert set(load_file(str(path))) == {"clip_l", "clip_g"}
    assert load_embedding(path).is_sdxl
    with pytest.raises(MedDiffError, match="only as 'safetensors'"):
        save_embedding(emb, tmp_path / "xl.pt")


@pytest.mark.parametrize("target", ["folder", "mytoken.safetensors", "mytoken.bin"])
def test_writes_diffusers_format(tmp_path, target):
    emb = Embedding("mytoken", _vectors(3))
    path = save_embedding(emb, tmp_path / target, fmt="diffusers")
    if target == "folder":
        assert path == tmp_path / "folder" / "learned_embeds.safetensors"
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert list(data) == ["mytoken"] and data["mytoken"].shape == (3, 1024)
    assert load_embedding(path).name == ("learned_embeds" if target == "folder" else "mytoken")


def test_names_must_be_lowercase_and_follow_the_file(tmp_path):
    emb = Embedding("whatever", _vectors())
    with pytest.raises(MedDiffError, match="must be lowercase"):
        save_embedding(emb, tmp_path / "MyEmbedding.pt")
    with pytest.raises(MedDiffError, match="must be lowercase"):
        save_embedding(Embedding("Mixed", _vectors()), tmp_path / "dir", fmt="diffusers")
    assert load_embedding(save_embedding(emb, tmp_path / "renamed.pt")).name == "renamed"


def test_never_overwrites_without_force_and_writes_atomically(tmp_path):
    first = Embedding("a", _vectors(seed=1))
    second = Embedding("a", _vectors(seed=2))
    path = save_embedding(first, tmp_path / "a.pt")
    with pytest.raises(MedDiffError, match="already exists"):
        save_embedding(second, path)
    assert torch.equal(load_embedding(path).vectors, first.vectors)
    save_embedding(second, path, force=True)
    assert torch.equal(load_embedding(path).vectors, second.vectors)
    with pytest.raises(InputFileError, match="NaN"):
        save_embedding(Embedding("a", torch.full((1, 1024), float("inf"))), path, force=True)
    assert torch.equal(load_embedding(path).vectors, second.vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no temp files left


def test_wrong_suffix_and_unknown_format(tmp_path):
    emb = Embedding("a", _vectors())
    with pytest.raises(MedDiffError, match="needs a file ending in .pt"):
        save_embedding(emb, tmp_path / "a.safetensors", fmt="a1111")
    with pytest.raises(MedDiffError, match="unknown embedding format"):
        save_embedding(emb, tmp_path / "a.pt", fmt="ckpt")


# -- folders ------------------------------------------------------------------------------
def test_load_embeddings_dir_reads_all_and_reports_bad_files(tmp_path, caplog):
    save_embedding(Embedding("a", _vectors(seed=1)), tmp_path / "healthy.pt")
    save_embedding(Embedding("b", _vectors(seed=2)), tmp_path / "sub" / "tumour.safetensors", fmt="safetensors")
    save_embedding(Embedding("concept", _vectors(seed=3)), tmp_path / "concept", fmt="diffusers")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    (tmp_path / "readme.txt").write_text("ignored")
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "healthy.preview.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "plain.png")
    with caplog.at_level(logging.WARNING):
        found = load_embeddings_dir(tmp_path)
    assert sorted(found) == ["healthy", "learned_embeds", "tumour"]  # concept/learned_embeds.safetensors: by stem
    assert "broken.pt" in caplog.text and "truncated or corrupt" in caplog.text
    assert "plain.png" not in caplog.text
    with pytest.raises(InputFileError, match="not a folder"):
        load_embeddings_dir(tmp_path / "healthy.pt")


def test_folder_scan_skips_files_too_large_for_an_embedding(tmp_path, caplog, monkeypatch):
    from medical_diffusion.embeddings import readers

    save_embedding(Embedding("s", _vectors(1)), tmp_path / "small.pt")
    save_embedding(Embedding("b", _vectors(64)), tmp_path / "big.pt")
    monkeypatch.setattr(readers, "MAX_SCAN_BYTES", (tmp_path / "small.pt").stat().st_size + 1)
    with caplog.at_level(logging.WARNING):
        assert list(load_embeddings_dir(tmp_path)) == ["small"]
    assert "big.pt" in caplog.text and "too large for an embedding" in caplog.text
    assert load_embedding(tmp_path / "big.pt").n_vectors == 64  # a named file is still read
