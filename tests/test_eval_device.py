"""Evaluation on a device: --device/--workers resolved before loading, the decoding DataLoader, strict fp32
features, the classifier's channels-last/AMP step and per-batch seeding, the per-device time estimate."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from torch import nn

from medical_diffusion.cli import main
from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation import classifier as clf
from medical_diffusion.evaluation import features, fid
from medical_diffusion.evaluation.classifier_data import ImageSet
from medical_diffusion.evaluation.feature_cache import FeatureCache
from medical_diffusion.evaluation.features import FeatureExtractor, extract_features, strict_fp32
from medical_diffusion.evaluation.preprocessing import load_for_network
from medical_diffusion.png_io import save_png


class SmallConvNet(nn.Module):
    """A fixed-weight conv net: 3x32x32 -> 16 features, counting the images it saw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 5, stride=2)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x / 255.0)), 1), 1)


def _images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        save_png(rng.integers(0, 255, (40, 36), dtype=np.uint8), path)
        paths.append(path)
    return paths


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _forbid(monkeypatch, module, *names):
    called = []
    for name in names:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: called.append(_n) or pytest.fail(f"{_n} called"))
    return called


# --- device resolution in the CLIs -------------------------------------------------------------------

def test_fid_device_cuda_without_cuda_is_one_line_and_loads_nothing(tmp_path, no_cuda, monkeypatch, capsys):
    called = _forbid(monkeypatch, fid, "collect_images", "load_extractor", "compute_fid", "save_real_stats")
    assert main(["fid", str(tmp_path / "real"), str(tmp_path / "gen"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and err.count("\n") == 1 and called == []


def test_classify_device_cuda_without_cuda_is_one_line_and_loads_nothing(tmp_path, no_cuda, monkeypatch, capsys):
    called = _forbid(monkeypatch, clf, "load_image_set", "labelled_files", "build_resnet18", "run_experiments")
    for extra in ([], ["--quick"], ["--estimate-only"]):
        assert main(["classify", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda", *extra]) == 1
        err = capsys.readouterr().err
        assert "--device cuda: CUDA is not available" in err and err.count("\n") == 1
    assert called == [] and not (tmp_path / "o").exists()


def test_fid_cli_passes_the_resolved_device_and_workers(tmp_path, monkeypatch, capsys):
    from medical_diffusion import devices
    from medical_diffusion.evaluation.limits import default_workers

    seen = {}

    def fake_compute(*args):
        seen["device"], seen["workers"] = args[-2], args[-1]
        return types.SimpleNamespace(summary=lambda: "FID = 1", failures=[], to_dict=dict)

    monkeypatch.setattr(fid, "compute_fid", fake_compute)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["fid", "R", "G"]) == 0  # --device auto without a GPU: the CPU
    assert seen == {"device": torch.device("cpu"), "workers": default_workers()} and default_workers() <= 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a (pretend) GPU: auto takes it
    monkeypatch.setattr(devices, "describe", lambda device, dtype=None: f"{device} (fake GPU)")
    assert main(["fid", "R", "G", "--workers", "0", "--batch-size", "64"]) == 0
    assert seen == {"device": torch.device("cuda"), "workers": 0}
    with pytest.raises(SystemExit):
        main(["fid", "R", "G", "--workers", "65"])
    assert "--workers: expected a whole number from 0 to 64" in capsys.readouterr().err


def test_classify_cli_puts_device_workers_and_amp_into_the_config(tmp_path, monkeypatch, no_cuda):
    seen = {}
    monkeypatch.setattr(clf, "run_experiments", lambda real, mixes, out, config, *a: seen.update(config=config) or {})
    assert main(["classify", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "2", "--no-amp",
                 "--estimate-only"]) == 0
    config = seen["config"]
    assert (config.device, config.workers, config.amp, config.channels_last) == ("cpu", 2, False, True)


# --- features through the DataLoader ---------------------------------------------------------------

def test_dataloader_features_equal_the_direct_batched_computation(tmp_path):
    paths = _images(tmp_path / "set", 7, 0)
    broken = tmp_path / "set" / "broken.png"
    broken.write_bytes(b"not a png")
    paths.insert(3, broken)
    ext = FeatureExtractor("small", SmallConvNet(), 32, "w" * 64)
    # the computation before the DataLoader: the same batches of 4 files, the unreadable one left out
    expected = []
    with torch.inference_mode():
        for start in range(0, len(paths), 4):
            batch = [load_for_network(p, 32, "paper") for p in paths[start:start + 4] if p != broken]
            expected.append(ext.model(torch.stack(batch)).numpy())
    expected = np.concatenate(expected)
    for workers in (0, 2):
        fs = extract_features(paths, ext, "paper", batch_size=4, device="cpu", workers=workers)
        np.testing.assert_array_equal(fs.features, expected)  # bit-identical, whichever process decoded
        assert fs.paths == [str(p) for p in paths if p != broken]
        assert len(fs.failures) == 1 and fs.failures[0]["path"] == str(broken)


def test_feature_cache_key_does_not_depend_on_the_device(tmp_path):
    paths = _images(tmp_path / "set", 3, 1)
    ext = FeatureExtractor("small", SmallConvNet(), 32, "w" * 64)
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(paths, ext, "clean", cache=cache, device="cpu")
    again = extract_features(paths, ext, "clean", cache=cache, device=torch.device("cpu:0"), workers=1)
    assert ext.model.seen == 3  # the second device read every feature from the cache
    np.testing.assert_array_equal(first.features, again.features)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ext.key("clean")]
    assert "cpu" not in ext.key("clean")


def test_strict_fp32_turns_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with strict_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), strict_fp32():
            raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_extract_features_runs_the_network_without_tf32(tmp_path):
    class Probe(SmallConvNet):
        def forward(self, x):
            flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().forward(x)

    flags = []
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        extract_features(_images(tmp_path / "s", 2, 2), FeatureExtractor("p", Probe(), 32, "w" * 64), "paper")
        assert flags == [(False, False)] and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_compute_fid_refuses_an_absent_gpu_before_reading_anything(tmp_path, no_cuda, monkeypatch):
    called = _forbid(monkeypatch, fid, "collect_images", "load_extractor")
    with pytest.raises(MedDiffError, match="CUDA is not available"):
        fid.compute_fid(tmp_path / "r", tmp_path / "g", device="cuda")
    with pytest.raises(MedDiffError, match="CUDA is not available"):
        fid.save_real_stats(tmp_path / "r", tmp_path / "r.npz", device="cuda")
    assert called == []


def test_compute_fid_records_the_device(tmp_path):
    _images(tmp_path / "real", 4, 3)
    _images(tmp_path / "gen", 4, 4)
    res = fid.compute_fid(tmp_path / "real", tmp_path / "gen", FeatureExtractor("s", SmallConvNet(), 32, "w" * 64),
                          device="cpu", workers=0)
    assert res.device == "cpu" and res.value >= 0


# --- classifier ------------------------------------------------------------------------------------

def _toy_resnet(seed=0):
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


def _toy_images(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, size, size, generator=g) * 80).to(torch.uint8)
    labels = torch.arange(n) % 2
    images[labels == 1, :, 10:22, 10:22] += 150
    return ImageSet(images, labels, [f"{i}.png" for i in range(n)])


def test_cpu_step_with_channels_last_is_finite_and_reproducible():
    config = clf.ClassifierConfig(device="cpu")
    data = _toy_images()
    states = []
    for _ in range(2):
        model = clf.place_model(_toy_resnet(), torch.device("cpu"), config.channels_last)
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = clf.AugmentedBatches(data, [torch.arange(4), torch.arange(4, 8)], run_seed=5, augment=True)
        losses = []
        for x, y in clf.training_batches(batches, torch.device("cpu"), 0):
            x = clf.to_model_input(x, torch.device("cpu"), True)
            assert x.is_contiguous(memory_format=torch.channels_last)
            losses.append(float(clf.train_step(model, opt, x, y, config=config)))
        assert all(np.isfinite(losses))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed: the same weights


def test_augmented_batches_do_not_depend_on_the_workers():
    data = _toy_images(12)
    order = clf.batch_order(len(data), 4, 5, torch.Generator().manual_seed(3))
    assert [len(b) for b in order] == [4] * 5 and sorted(torch.cat(order[:3]).tolist()) == list(range(12))
    made = []
    for workers in (0, 2):
        dataset = clf.AugmentedBatches(data, order, run_seed=11, augment=True)
        made.append(list(clf.training_batches(dataset, torch.device("cpu"), workers)))
    for (x0, y0), (x2, y2) in zip(*made):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert not torch.equal(made[0][0][0], made[0][3][0])  # each batch its own draw
    assert clf.batch_seed(11, 0) != clf.batch_seed(11, 1) != clf.batch_seed(12, 1)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet18-f37072fd.pth"
    torch.save({k: v for k, v in _toy_resnet().state_dict().items() if not k.startswith("fc.")}, path)
    return path


def test_train_one_run_is_reproducible_with_the_same_seed_and_any_workers(resnet_file):
    data = _toy_images(8)
    base = dict(steps=3, batch_size=4, size=32, runs=1, weights=str(resnet_file), eval_batch_size=8)
    results = [clf.train_one_run(data, data, data, clf.ClassifierConfig(**base, workers=w), seed=7) for w in (0, 0, 2)]
    dicts = [{k: v for k, v in vars(r).items() if k != "seconds"} for r in results]
    assert dicts[0] == dicts[1] == dicts[2]
    assert results[0].device == "cpu, fp32" and results[0].fingerprint == clf.ClassifierConfig(**base).fingerprint()


def test_fingerprint_leaves_out_how_a_run_is_executed():
    base = clf.ClassifierConfig()
    moved = clf.ClassifierConfig(device="cuda", workers=4, amp=False, channels_last=False)
    assert base.fingerprint() == moved.fingerprint() == "4d2e887080bb9231"  # the value before devices existed
    assert clf.ClassifierConfig(bf16=True).fingerprint() != base.fingerprint()


def test_precision_choices_per_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    amp = clf.ClassifierConfig()
    assert clf.precision_label(cuda, amp) == "cuda, fp16 autocast"
    assert clf.precision_label(cuda, clf.ClassifierConfig(amp=False)) == "cuda, fp32"
    assert clf.precision_label(cpu, clf.ClassifierConfig(bf16=True)) == "cpu, bf16 autocast"
    assert clf.precision_label(cpu, amp) == "cpu, fp32" and clf.grad_scaler_for(cpu, amp) is None
    assert isinstance(clf.autocast_for(cpu, amp), type(__import__("contextlib").nullcontext()))
    assert clf.autocast_for(cpu, clf.ClassifierConfig(bf16=True)).fast_dtype == torch.bfloat16


def test_estimate_is_measured_on_the_device_and_printed_as_h_mm_ss(tmp_path, resnet_file, monkeypatch):
    for split in ("train", "val", "test"):
        for label, cls in enumerate(("neg", "pos")):
            folder = tmp_path / "real" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                save_png(np.full((20, 20), 40 + 150 * label, np.uint8), folder / f"{i}.png")
    lines = []
    config = clf.ClassifierConfig(steps=6250, batch_size=2, size=32, runs=10, weights=str(resnet_file))
    loaded = _forbid(monkeypatch, clf, "train_one_run")
    report = clf.run_experiments(tmp_path / "real", [clf.parse_mix("all:0")], tmp_path / "o", config,
                                 log=lines.append, estimate_only=True)
    (line,) = [x for x in lines if x.startswith("time estimate:")]
    assert "10 run(s) to do" in line and "on cpu, fp32, 0 loader worker(s)" in line
    match = re.search(r"about (\d+):(\d\d):(\d\d) in all", line)
    h, m, s = map(int, match.groups())
    assert abs(h * 3600 + m * 60 + s - report["estimate_seconds"]) <= 1 and report["estimate_seconds"] > 0
    assert report["runs_to_do"] == 10 and loaded == [] and not (tmp_path / "o" / "report.json").exists()
    assert clf.format_duration(3725) == "1:02:05"


def test_an_estimate_of_days_is_written_in_days_hours_and_minutes(tmp_path, resnet_file, monkeypatch):
    """Was "about 3 d 23:00:03 (h:mm:ss)": a wrong unit label once days appear (issue 19)."""
    for split in ("train", "val", "test"):
        for label, cls in enumerate(("neg", "pos")):
            folder = tmp_path / "real" / split / cls
            folder.mkdir(parents=True)
            save_png(np.full((20, 20), 40 + 150 * label, np.uint8), folder / "0.png")
    monkeypatch.setattr(clf, "measure_step_seconds", lambda config: (3 * 86400 + 23 * 3600 + 3, 0.0))
    lines = []
    config = clf.ClassifierConfig(steps=1, batch_size=2, size=32, runs=1, weights=str(resnet_file))
    clf.run_experiments(tmp_path / "real", [clf.parse_mix("all:0")], tmp_path / "o", config,
                        log=lines.append, estimate_only=True)
    (line,) = [x for x in lines if x.startswith("time estimate:")]
    assert line.endswith("about 3 d 23 h 00 min in all") and "h:mm:ss" not in line


def test_step_estimate_overlaps_augmentation_with_loader_workers(monkeypatch, resnet_file):
    """With w workers a step takes max(device, augmentation / w); without, their sum."""
    clock = [0.0]
    monkeypatch.setattr(clf.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(clf, "heavy_augment", lambda x, c, g: clock.__setitem__(0, clock[0] + 0.3) or x)
    monkeypatch.setattr(clf, "train_step", lambda *a, **k: clock.__setitem__(0, clock[0] + 0.1))
    monkeypatch.setattr(clf, "predict", lambda *a, **k: None)
    base = dict(batch_size=2, size=32, weights=str(resnet_file))
    assert clf.measure_step_seconds(clf.ClassifierConfig(**base, workers=0))[0] == pytest.approx(0.4)
    assert clf.measure_step_seconds(clf.ClassifierConfig(**base, workers=2))[0] == pytest.approx(0.15)
    assert clf.measure_step_seconds(clf.ClassifierConfig(**base, workers=4))[0] == pytest.approx(0.1)


# --- the Evaluate tab's device -----------------------------------------------------------------------

def test_evaluate_tab_uses_the_hosts_device(tmp_path, monkeypatch):
    from medical_diffusion.devices import Runtime
    from medical_diffusion.ui.context import UIContext
    from medical_diffusion.ui.tab_evaluate import evaluation_device

    def ctx(**kw):
        return UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path, **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device(ctx()) == torch.device("cpu")
    assert evaluation_device(ctx(runtime=Runtime(torch.device("cuda"), torch.float16))) == torch.device("cuda")
    host = ctx(runtime=Runtime(torch.device("cuda"), torch.float16), evaluation_device=lambda: "cpu")
    assert evaluation_device(host) == torch.device("cpu")  # the host's own evaluation device wins


def test_webui_context_reads_modules_devices_device_at_use(monkeypatch):
    import sys

    from medical_diffusion.webui import tabs

    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.devices", types.SimpleNamespace(device=torch.device("cpu")))
    sys.modules["modules"].devices = sys.modules["modules.devices"]
    assert tabs.webui_device() == torch.device("cpu")
    sys.modules["modules.devices"].device = torch.device("meta")  # read at each use, not at start-up
    assert tabs.webui_device() == torch.device("meta")


def test_fid_handler_passes_the_context_device(tmp_path, monkeypatch):
    import gradio as gr

    from medical_diffusion.ui import tab_evaluate
    from medical_diffusion.ui.context import UIContext

    seen = {}

    def fake_compute_fid(real, generated, **kw):
        seen.update(kw)
        return types.SimpleNamespace(summary=lambda: "FID = 0", to_dict=dict)

    monkeypatch.setattr(fid, "compute_fid", fake_compute_fid)
    for name in ("r", "g"):
        (tmp_path / name).mkdir()
    ctx = UIContext(backend_factory=lambda: None, work_dir=tmp_path, embeddings_dir=tmp_path,
                    evaluation_device=lambda: torch.device("cpu"))
    with gr.Blocks() as blocks:
        tab_evaluate.build(ctx)
    do_fid = next(d.fn for d in blocks.fns if getattr(d.fn, "__name__", "") == "do_fid")
    do_fid(str(tmp_path / "r"), str(tmp_path / "g"), "inception", "", "paper", 0, "both", 0,
           progress=lambda *a, **k: None)
    assert seen["device"] == torch.device("cpu") and seen["workers"] is None
