"""FID pipeline: preprocessing modes, weight lookup, feature cache, compute_fid and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medical_diffusion.cli import main
from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation import weights as w
from medical_diffusion.evaluation.feature_cache import FeatureCache
from medical_diffusion.evaluation.features import FeatureExtractor, collect_images, extract_features
from medical_diffusion.evaluation.fid import compute_fid, save_real_stats
from medical_diffusion.evaluation.frechet import frechet_distance
from medical_diffusion.evaluation.preprocessing import prepare_array, resize_bilinear_tf1, zscore_to_uint8
from medical_diffusion.png_io import save_png


def test_tf1_bilinear_resize_semantics():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    down = resize_bilinear_tf1(x, 2)  # TF1 samples source index 2*i, no half-pixel shift
    assert torch.equal(down, x[..., ::2, ::2])
    row = torch.tensor([[[[0.0, 10.0]]]])
    up = resize_bilinear_tf1(row, (1, 4))  # src = i * 0.5 -> 0, 0.5, 1, 1.5 (clamped)
    assert up.flatten().tolist() == [0.0, 5.0, 10.0, 10.0]


def test_paper_zscore_truncates():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    z = (a - a.mean()) / a.std()
    expected = np.clip(z * 64 + 128, 0, 255)
    out = zscore_to_uint8(a)
    assert out.dtype == np.uint8
    assert out.tolist() == np.floor(expected).astype(int).tolist()  # truncation, not rounding
    assert zscore_to_uint8(np.full((3, 3), 7.0)).tolist() == [[128] * 3] * 3


def test_modes_give_network_inputs():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    paper, clean = prepare_array(rgb, 32, "paper"), prepare_array(rgb, 32, "clean")
    for t in (paper, clean):
        assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 255
    assert not torch.equal(paper, clean)
    with pytest.raises(MedDiffError, match="unknown preprocessing"):
        prepare_array(rgb, 32, "fancy")


def test_paper_mode_keeps_16_bit_range(tmp_path):
    from PIL import Image

    from medical_diffusion.evaluation.preprocessing import load_for_network

    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)  # up to ~61000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = load_for_network(tmp_path / "deep.png", 32, "paper")
    expected = prepare_array(np.repeat(deep[:, :, None].astype(np.float64), 3, axis=2), 32, "paper")
    assert torch.equal(got, expected) and got.max() > 200 and got.min() < 50
    with pytest.raises(MedDiffError, match="deep.png.*8-bit"):
        load_for_network(tmp_path / "deep.png", 32, "clean")
    with pytest.raises(MedDiffError, match="absent.png"):
        load_for_network(tmp_path / "absent.png", 32, "paper")


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(w, "fid_helper_weights", lambda: None)
    with pytest.raises(w.MissingWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth.*th/hub/checkpoints"):
        w.find_inception_weights()
    with pytest.raises(w.MissingWeightsError, match=r"resnet18-f37072fd\.pth"):
        w.find_resnet18_weights()
    with pytest.raises(w.MissingWeightsError, match=r"RadImageNet-ResNet50_notop\.pth.*notop\.h5 works too"):
        w.find_radimagenet_weights()
    with pytest.raises(MedDiffError, match="nothere.pth"):
        w.find_resnet18_weights(tmp_path / "nothere.pth")
    cached = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert w.find_resnet18_weights() == cached


def test_inception_lookup_prefers_user_then_fid_helper(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    user = tmp_path / "mine.pth"
    user.write_bytes(b"x")
    assert w.find_inception_weights(user) == user
    helper = tmp_path / "default_1.pt"
    helper.write_bytes(b"x")
    monkeypatch.setattr(w, "fid_helper_weights", lambda: helper)
    assert w.find_inception_weights() == helper


class CountingNet(torch.nn.Module):
    """Tiny deterministic feature network that counts the images it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x / 255)), 2).flatten(1)


def make_images(folder: Path, n: int, seed: int, bright: float = 0.0, sub: str = "") -> list:
    rng = np.random.default_rng(seed)
    (folder / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.clip(rng.normal(100 + bright, 40, (24, 24)), 0, 255).astype(np.uint8)
        img[: 8 + i % 5, :] = 255 - img[: 8 + i % 5, :]  # some structure that differs between images
        p = folder / sub / f"im_{i:03d}.png"
        save_png(img, p)
        paths.append(p)
    return paths


def test_feature_cache_computes_each_image_once(tmp_path):
    paths = make_images(tmp_path / "real", 6, 0)
    ext = FeatureExtractor("counting", CountingNet(), 32, "w" * 64)
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(paths, ext, "paper", batch_size=4, cache=cache)
    assert ext.model.seen == 6 and first.features.shape == (6, 32)
    second = extract_features(paths, ext, "paper", batch_size=4, cache=cache)
    assert ext.model.seen == 6
    np.testing.assert_array_equal(first.features, second.features)
    extract_features(paths, ext, "clean", batch_size=4, cache=cache)  # another mode: another key
    assert ext.model.seen == 12
    save_png(np.zeros((24, 24), np.uint8), paths[0])  # content changed: recomputed
    extract_features(paths, ext, "paper", batch_size=4, cache=cache)
    assert ext.model.seen == 13


def test_extract_features_skips_broken_files(tmp_path):
    paths = make_images(tmp_path / "set", 3, 1)
    broken = tmp_path / "set" / "broken.png"
    broken.write_bytes(b"not a png")
    ext = FeatureExtractor("counting", CountingNet(), 32, "w" * 64)
    fs = extract_features(paths + [broken], ext, "paper")
    assert fs.features.shape[0] == 3
    assert fs.failures and "broken.png" in fs.failures[0]["path"]


def test_compute_fid_with_injected_extractor(tmp_path):
    make_images(tmp_path / "real", 12, 0, sub="neg")
    make_images(tmp_path / "real", 12, 1, sub="pos")
    make_images(tmp_path / "gen", 20, 2, bright=60)
    assert len(collect_images(tmp_path / "real")) == 24
    ext = FeatureExtractor("counting", CountingNet(), 32, "w" * 64)
    stages = []
    res = compute_fid(tmp_path / "real", tmp_path / "gen", ext, mode="clean", bootstrap_reps=30, seed=1,
                      progress=lambda s, d, t: stages.append(s))
    assert res.preprocessing == "clean" and "bicubic" in res.preprocessing_detail
    assert res.n_real == 24 and res.n_generated == 20 and res.value > 0
    assert res.bootstrap["reps"] == 30 and res.bootstrap["resampled"] == "both"
    assert res.bootstrap["low"] <= res.bootstrap["high"]
    assert {"features: real", "features: generated", "bootstrap"} <= set(stages)
    feats_r = extract_features(collect_images(tmp_path / "real"), ext, "clean").features
    feats_g = extract_features(collect_images(tmp_path / "gen"), ext, "clean").features
    assert res.value == pytest.approx(frechet_distance(feats_r, feats_g), rel=1e-9)
    stats = save_real_stats(tmp_path / "real", tmp_path / "real.npz", ext, mode="clean")
    from_stats = compute_fid(stats, tmp_path / "gen", ext, mode="clean")
    assert from_stats.value == pytest.approx(res.value, rel=1e-5)
    assert from_stats.method.startswith("statistics")
    with pytest.raises(MedDiffError, match="bootstrap needs the real images"):
        compute_fid(stats, tmp_path / "gen", ext, mode="clean", bootstrap_reps=5)
    with pytest.raises(MedDiffError, match="real.npz: statistics were made with counting-.*-clean"):
        compute_fid(stats, tmp_path / "gen", ext, mode="paper")


def test_cli_fid_mfid_with_converted_tiny_radimagenet(tmp_path, capsys):
    from medical_diffusion.evaluation.radimagenet import RadImageNetResNet50

    from test_eval_networks import _write_keras_h5

    torch.manual_seed(0)
    _write_keras_h5(tmp_path / "tiny.h5", RadImageNetResNet50(base_width=4).eval())
    assert main(["convert-radimagenet", str(tmp_path / "tiny.h5"), str(tmp_path / "tiny.pth")]) == 0
    assert main(["convert-radimagenet", str(tmp_path / "tiny.h5"), str(tmp_path / "tiny.pth")]) == 1  # exists
    make_images(tmp_path / "real", 8, 0)
    make_images(tmp_path / "gen", 8, 3, bright=40)
    out = tmp_path / "mfid.json"
    code = main(["fid", str(tmp_path / "real"), str(tmp_path / "gen"), "--mfid", "--radimagenet-weights",
                 str(tmp_path / "tiny.pth"), "--bootstrap", "20", "--resample", "generated", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MFID = " in printed and "resampled: generated" in printed and "preprocessing=paper" in printed
    result = json.loads(out.read_text())
    assert result["metric"] == "MFID" and result["preprocessing"] == "paper" and result["n_real"] == 8
    assert result["bootstrap"]["resampled"] == "generated" and result["bootstrap"]["reps"] == 20


def test_cli_fid_missing_weights_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(w, "fid_helper_weights", lambda: None)
    make_images(tmp_path / "real", 3, 0)
    assert main(["fid", str(tmp_path / "real"), str(tmp_path / "real")]) == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
