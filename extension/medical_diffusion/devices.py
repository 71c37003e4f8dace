"""Which torch device and weight precision a command runs on (``--device auto``, ``--precision auto``).

``auto`` picks CUDA, then Apple's MPS, then the CPU. Frozen model weights default to fp16 on
CUDA (the paper's consumer GPU has no fast bf16) and fp32 elsewhere; trained vectors and their
optimizer state always stay fp32, as A1111 keeps them.

torch is imported inside the functions, so that the command-line parser (:func:`add_device_arguments`)
stays light and ``meddiff --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medical_diffusion.errors import MedDiffError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: attention kernels: auto = torch's scaled-dot-product attention (flash / memory-efficient kernels)
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "classic")
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device ``name`` stands for; a device that is not there is a one-line error."""
    import torch

    text = "auto" if name is None else str(name).strip().lower()
    if text in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MedDiffError(f"--device {name}: not a device (use {DEVICE_CHOICES_HELP})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise MedDiffError(f"--device {name}: CUDA is not available ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MedDiffError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not _mps_available():
        raise MedDiffError(f"--device {name}: Apple MPS is not available on this machine; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MedDiffError(f"--device {name}: not supported (use {DEVICE_CHOICES_HELP})")
    return device


def weight_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of frozen weights: ``auto`` is fp16 on CUDA, fp32 on the CPU and MPS."""
    import torch

    key = (precision or "auto").lower()
    if key == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if key not in _DTYPE_NAMES:
        raise MedDiffError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and key == "fp16":
        raise MedDiffError("--precision fp16 on the CPU: half-precision matrix work is not supported well "
                           "there; use fp32 or bf16")
    return getattr(torch, _DTYPE_NAMES[key])


def describe(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """One line for the log: which device (with the GPU's name) and precision."""
    text = str(device)
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        text += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if dtype is not None:
        text += f", weights {str(dtype).replace('torch.', '')}"
    return text


def add_device_arguments(parser: argparse.ArgumentParser, *, precision: bool = True, attention: bool = False) -> None:
    """``--device`` (default auto), ``--precision`` unless ``precision`` is False, ``--attention`` if asked."""
    parser.add_argument("--device", default="auto", help=f"torch device: {DEVICE_CHOICES_HELP} (default: auto)")
    if precision:
        parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                            help="frozen weights' precision: auto = fp16 on CUDA, fp32 on CPU/MPS "
                                 "(trained vectors stay fp32)")
    if attention:
        parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                            help="attention kernel: auto = sdpa (torch's flash/memory-efficient attention), "
                                 "xformers (if installed), classic (diffusers' plain attention, most memory)")


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a command runs its model."""

    device: torch.device
    dtype: torch.dtype
    attention: str = "auto"

    def describe(self) -> str:
        return describe(self.device, self.dtype)


def resolve_runtime(device: str | torch.device | None = "auto", precision: str | None = "auto",
                    attention: str | None = "auto", *, announce: bool = True) -> Runtime:
    """Device, weight dtype and attention from command-line values, checked before any model loads.

    ``announce`` logs the one-line description (``device: cuda (NVIDIA ..., 8.0 GiB), weights float16``).
    CUDA runs also get TF32 matrix maths and cuDNN autotuning (:func:`configure_for_speed`).
    """
    dev = resolve_device(device)
    dtype = weight_dtype(dev, precision or "auto")
    mode = (attention or "auto").lower()
    if mode not in ATTENTION_CHOICES:
        raise MedDiffError(f"--attention {attention}: use one of {', '.join(ATTENTION_CHOICES)}")
    configure_for_speed(dev)
    runtime = Runtime(dev, dtype, mode)
    if announce:
        log.warning("device: %s", runtime.describe())
    return runtime


def runtime_from_args(args: argparse.Namespace, *, announce: bool = True) -> Runtime:
    """:func:`resolve_runtime` on the ``--device``/``--precision``/``--attention`` values of ``args``."""
    return resolve_runtime(getattr(args, "device", "auto"), getattr(args, "precision", "auto"),
                           getattr(args, "attention", "auto"), announce=announce)


def configure_for_speed(device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on CUDA (no effect elsewhere)."""
    if device.type != "cuda":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def release_cached_memory(device: torch.device) -> None:
    """Give the CUDA caching allocator's unused blocks back (after previews, VAE moves)."""
    if device.type != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
