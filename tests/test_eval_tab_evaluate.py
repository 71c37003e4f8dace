"""Evaluate tab: the classifier log streams while it runs; missing weights say what to do in the tab."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("gradio")

from medical_diffusion.cli import main  # noqa: E402
from medical_diffusion.evaluation import weights as w  # noqa: E402
from medical_diffusion.ui import tab_evaluate  # noqa: E402


def test_stream_job_yields_log_lines_while_the_job_runs():
    release = threading.Event()

    def job(progress, log):
        log("loading images")
        progress("real run 1", 3, 10)
        assert release.wait(10), "the stream did not show the first lines before the job finished"
        log("[real] run 1: test AUC 0.5")
        return {"done": True}

    updates = []
    for text, result in tab_evaluate.stream_job(job, interval=0.01):
        updates.append((text, result))
        if result is None and "real run 1: step 3/10" in text:
            release.set()  # the job goes on only once its progress was shown
    assert updates[0][1] is None and updates[0][0].startswith("loading images")
    assert any("real run 1: step 3/10" in text for text, result in updates if result is None)
    assert updates[-1] == ("loading images\n[real] run 1: test AUC 0.5", {"done": True})


def test_stream_job_reraises_the_job_error():
    def job(progress, log):
        log("started")
        raise w.MissingWeightsError("resnet18-f37072fd.pth", [], kind="resnet18")

    with pytest.raises(w.MissingWeightsError):
        list(tab_evaluate.stream_job(job, interval=0.01))


def _missing_resnet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(w.MissingWeightsError) as info:
        w.find_resnet18_weights()
    return info.value


def test_missing_weights_core_message_is_neutral(tmp_path, monkeypatch):
    exc = _missing_resnet(tmp_path, monkeypatch)
    assert "resnet18-f37072fd.pth" in str(exc) and str(tmp_path / "th") in str(exc)
    assert "--weights" not in str(exc) and "box" not in str(exc)


def test_tab_error_says_what_to_do_in_the_tab(tmp_path, monkeypatch):
    exc = _missing_resnet(tmp_path, monkeypatch)
    with pytest.raises(w.MissingWeightsError) as info:
        with tab_evaluate.tab_hints():
            raise exc
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "'ResNet-18 weights' box" in message
    assert "--weights" not in message


def test_cli_error_names_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert main(["classify", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth: weights file not found" in err and "or pass --weights FILE" in err
    assert "box" not in err


def _tab_function(ctx, name):
    import gradio as gr

    with gr.Blocks() as blocks:
        tab_evaluate.build(ctx)
    for dependency in blocks.fns:
        if getattr(dependency.fn, "__name__", "") == name:
            return dependency.fn
    raise AssertionError(f"no handler {name}")


def _classifier_data(root):
    import numpy as np

    from medical_diffusion.png_io import save_png

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("neg", "pos"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 80 if label == "neg" else 255, (32, 32), dtype=np.uint8)
                save_png(img, root / split / label / f"{i}.png")


@pytest.fixture
def ctx(tmp_path):
    from medical_diffusion.ui.context import UIContext

    def no_model():
        raise AssertionError("the Evaluate tab needs no diffusion model")

    return UIContext(backend_factory=no_model, work_dir=tmp_path / "work", embeddings_dir=tmp_path / "emb")


def _values(tmp_path, weights="", runs=1):
    # real, synthetic, out, mixes, weights, steps, batch, size, runs, bf16
    return [str(tmp_path / "data"), "", str(tmp_path / "out"), "real=all:0", weights, 2, 4, 32, runs, False]


@pytest.mark.slow
def test_classifier_handler_streams_its_log_and_ends_with_the_table(tmp_path, ctx):
    import torch
    from torchvision.models import resnet18

    _classifier_data(tmp_path / "data")
    weights = tmp_path / "resnet18-random.pth"
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), weights)
    do_classify = _tab_function(ctx, "do_classify")
    updates = list(do_classify(*_values(tmp_path, str(weights), runs=2)))
    assert len(updates) >= 2
    *during, (final_log, rows, roc, status) = updates
    assert all(len(u) == 4 for u in updates)
    assert status.startswith("Done") and "report.json" in status
    assert during[0][0] and "loading real validation and test images" in during[0][0]
    assert "[real] run 2/2" in final_log and "test AUC" in final_log
    assert rows[0][0] == "real" and rows[0][3] == 2 and roc.endswith("roc.png")


def test_classifier_handler_missing_weights_error_points_at_the_box(tmp_path, ctx, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _classifier_data(tmp_path / "data")
    do_classify = _tab_function(ctx, "do_classify")
    *_, (log_text, rows, roc, message) = list(do_classify(*_values(tmp_path)))
    assert rows is None and roc is None and message.startswith("**Error:**")
    assert "resnet18-f37072fd.pth" in message and "'ResNet-18 weights' box" in message
    assert "--weights" not in message
