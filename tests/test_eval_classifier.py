"""Augmentation, AUC/ROC, and the classifier experiment job end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medical_diffusion.cli import main
from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation import classifier as clf
from medical_diffusion.evaluation.augment import HeavyAugmentConfig, heavy_augment
from medical_diffusion.evaluation.roc import roc_auc, roc_curve, roc_figure
from medical_diffusion.png_io import save_png


def test_heavy_augment_keeps_shape_and_range_and_is_seeded():
    x = torch.rand(8, 3, 40, 36)
    a = heavy_augment(x, generator=torch.Generator().manual_seed(1))
    b = heavy_augment(x, generator=torch.Generator().manual_seed(1))
    c = heavy_augment(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, x.clone())  # input untouched


def test_heavy_augment_steps_do_what_they_say():
    x = torch.rand(4, 3, 16, 16)
    off = dict(p_flip=0, p_noise=0, p_gamma=0, p_affine=0, p_brightness_contrast=0, p_distortion=0,
               p_channel_dropout=0)
    assert torch.allclose(heavy_augment(x, HeavyAugmentConfig(**off)), x)
    flipped = heavy_augment(x, HeavyAugmentConfig(**{**off, "p_flip": 1.0}))
    assert torch.allclose(flipped, x.flip(-1))
    dropped = heavy_augment(x, HeavyAugmentConfig(**{**off, "p_channel_dropout": 1.0}))
    zero_channels = (dropped.flatten(2).amax(-1) == 0).sum(1)
    assert zero_channels.tolist() == [1, 1, 1, 1]
    gamma = heavy_augment(x, HeavyAugmentConfig(**{**off, "p_gamma": 1.0}))
    assert (gamma >= x - 1e-6).all()  # gamma <= 1 brightens values in [0, 1]
    # a centred blob stays roughly centred under shift/scale/rotate and distortion
    blob = torch.zeros(2, 1, 64, 64)
    blob[:, :, 28:36, 28:36] = 1
    moved = heavy_augment(blob, HeavyAugmentConfig(**{**off, "p_affine": 1.0, "p_distortion": 1.0}),
                          torch.Generator().manual_seed(0))
    ys, xs = torch.nonzero(moved[0, 0] > 0.5, as_tuple=True)
    assert abs(ys.float().mean() - 31.5) < 64 * 0.1 * 1.5 + 2 and abs(xs.float().mean() - 31.5) < 64 * 0.15 + 2


def test_auc_and_roc():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    # pairs (pos > neg): 0.35 beats 0.1, 0.2 -> 2; 0.8, 0.9 beat all 3 -> 6; total 8 of 9
    assert roc_auc(y, s) == pytest.approx(8 / 9)
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9) if hasattr(np, "trapezoid") else True
    with pytest.raises(MedDiffError, match="both"):
        roc_auc([1, 1], [0.2, 0.3])


def _pixels_near(fig, rgb: tuple) -> int:
    """How many pixels of the drawn figure are within 40 grey levels of ``rgb`` (0-1) in every channel."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    return int((np.abs(image - np.asarray(rgb) * 255).max(axis=-1) < 40).sum())


@pytest.mark.parametrize("n_mixes", [2, 5])
def test_roc_figure_shows_every_mix_when_curves_coincide(n_mixes):
    """The demo's `real` curve was hidden under an equal later one (issue 19): every mean curve must show."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    same = [([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], 0.875)] * 2  # every mix: the same two runs
    names = ["real", "real_plus_synthetic", "synthetic", "more", "most"][:n_mixes]
    fig = roc_figure({name: same for name in names})
    try:
        ax = fig.axes[0]
        means = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label().split(":")[0] for line in means] == names
        looks = [(line.get_linestyle(), line.get_marker()) for line in means]
        assert len(set(looks)) == n_mixes and len({to_rgb(line.get_color()) for line in means}) == n_mixes
        ax.get_legend().remove()  # the legend's swatches do not count: the curves themselves must show
        for line in means:
            assert _pixels_near(fig, to_rgb(line.get_color())) > 40, f"{line.get_label()} is hidden"
    finally:
        plt.close(fig)


def test_parse_mix():
    m = clf.parse_mix("200:2000", "/gen")
    assert (m.name, m.n_real, m.n_synthetic, m.synthetic_dir) == ("real200_syn2000", 200, 2000, "/gen")
    m = clf.parse_mix("star=0:2000:/gen10")
    assert (m.name, m.n_real, m.synthetic_dir) == ("star", 0, "/gen10")
    assert clf.parse_mix("all:0").n_real is None
    with pytest.raises(MedDiffError, match="--synthetic"):
        clf.parse_mix("200:10")
    with pytest.raises(MedDiffError, match="whole numbers"):
        clf.parse_mix("x:y")


def _write_split(root: Path, n_per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(("neg", "pos")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 80, (20, 20), dtype=np.uint8)
            if label:
                img[6:14, 6:14] += 150  # a bright lesion in positives
            save_png(img, root / cls / f"{cls}_{i:03d}.png")


@pytest.fixture(scope="module")
def random_resnet18_file(tmp_path_factory):
    """A random-init ResNet-18 state dict saved like the real ``resnet18-f37072fd.pth``."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    return weights


@pytest.fixture
def tiny_experiment(tmp_path, monkeypatch, random_resnet18_file):
    weights = random_resnet18_file
    for split, n in (("train", 6), ("val", 4), ("test", 4)):
        _write_split(tmp_path / "real" / split, n, hash(split) % 1000)
    _write_split(tmp_path / "gen", 6, 99)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path, weights


@pytest.mark.slow
def test_classifier_end_to_end_and_resume(tiny_experiment, monkeypatch):
    tmp_path, weights = tiny_experiment
    monkeypatch.setattr(clf, "measure_step_seconds", lambda config: (0.5, 0.01))  # measured for real in the CLI test
    config = clf.ClassifierConfig(steps=2, batch_size=4, size=32, runs=1, weights=str(weights), eval_batch_size=8)
    mixes = [clf.parse_mix("syn=4:4", str(tmp_path / "gen"))]
    logs, ticks = [], []
    report = clf.run_experiments(tmp_path / "real", mixes, tmp_path / "out", config,
                                 progress=lambda s, d, t: ticks.append((s, d, t)), log=logs.append)
    estimate = next(line for line in logs if line.startswith("time estimate:"))
    assert logs.index(estimate) < logs.index(next(line for line in logs if "run 1/1" in line))
    # 1 run x (2 steps x 0.5 s + 1 validation pass (8 images/batch 4 = 2 steps per epoch) x 8 x 0.01 s + 8 x 0.01 s)
    assert "about 1 s in all" in estimate
    assert report["runs_done_now"] == 1 and ticks[-1] == ("syn run 1", 2, 2)
    (summary,) = report["mixes"]
    assert summary["mix"] == "syn" and summary["runs"] == 1 and 0.0 <= summary["aucs"][0] <= 1.0
    out = tmp_path / "out"
    assert (out / "report.csv").read_text().splitlines()[0].startswith("mix,n_real,n_synthetic")
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "runs" / "syn" / "run_00.json").read_text())
    assert run["n_train"] == 8 and run["n_test"] == 8 and run["best_step"] == 2
    assert run["test_auc"] == summary["aucs"][0]

    # resume: the finished run is read back, only the new second run trains
    trained = []
    real_train = clf.train_one_run
    monkeypatch.setattr(clf, "train_one_run", lambda *a, **k: trained.append(a[6]) or real_train(*a, **k))
    config2 = clf.ClassifierConfig(steps=2, batch_size=4, size=32, runs=2, weights=str(weights), eval_batch_size=8)
    report2 = clf.run_experiments(tmp_path / "real", mixes, out, config2, log=logs.append)
    assert report2["runs_done_now"] == 1 and len(trained) == 1
    aucs = report2["mixes"][0]["aucs"]
    assert aucs[0] == summary["aucs"][0] and len(aucs) == 2
    assert report2["mixes"][0]["mean_auc"] == pytest.approx(np.mean(aucs))
    assert report2["mixes"][0]["sd_auc"] == pytest.approx(np.std(aucs, ddof=1))

    changed = clf.ClassifierConfig(steps=3, batch_size=4, size=32, runs=2, weights=str(weights))
    with pytest.raises(MedDiffError, match="different training settings"):
        clf.run_experiments(tmp_path / "real", mixes, out, changed, log=logs.append)


def test_resnet18_file_without_step_counters_loads(tmp_path, random_resnet18_file):
    state = torch.load(random_resnet18_file, weights_only=True)
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, tmp_path / "old.pth")
    model = clf.build_resnet18(tmp_path / "old.pth")
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and model.fc.out_features == 1
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(MedDiffError, match="partial.pth: not a torchvision ResNet-18"):
        clf.build_resnet18(tmp_path / "partial.pth")


def test_classifier_errors(tiny_experiment, tmp_path):
    root, weights = tiny_experiment
    config = clf.ClassifierConfig(steps=1, batch_size=4, size=32, runs=1)
    with pytest.raises(MedDiffError, match="resnet18-f37072fd.pth"):
        clf.run_experiments(root / "real", [clf.parse_mix("4:0")], root / "o", config)
    config.weights = str(weights)
    with pytest.raises(MedDiffError, match="only 6 available"):
        clf.run_experiments(root / "real", [clf.parse_mix("20:0")], root / "o", config, log=lambda s: None)
    with pytest.raises(MedDiffError, match="missing/val/neg: folder not found"):
        clf.run_experiments(root / "missing", [clf.parse_mix("4:0")], root / "o", config, log=lambda s: None)


@pytest.mark.slow
def test_cli_classify_estimate_and_quick_probe(tiny_experiment, capsys, monkeypatch):
    root, weights = tiny_experiment
    code = main(["classify", str(root / "real"), "--out", str(root / "o"), "--weights", str(weights),
                 "--mix", "4:0", "--steps", "2", "--runs", "1", "--size", "32", "--batch-size", "4",
                 "--estimate-only"])
    assert code == 0 and "time estimate: 1 run(s)" in capsys.readouterr().out
    code = main(["classify", str(root / "real"), "--out", str(root / "o"), "--weights", str(weights), "--table2",
                 "--runs", "1", "--size", "32", "--steps", "1", "--batch-size", "4", "--estimate-only"])
    assert code == 1 and "--synthetic" in capsys.readouterr().err  # the Table 2 rows need a synthetic set
    assert not (root / "o" / "report.json").exists()
    code = main(["classify", str(root / "real"), "--out", str(root / "q"), "--weights", str(weights),
                 "--mix", "4:0", "--mix", "4:4", "--synthetic", str(root / "gen"), "--size", "32", "--quick"])
    assert code == 0
    assert "NOT the paper's protocol" in capsys.readouterr().out
    data = json.loads((root / "q" / "quick_probe.json").read_text())
    assert "NOT the paper's protocol" in data["label"] and len(data["mixes"]) == 2
    assert all(0 <= m["test_auc"] <= 1 for m in data["mixes"])
    monkeypatch.setattr(clf, "measure_step_seconds", lambda config: (0.1, 0.01))  # measured for real above
    code = main(["classify", str(root / "real"), "--out", str(root / "c"), "--weights", str(weights),
                 "--mix", "4:0", "--steps", "1", "--runs", "1", "--size", "32", "--batch-size", "4"])
    assert code == 0 and "AUC (mean ± sd)" in capsys.readouterr().out
