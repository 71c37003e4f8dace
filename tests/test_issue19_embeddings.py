"""Issue 19, embeddings side: a misspelt embedding name is refused by every sampling command (plain
prompts only with --allow-plain-prompt), and the embeddings home (./embeddings or
$MEDDIFF_EMBEDDINGS_DIR) is read by default."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from medical_diffusion.cli import main
from medical_diffusion.embeddings import Embedding, save_embedding

SMALL = ["--steps", "1", "--width", "64", "--height", "64"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own folder, with no embeddings home moved by the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDDIFF_EMBEDDINGS_DIR", raising=False)


def _embeddings(folder, names=("cxr_tiny", "cxr_sick"), width=32):
    g = torch.Generator().manual_seed(0)
    for name in names:
        save_embedding(Embedding(name, torch.randn(2, width, generator=g) * 0.3), folder / f"{name}.pt")
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    from medical_diffusion.generation import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the prompt was not checked first"))


@pytest.fixture
def tiny(tiny_backend, monkeypatch):
    """CLI model loads get the module's tiny model."""
    from medical_diffusion.generation import loading

    monkeypatch.setattr(loading, "load_model", lambda model, device="cpu": tiny_backend)
    return tiny_backend


def _inpaint_inputs(tmp_path):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "img.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    return ["--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png")]


def _command(name, tmp_path, word):
    """A sampling command whose prompt uses ``word`` where an embedding name belongs."""
    return {
        "generate": ["generate", "--prompt", f"neg={word}", "-n", "1"],
        "interpolate": ["interpolate", "--healthy", "cxr_sick", "--diseased", word, "-k", "2"],
        "compose": ["compose", "--base", "cxr_sick", "--add", f"{word}:0.5"],
        "inpaint": ["inpaint", *_inpaint_inputs(tmp_path), "--prompt", word],
    }[name] + ["--model", "tiny", "--out", str(tmp_path / "out")]


COMMANDS = ["generate", "interpolate", "compose", "inpaint"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_embedding_is_refused_naming_the_word_and_the_folder(tmp_path, capsys, no_model_load, command):
    folder = _embeddings(tmp_path / "emb")
    assert main([*_command(command, tmp_path, "cxr_tinyy"), "--embeddings-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "unknown embedding name(s) cxr_tinyy (did you mean cxr_tiny?)" in err
    assert f"looked in --embeddings-dir {folder}" in err and "found: cxr_sick, cxr_tiny" in err
    assert "--allow-plain-prompt" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_allow_plain_prompt_samples_plain_text(tmp_path, capsys, tiny, command):
    folder = _embeddings(tmp_path / "emb")
    assert main([*_command(command, tmp_path, "a chest x-ray"), "--embeddings-dir", str(folder),
                 "--allow-plain-prompt", *SMALL]) == 0
    assert any((tmp_path / "out").rglob("*.png"))


def test_a_name_on_disk_that_does_not_load_is_refused_after_the_model_loads(tmp_path, capsys, tiny):
    """A file named like the prompt but made for another model passes the name check on disk; the loaded
    table lacks it, and the same refusal comes from the core check."""
    folder = _embeddings(tmp_path / "emb")
    save_embedding(Embedding("cxr_sd2", torch.zeros(2, 1024) + 0.1), folder / "cxr_sd2.pt")
    assert main(["generate", "--prompt", "pos=cxr_sd2", "-n", "1", "--model", "tiny", "--embeddings-dir",
                 str(folder), "--out", str(tmp_path / "out"), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "unknown embedding name(s) cxr_sd2" in err and f"--embeddings-dir {folder}" in err
    assert "found: cxr_sick, cxr_tiny" in err and not any((tmp_path / "out").rglob("*.png"))


def test_composable_prompts_with_known_names_pass(tmp_path, tiny):
    folder = _embeddings(tmp_path / "emb")
    assert main(["generate", "--prompt", "mix=cxr_tiny:0.5 AND (CXR_SICK:1.1) :0.5", "-n", "1", "--model", "tiny",
                 "--embeddings-dir", str(folder), "--out", str(tmp_path / "out"), *SMALL]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["params"]["embeddings"]) == {"cxr_tiny", "cxr_sick"}  # any case: the tokenizer lowercases


def test_generate_reads_the_embeddings_home_by_default(tmp_path, capsys, tiny, monkeypatch):
    args = ["generate", "--prompt", "neg=cxr_tiny", "-n", "1", "--model", "tiny", *SMALL]
    assert main([*args, "--out", str(tmp_path / "none")]) == 1  # no ./embeddings yet
    err = capsys.readouterr().err
    assert f"the embeddings home {tmp_path / 'embeddings'} (the default ./embeddings" in err
    assert "which does not exist" in err

    _embeddings(tmp_path / "embeddings")
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert set(manifest["params"]["embeddings"]) == {"cxr_tiny"}

    moved = _embeddings(tmp_path / "elsewhere", names=("cxr_moved",))
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(moved))
    assert main([*args, "--out", str(tmp_path / "b")]) == 1  # the variable moves the home away from ./embeddings
    err = capsys.readouterr().err
    assert f"{moved} ($MEDDIFF_EMBEDDINGS_DIR)" in err and "found: cxr_moved" in err
    assert main([*args[:2], "neg=cxr_moved", *args[3:], "--out", str(tmp_path / "b")]) == 0


def test_an_embedding_file_alone_does_not_read_the_home(tmp_path, capsys, no_model_load):
    _embeddings(tmp_path / "embeddings")
    single = _embeddings(tmp_path / "one", names=("cxr_one",)) / "cxr_one.pt"
    assert main(["generate", "--prompt", "neg=cxr_tiny", "-n", "1", "--model", "tiny", "--embedding", str(single),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"looked in --embedding {single}" in err and "found: cxr_one" in err


def test_ui_reads_the_embeddings_home_and_says_so(tmp_path, capsys, monkeypatch):
    import medical_diffusion.ui.standalone as standalone

    seen = {}
    monkeypatch.setattr(standalone, "launch", lambda ctx, **kw: seen.update(ctx=ctx))
    assert main(["ui", "--work-dir", str(tmp_path / "w")]) == 0
    assert seen["ctx"].embeddings_dir == tmp_path / "embeddings"
    assert f"embeddings: {tmp_path / 'embeddings'} (the default ./embeddings" in capsys.readouterr().out
    monkeypatch.setenv("MEDDIFF_EMBEDDINGS_DIR", str(tmp_path / "home"))
    assert main(["ui", "--work-dir", str(tmp_path / "w")]) == 0
    assert seen["ctx"].embeddings_dir == tmp_path / "home"
    assert main(["ui", "--work-dir", str(tmp_path / "w"), "--embeddings-dir", str(tmp_path / "x")]) == 0
    assert seen["ctx"].embeddings_dir == tmp_path / "x"
    assert f"embeddings: {tmp_path / 'x'} (--embeddings-dir)" in capsys.readouterr().out
    # the default home outside the allowed roots: said at start, not at the first tab that lists it
    monkeypatch.delenv("MEDDIFF_EMBEDDINGS_DIR")
    (tmp_path / "w").mkdir()
    monkeypatch.setenv("MEDDIFF_ALLOWED_ROOTS", str(tmp_path / "w"))  # main() sets it from --allowed-roots
    seen.clear()
    assert main(["ui", "--work-dir", str(tmp_path / "w"), "--allowed-roots", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert f"the embeddings folder {tmp_path / 'embeddings'} (the default ./embeddings" in err
    assert "outside the allowed roots" in err and not seen
    assert main(["ui", "--work-dir", str(tmp_path / "w"), "--allowed-roots", str(tmp_path / "w"),
                 "--embeddings-dir", str(tmp_path / "w" / "emb")]) == 0
    assert seen["ctx"].embeddings_dir == tmp_path / "w" / "emb"


def test_the_experiment_generate_stage_refuses_a_class_without_its_embedding(tmp_path, tiny):
    from types import SimpleNamespace

    from medical_diffusion.errors import MedDiffError
    from medical_diffusion.experiment.stages import stage_generate

    trained = _embeddings(tmp_path / "run", names=("phantom_neg",)) / "phantom_neg.pt"
    ctx = SimpleNamespace(spec={"dep_order": ["train/neg"]}, out=tmp_path / "stage", torch_device=lambda: "cpu",
                          dep_output=lambda dep, name: trained, progress=lambda *a: None)
    settings = {"model": "tiny", "classes": {"neg": "phantom_negg"}, "n": 1, "batch_size": 1,
                "sampling": {"seed": 0, "steps": 1, "cfg": 2.0, "negative_prompt": "", "width": 64, "height": 64,
                             "sampler": "euler_a"}}
    with pytest.raises(MedDiffError, match=r"phantom_negg \(did you mean phantom_neg\?\).*phantom_neg.pt"):
        stage_generate(settings, ctx)
    assert not (tmp_path / "stage").exists()


# -- embedding inspect and the Embeddings tab ---------------------------------------------------------------
class _Model:
    """What the Embeddings tab asks of a loaded model: its text width and token-vector scale."""

    text_width = 8

    def token_embedding_norm(self) -> float:
        return 2.5


def _embeddings_tab(tmp_path, loaded_width):
    import gradio as gr

    from medical_diffusion.ui import tab_embeddings
    from medical_diffusion.ui.context import UIContext

    ctx = UIContext(backend_factory=_Model, work_dir=tmp_path, embeddings_dir=tmp_path / "emb",
                    loaded_text_width=lambda: loaded_width)
    with gr.Blocks() as blocks:
        parts = tab_embeddings.build(ctx)
    return blocks, parts


def test_inspect_reports_a_tiny_models_embedding_alike_in_the_cli_and_the_tab(tmp_path, capsys):
    _embeddings(tmp_path / "emb", names=("tiny32",))
    path = tmp_path / "emb" / "tiny32.pt"
    assert main(["embedding", "inspect", str(path), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    _, parts = _embeddings_tab(tmp_path, None)  # no model loaded yet (the webui at start-up)
    text, tab, _status = parts["inspect"](None, "tiny32.pt")
    for report in (cli, tab):
        assert report["family"] == "unknown (width 32)" and report["fits"] == "unknown width 32 (a custom or tiny model)"
        assert report["warnings"] == []
    assert "--expected-width N or --model" in cli["notes"][0] and "expected_width" not in cli["notes"][0]
    assert "load the model it was made for" in tab["notes"][0] and "--" not in text
    # a loaded model of another width: reported with a warning and no norm check, not refused
    _, parts = _embeddings_tab(tmp_path, _Model.text_width)
    text, tab, _status = parts["inspect"](None, "tiny32.pt")
    assert tab["token_scale"] is None
    assert tab["warnings"] == ["does not fit the model: embedding width 32 does not match the model's token width 8"]


def test_embeddings_tab_never_picks_between_an_upload_and_the_list_silently(tmp_path):
    import gradio as gr

    folder = _embeddings(tmp_path / "emb", names=("listed", "uploaded"))
    blocks, parts = _embeddings_tab(tmp_path, None)
    from upload_support import gradio_upload

    *_, status = parts["inspect"](gradio_upload(folder / "uploaded.pt"), "listed.pt")  # said in the tab's status line
    assert "embedding A: both an uploaded file (uploaded.pt) and a list choice (listed.pt)" in status
    assert parts["inspect"](gradio_upload(folder / "uploaded.pt"), None)[1]["name"] == "uploaded"
    assert parts["inspect"](None, "listed.pt")[1]["name"] == "listed"
    # the user's last pick wins in the page: an upload clears the list choice, a choice clears the upload
    by_id = {b._id: b for b in blocks.blocks.values()}
    links = {(type(by_id[d["targets"][0]]).__name__, d["trigger"], type(by_id[d["outputs"][0]]).__name__)
             for d in blocks.dependencies if len(d["outputs"]) == 1 and d["trigger"] in ("upload", "select")}
    assert links == {("File", "upload", "Dropdown"), ("Dropdown", "select", "File")}
    pairs = [(d["targets"][0], d["outputs"][0]) for d in blocks.dependencies if d["trigger"] in ("upload", "select")]
    assert len(pairs) == 4 and len({t for t, _ in pairs}) == 4  # A and B, each way


def test_the_embeddings_core_imports_no_higher_layer():
    import ast
    from pathlib import Path

    import medical_diffusion.embeddings as embeddings

    higher = ("medical_diffusion.backend", "medical_diffusion.generation", "medical_diffusion.training",
              "medical_diffusion.ui", "medical_diffusion.cli", "medical_diffusion.webui")
    found = []
    for path in Path(embeddings.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith(higher)]
    assert found == []


def test_embedding_commands_take_a_name_from_the_home(tmp_path, capsys):
    home = _embeddings(tmp_path / "embeddings")
    assert main(["embedding", "inspect", "cxr_tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file"] == str(home / "cxr_tiny.pt")
    assert main(["embedding", "blend", "cxr_tiny", "cxr_sick", "--weight", "0.5", "--name", "mix"]) == 0
    assert (home / "mix.pt").is_file()  # beside A: in the home, where the other commands find it
    assert main(["embedding", "inspect", "cxr_tinyy"]) == 1
    err = capsys.readouterr().err
    assert f"cxr_tinyy: no such file, and no embedding of that name in the embeddings home {home}" in err
    assert "found there: cxr_sick, cxr_tiny, mix" in err
    other = _embeddings(tmp_path / "other", names=("cxr_other",))
    assert main(["embedding", "convert", "cxr_other", str(tmp_path / "o.safetensors"), "--to", "safetensors",
                 "--embeddings-dir", str(other)]) == 0
    assert (tmp_path / "o.safetensors").is_file()


def test_the_generate_tab_refuses_a_misspelt_name_through_the_same_check(tmp_path, tiny_backend):
    import gradio as gr

    from medical_diffusion.ui import tab_generate
    from medical_diffusion.ui.context import UIContext

    folder = _embeddings(tmp_path / "emb")
    ctx = UIContext(backend_factory=lambda: tiny_backend, work_dir=tmp_path, embeddings_dir=folder)
    with gr.Blocks():
        parts = tab_generate.build(ctx)
    *_, status = parts["generate"]("cxr_tinyy", 1, 2.0, 0, 64, 64, "")  # said in the tab's status line
    assert re.search(rf"unknown embedding name.s. cxr_tinyy .did you mean cxr_tiny.*looked in {re.escape(str(folder))}",
                     status.replace("\\_", "_"))
