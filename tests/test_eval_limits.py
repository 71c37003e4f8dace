"""Numeric inputs of the evaluation jobs are bounded, and bad paths fail before any weights load."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medical_diffusion.cli import main
from medical_diffusion.errors import MedDiffError
from medical_diffusion.evaluation import fid as fid_module
from medical_diffusion.evaluation import features, limits
from medical_diffusion.evaluation import weights as w
from medical_diffusion.evaluation.bootstrap import bootstrap_frechet
from medical_diffusion.evaluation.classifier import ClassifierConfig, parse_mix, run_experiments

from test_eval_fid import make_images


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any attempt to locate or load a feature network fails the test."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model/weights load was attempted")

    for target, name in ((fid_module, "load_extractor"), (features, "load_extractor"),
                         (w, "find_inception_weights"), (w, "find_radimagenet_weights"), (w, "read_state_dict")):
        monkeypatch.setattr(target, name, forbidden)
    yield calls
    assert not calls


@pytest.mark.parametrize("kwargs, message", [
    ({"bootstrap_reps": limits.MAX_BOOTSTRAP_REPS + 1}, f"bootstrap_reps must be between 0 and {limits.MAX_BOOTSTRAP_REPS}"),
    ({"bootstrap_reps": -1}, "bootstrap_reps must be between"),
    ({"bootstrap_reps": 2.5}, "bootstrap_reps must be a whole number"),
    ({"bootstrap_reps": math.nan}, "bootstrap_reps must be a whole number"),
    ({"bootstrap_reps": "10"}, "bootstrap_reps must be a whole number"),
    ({"batch_size": 0}, "batch_size must be between 1 and 1024"),
    ({"batch_size": 10**9}, "batch_size must be between"),
    ({"seed": -5}, "seed must be between"),
    ({"confidence": 1.0}, "confidence must be between 0 and 1"),
    ({"resample": "neither"}, "resample must be one of"),
])
def test_compute_fid_bounds_checked_before_any_load(tmp_path, no_weights_load, kwargs, message):
    make_images(tmp_path / "real", 3, 0)
    make_images(tmp_path / "gen", 3, 1)
    with pytest.raises(MedDiffError, match=message):
        fid_module.compute_fid(tmp_path / "real", tmp_path / "gen", **kwargs)


def test_bootstrap_reps_bounded():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(MedDiffError, match=f"between 1 and {limits.MAX_BOOTSTRAP_REPS}"):
        bootstrap_frechet(x, x, reps=limits.MAX_BOOTSTRAP_REPS + 1)
    with pytest.raises(MedDiffError, match=f"between 1 and {limits.MAX_BOOTSTRAP_REPS}"):
        bootstrap_frechet(x, x, reps=0)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be between 1"), ({"steps": limits.MAX_CLASSIFIER_STEPS + 1}, "steps must be"),
    ({"runs": 10**6}, "runs must be between 1 and 1000"), ({"batch_size": 0}, "batch size must be"),
    ({"size": 16}, "size must be between 32 and 1024"), ({"size": 5000}, "size must be between"),
    ({"lr": 0.0}, "lr must be above 0"), ({"lr": math.inf}, "lr must be above 0"),
    ({"eval_batch_size": 10**7}, "eval batch size must be"),
])
def test_classifier_settings_bounded(tmp_path, change, message):
    config = ClassifierConfig(**change)
    with pytest.raises(MedDiffError, match=message):
        run_experiments(tmp_path / "missing", [parse_mix("all:0")], tmp_path / "out", config, log=lambda m: None)


def test_mix_counts_bounded():
    with pytest.raises(MedDiffError, match="counts must be between 0 and"):
        parse_mix(f"{limits.MAX_MIX_IMAGES + 1}:0")
    with pytest.raises(MedDiffError, match="counts must be between 0 and"):
        parse_mix("all:-3", "syn")


@pytest.mark.parametrize("argv, message", [
    (["fid", "R", "G", "--bootstrap", str(limits.MAX_BOOTSTRAP_REPS + 1)],
     f"--bootstrap: expected a whole number from 0 to {limits.MAX_BOOTSTRAP_REPS}"),
    (["fid", "R", "G", "--batch-size", "0"], "--batch-size: expected a whole number from 1 to 1024"),
    (["classify", "R", "--out", "O", "--steps", "-1"], "--steps: expected a whole number from 1"),
    (["classify", "R", "--out", "O", "--runs", "x"], "--runs: expected a whole number from 1 to 1000"),
    (["classify", "R", "--out", "O", "--size", "8"], "--size: expected a whole number from 32 to 1024"),
])
def test_cli_rejects_out_of_range_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_fid_cli_missing_folder_fails_fast_without_loading(tmp_path, no_weights_load, capsys):
    make_images(tmp_path / "gen", 3, 1)
    assert main(["fid", str(tmp_path / "nope"), str(tmp_path / "gen")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: not a folder" in err and "\n" == err[-1] and err.count("\n") == 1
    assert main(["fid", str(tmp_path / "gen"), str(tmp_path / "nope2")]) == 1
    assert "nope2: not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["fid", str(tmp_path / "gen"), str(tmp_path / "empty")]) == 1
    assert "empty: no images found" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "stats.npz"), str(tmp_path / "gen")]) == 1
    assert "stats.npz: statistics file not found" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "nope"), "--save-real-stats", str(tmp_path / "s.npz")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_fid_cli_missing_weights_file_fails_before_the_network_loads(tmp_path, monkeypatch, capsys):
    from medical_diffusion.evaluation import inception

    built = []
    monkeypatch.setattr(inception, "build_inception", lambda *a, **k: built.append(a))
    make_images(tmp_path / "real", 3, 0)
    assert main(["fid", str(tmp_path / "real"), str(tmp_path / "real"), "--inception-weights",
                 str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth: weights file not found" in capsys.readouterr().err
    assert not built
