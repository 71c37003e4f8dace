"""RadImageNet ResNet50 (Keras-style) feature network and the Keras ``.h5`` -> PyTorch converter.

Keras ResNet50 differs from torchvision's: the stride sits in each stage's first 1x1 conv, every
conv has a bias and BatchNorm uses eps 1.001e-5. Module names follow the PyTorch port
``RadImageNet-ResNet50_notop.pth`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ``...downsample.0``),
so that file loads directly. Input: 224x224 RGB on the 0-255 scale; the network flips to BGR and
subtracts the ImageNet means [103.939, 116.779, 123.68], as Keras' ``caffe`` preprocessing did.
Output: 2048-d global-average-pooled features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medical_diffusion.atomic_io import atomic_path
from medical_diffusion.errors import InputFileError

INPUT_SIZE = 224
FEATURE_DIM = 2048
BN_EPS = 1.001e-5
BGR_MEAN = (103.939, 116.779, 123.68)
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)


class KerasBottleneck(nn.Module):
    """Keras ``block1``: 1x1 (strided) -> 3x3 -> 1x1, convs with bias, optional projection shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(width * 4, eps=BN_EPS)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, width * 4, 1, stride=stride, bias=True),
                                         nn.BatchNorm2d(width * 4, eps=BN_EPS)) if project else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + shortcut)


class RadImageNetResNet50(nn.Module):
    """``(N, 3, 224, 224)`` RGB 0-255 floats -> ``(N, 2048)`` pooled features.

    ``base_width`` (64 in ResNet50) scales every layer; tests use tiny widths with the same names.
    """

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        self.base_width = base_width
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(base_width, eps=BN_EPS)
        in_ch = base_width
        for i, (width, blocks, stride) in enumerate(STAGES, start=1):
            width = width * base_width // 64
            layers = []
            for b in range(blocks):
                layers.append(KerasBottleneck(in_ch, width, stride if b == 0 else 1, project=(b == 0)))
                in_ch = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(1) - self.bgr_mean.to(x.dtype)  # RGB -> BGR, caffe-style mean subtraction
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)  # Keras: ZeroPadding2D(1) + MaxPool(3, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --- Keras .h5 -> state dict --------------------------------------------------------------------

def keras_layer_names() -> Dict[str, str]:
    """Keras layer name -> PyTorch module prefix (``conv2_block1_0_conv`` -> ``layer1.0.downsample.0``)."""
    names = {"conv1_conv": "conv1", "conv1_bn": "bn1"}
    for s, (_, blocks, _) in enumerate(STAGES, start=2):
        for b in range(1, blocks + 1):
            base = f"layer{s - 1}.{b - 1}"
            for j in (1, 2, 3):
                names[f"conv{s}_block{b}_{j}_conv"] = f"{base}.conv{j}"
                names[f"conv{s}_block{b}_{j}_bn"] = f"{base}.bn{j}"
            if b == 1:
                names[f"conv{s}_block{b}_0_conv"] = f"{base}.downsample.0"
                names[f"conv{s}_block{b}_0_bn"] = f"{base}.downsample.1"
    return names


_KERAS_PARAMS = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                 "moving_mean": "running_mean", "moving_variance": "running_var"}


def _h5_layer_arrays(h5file) -> Dict[str, Dict[str, np.ndarray]]:
    """{layer name: {param ('kernel', 'gamma', ...): array}} from a Keras weights or full-model file."""
    import h5py

    root = h5file["model_weights"] if "model_weights" in h5file else h5file
    layers: Dict[str, Dict[str, np.ndarray]] = {}
    for layer_name in root.keys():
        found: Dict[str, np.ndarray] = {}

        def visit(name, obj, found=found):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiu":  # numbers only, never objects
                leaf = name.split("/")[-1].split(":")[0]
                found[leaf] = np.asarray(obj)

        root[layer_name].visititems(visit)
        if found:
            layers[layer_name] = found
    return layers


def convert_keras_h5(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read an official RadImageNet Keras ResNet50 ``.h5`` and return a state dict for this module."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layers = _h5_layer_arrays(f)
    except OSError as exc:
        raise InputFileError(path, f"not a readable HDF5 file ({exc})") from exc
    state: Dict[str, torch.Tensor] = {}
    for keras_name, prefix in keras_layer_names().items():
        arrays = layers.get(keras_name)
        if arrays is None:
            raise InputFileError(path, f"Keras layer '{keras_name}' not found (is this a Keras ResNet50 file?)")
        for param, value in arrays.items():
            if param not in _KERAS_PARAMS:
                continue
            if param == "kernel":
                value = value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
            state[f"{prefix}.{_KERAS_PARAMS[param]}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    _check_state(state, path)
    return state


def base_width_of(state: Dict[str, torch.Tensor]) -> int:
    """The ``base_width`` a state dict was made for (64 for the real network)."""
    w = state.get("conv1.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 4 else 64


def _check_state(state: Dict[str, torch.Tensor], path) -> None:
    wanted = RadImageNetResNet50(base_width_of(state)).state_dict()
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputFileError(path, f"not a RadImageNet ResNet50 state dict (missing {missing[0]}, "
                                   f"{len(missing)} keys in all)")
    for k, v in wanted.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise InputFileError(path, f"shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(v.shape)}")


def save_converted(h5_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert a Keras ``.h5`` to a PyTorch state dict file (atomic write)."""
    state = convert_keras_h5(h5_path)
    with atomic_path(out_path) as tmp:
        torch.save(state, tmp)
    return Path(out_path)


def load_radimagenet_state(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """State dict from the ``.pth`` port or (converted in memory) a Keras ``.h5``."""
    p = Path(path)
    if p.suffix.lower() in (".h5", ".hdf5", ".keras"):
        return convert_keras_h5(p)
    from medical_diffusion.evaluation.weights import read_state_dict

    state = read_state_dict(p, "RadImageNet")
    if not isinstance(state, dict):
        raise InputFileError(p, "not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    _check_state(state, p)
    return state


def build_radimagenet(path: str | os.PathLike | None = None,
                      state: Dict[str, torch.Tensor] | None = None) -> RadImageNetResNet50:
    """An eval-mode :class:`RadImageNetResNet50` with weights from ``path`` or ``state``."""
    if state is None and path is not None:
        state = load_radimagenet_state(path)
    model = RadImageNetResNet50(base_width_of(state) if state is not None else 64)
    if state is not None:
        wanted = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    return model.eval()
