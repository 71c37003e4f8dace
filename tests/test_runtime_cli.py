"""--device/--precision/--attention on every model command: resolved before the model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medical_diffusion import devices
from medical_diffusion.cli import main
from medical_diffusion.devices import Runtime


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture
def loader(monkeypatch):
    """Record what the generation commands would load, and stop there (no model is built)."""
    import medical_diffusion.generation.loading as loading

    class Loaded(Exception):
        pass

    class Seen(list):
        error = Loaded

    seen = Seen()

    def fake(model, device="cpu"):
        seen.append(device)
        raise Loaded

    monkeypatch.setattr(loading, "load_model", fake)
    return seen


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    return path, mask


def _commands(tmp_path, image):
    out = str(tmp_path / "out")
    img, mask = image
    plain = ["--allow-plain-prompt"]  # the prompts use no embeddings: these tests are about the device
    return {
        "generate": ["generate", "--model", "tiny", "--prompt", "neg=a", "-n", "1", "--out", out, *plain],
        "interpolate": ["interpolate", "--model", "tiny", "--healthy", "a b", "--diseased", "c d", "--out", out, *plain],
        "compose": ["compose", "--model", "tiny", "--base", "a b", "--add", "c d", "--out", out, *plain],
        "inpaint": ["inpaint", "--model", "tiny", "--image", str(img), "--mask", str(mask), "--prompt", "x",
                    "--out", out, *plain],
    }


@pytest.mark.parametrize("command", ["generate", "interpolate", "compose", "inpaint"])
def test_generation_commands_pass_the_resolved_runtime_to_the_loader(no_gpu, loader, tmp_path, image, command):
    argv = _commands(tmp_path, image)[command] + ["--device", "cpu", "--precision", "bf16", "--attention", "classic"]
    with pytest.raises(loader.error):
        main(argv)
    assert loader == [Runtime(torch.device("cpu"), torch.bfloat16, "classic")]


@pytest.mark.parametrize("command", ["generate", "interpolate", "compose", "inpaint"])
def test_generation_auto_default_is_cpu_fp32_here(no_gpu, loader, tmp_path, image, command):
    with pytest.raises(loader.error):
        main(_commands(tmp_path, image)[command])
    assert loader == [Runtime(torch.device("cpu"), torch.float32, "auto")]


@pytest.mark.parametrize("command", ["generate", "interpolate", "compose", "inpaint"])
def test_cuda_without_cuda_is_one_line_before_loading(no_gpu, loader, tmp_path, image, command, capsys):
    assert main(_commands(tmp_path, image)[command] + ["--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert loader == [] and "CUDA is not available" in err and len(err.splitlines()) == 1


def test_auto_picks_cuda_and_fp16_when_there(monkeypatch, loader, tmp_path, image):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "describe", lambda device, dtype=None: f"{device} (fake GPU)")
    monkeypatch.setattr(devices, "configure_for_speed", lambda device: None)
    with pytest.raises(loader.error):
        main(_commands(tmp_path, image)["generate"])
    assert loader == [Runtime(torch.device("cuda"), torch.float16, "auto")]


def test_fp16_on_the_cpu_is_refused_before_loading(no_gpu, loader, tmp_path, image, capsys):
    assert main(_commands(tmp_path, image)["generate"] + ["--device", "cpu", "--precision", "fp16"]) == 1
    assert loader == [] and "fp16 on the CPU" in capsys.readouterr().err


@pytest.fixture
def train_data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def test_train_passes_device_dtype_attention(no_gpu, monkeypatch, train_data, tmp_path):
    import medical_diffusion.training.loop as loop

    seen = {}

    def fake_run(config, run_dir, **kw):
        seen.update(kw, config=config)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_training", fake_run)
    code = main(["train", "--model", "tiny", "--data", str(train_data), "--name", "blob", "--out",
                 str(tmp_path / "run"), "--precision", "bf16", "--attention", "sdpa", "--no-offload-vae",
                 "--sync-every", "5", "--gradient-checkpointing"])
    assert code == 130
    assert (seen["device"], seen["dtype"], seen["attention"]) == (torch.device("cpu"), torch.bfloat16, "sdpa")
    config = seen["config"]
    assert (config.offload_vae, config.sync_every, config.gradient_checkpointing) == (False, 5, True)


def test_train_cuda_without_cuda_fails_before_anything(no_gpu, monkeypatch, train_data, tmp_path, capsys):
    import medical_diffusion.training.loop as loop

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["train", "--model", "tiny", "--data", str(train_data), "--name", "blob", "--device", "cuda:0",
                 "--out", str(tmp_path / "run")]) == 1
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_ui_context_carries_the_runtime(no_gpu, monkeypatch, tmp_path):
    pytest.importorskip("diffusers")  # the tiny model of the standalone backend
    import medical_diffusion.ui.standalone as standalone

    seen = {}
    monkeypatch.setattr(standalone, "launch", lambda ctx, **kw: seen.update(ctx=ctx))
    assert main(["ui", "--work-dir", str(tmp_path / "w"), "--precision", "bf16"]) == 0
    ctx = seen["ctx"]
    assert ctx.runtime == Runtime(torch.device("cpu"), torch.bfloat16, "auto")
    assert ctx.device_label == "cpu, weights bfloat16"
    backend = ctx.backend()  # the tiny model, built on first use with the context's runtime
    assert backend.dtype is torch.bfloat16 and next(backend.unet.parameters()).dtype is torch.bfloat16


def test_ui_cuda_without_cuda(no_gpu, monkeypatch, tmp_path, capsys):
    import medical_diffusion.ui.standalone as standalone

    monkeypatch.setattr(standalone, "launch", lambda ctx, **kw: pytest.fail("must not launch"))
    assert main(["ui", "--work-dir", str(tmp_path / "w"), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_runs_on_the_resolved_runtime(no_gpu, monkeypatch, tmp_path):
    import medical_diffusion.demo.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_demo", lambda opts: seen.append(opts) or tmp_path / "report.html")
    assert main(["demo", "--out", str(tmp_path / "d"), "--precision", "bf16"]) == 0
    assert (seen[0].device, seen[0].dtype) == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(pipeline, "run_demo", lambda opts: pytest.fail("must not run"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "mps"]) == 1
