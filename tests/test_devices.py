"""--device auto / --precision auto: what each resolves to, and one-line errors for what is not there."""

import argparse

import pytest
import torch

from medical_diffusion import devices
from medical_diffusion.errors import MedDiffError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("AUTO") == torch.device("cuda")


@pytest.mark.parametrize("name, needle", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                          ("mps", "MPS is not available"), ("tpu", "not a device"),
                                          ("gpu!", "not a device")])
def test_missing_device_is_a_one_line_error(no_gpu, name, needle):
    with pytest.raises(MedDiffError) as info:
        devices.resolve_device(name)
    assert needle in str(info.value) and "\n" not in str(info.value) and name in str(info.value)


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MedDiffError, match="only 1 CUDA device"):
        devices.resolve_device("cuda:3")
    assert devices.resolve_device("cuda:0") == torch.device("cuda:0")


def test_cpu_is_always_there(no_gpu):
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_weight_dtype_defaults_and_refusals():
    assert devices.weight_dtype(torch.device("cuda"), "auto") is torch.float16
    assert devices.weight_dtype(torch.device("cpu"), "auto") is torch.float32
    assert devices.weight_dtype(torch.device("mps"), "auto") is torch.float32
    assert devices.weight_dtype(torch.device("cuda"), "bf16") is torch.bfloat16
    assert devices.weight_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert devices.weight_dtype(torch.device("cuda"), "fp32") is torch.float32
    with pytest.raises(MedDiffError, match="fp16 on the CPU"):
        devices.weight_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(MedDiffError, match="use one of"):
        devices.weight_dtype(torch.device("cpu"), "int8")


def test_arguments_default_to_auto():
    parser = argparse.ArgumentParser()
    devices.add_device_arguments(parser)
    args = parser.parse_args([])
    assert (args.device, args.precision) == ("auto", "auto")
    assert devices.describe(torch.device("cpu"), torch.float32) == "cpu, weights float32"
