"""PatchCamelyon: N negative + N positive 96x96 patches (seeded) upsampled to 512x512 RGB."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medical_diffusion.datasets.batch import BatchOptions, BatchResult, ProgressCallback, options_to_json, run_batch
from medical_diffusion.datasets.layout import plan_outputs
from medical_diffusion.datasets.splits import Candidate, select_items
from medical_diffusion.errors import InputFileError, MedDiffError


#: options that change the pixels of an item (a change redoes finished items on a re-run)
PIXEL_OPTIONS = ("size",)

@dataclass
class PcamOptions(BatchOptions):
    """Options for :func:`prepare_pcam` (defaults = the paper: 100 + 100 from the training file)."""

    x: str
    y: str
    n_per_class: int | None = field(default=100, kw_only=True)


def _check_h5(path: str | os.PathLike, dataset: str):
    import h5py

    path = Path(path)
    if str(path).endswith(".gz"):
        raise InputFileError(path, "gzip-compressed HDF5: gunzip it first (e.g. `gunzip -k FILE`)")
    if not path.is_file():
        raise InputFileError(path, "no such file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(path, f"not a readable HDF5 file ({exc})") from exc
    if dataset not in fh:
        found = sorted(fh.keys())
        fh.close()
        raise InputFileError(path, f"no HDF5 dataset {dataset!r} (found {found})")
    return fh


def read_labels(x_path: str | os.PathLike, y_path: str | os.PathLike) -> np.ndarray:
    """The 0/1 label of every patch; checks the x/y shapes."""
    with _check_h5(x_path, "x") as fx, _check_h5(y_path, "y") as fy:
        x, y = fx["x"], fy["y"]
        if x.ndim != 4 or x.shape[1:] != (96, 96, 3) or x.dtype != np.uint8:
            raise InputFileError(x_path, f"dataset x should be (N, 96, 96, 3) uint8, found {x.shape} {x.dtype}")
        if y.shape[0] != x.shape[0]:
            raise InputFileError(y_path, f"{y.shape[0]} labels for {x.shape[0]} patches in {x_path}")
        raw = np.asarray(y[:]).reshape(y.shape[0], -1)[:, 0]
        if raw.dtype == np.bool_:
            raw = raw.astype(np.uint8)
        if not np.issubdtype(raw.dtype, np.number):
            raise InputFileError(y_path, f"labels must be numbers 0 or 1, found dtype {raw.dtype}")
        bad = np.flatnonzero(~np.isin(raw, (0, 1)))  # 0.9, -1, NaN ...: never rounded or truncated
        if bad.size:
            i = int(bad[0])
            raise InputFileError(y_path, f"labels must be 0 or 1: index {i} holds {raw[i]!s}"
                                         + (f" ({bad.size} such labels)" if bad.size > 1 else ""))
        return raw.astype(np.int64)


def process_patch(x_path: str, index: int, size: int = 512) -> tuple[np.ndarray, dict]:
    """Patch ``index`` of ``x_path`` upsampled (Lanczos) to ``size x size``."""
    import h5py

    with h5py.File(x_path, "r") as fh:
        patch = np.asarray(fh["x"][index])
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.LANCZOS)), {"slice": ""}


def _process(payload: tuple[str, int, int]) -> tuple[np.ndarray, dict]:
    return process_patch(*payload)


def prepare_pcam(options: PcamOptions, progress: ProgressCallback | None = None) -> BatchResult:
    """Sample and upsample PCam patches into ``options.out`` (resumable)."""
    options.check_common()
    labels = read_labels(options.x, options.y)
    width = len(str(len(labels)))
    candidates = [Candidate(f"pcam_{i:0{width}d}", "pos" if v else "neg", f"pcam_{i:0{width}d}")
                  for i, v in enumerate(labels)]
    selected = select_items(candidates, options.n_per_class, tuple(options.splits), options.seed, ("neg", "pos"))
    planned = plan_outputs(selected, options.neutral_names)
    payloads = {}
    for item in planned:
        idx = int(item.candidate.key.split("_")[1])
        payloads[item.candidate.key] = (f"{options.x}[{idx}]", (str(options.x), idx, options.size))
    return run_batch(planned, payloads, _process, options.out, options_to_json(options), workers=options.workers,
                     progress=progress, contact_sheet_title="PatchCamelyon" if options.contact_sheet else None,
                     pixel_options_json=options_to_json(options, only=PIXEL_OPTIONS),
                     provenance=options.provenance)
