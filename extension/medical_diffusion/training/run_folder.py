"""The training run folder: config, checkpoints with optimizer state, loss log and curve, previews.

Layout::

    run_config.json            settings that reproduce the run
    <name>.pt                  latest embedding (A1111 format)
    embeddings/<name>-<step>.pt        checkpoint (A1111 format, loads in the webui and diffusers)
    embeddings/<name>-<step>.pt.optim  optimizer state + exact vectors, for --resume

An SDXL run (``text_widths`` with ``clip_l``/``clip_g``) writes ``.safetensors`` with keys
``clip_l`` and ``clip_g`` instead of ``.pt`` (``<name>.safetensors``,
``embeddings/<name>-<step>.safetensors`` + ``.safetensors.optim``); the state file keeps the one
concatenated tensor the backend trains.
    loss.csv                   step,loss,lr,seconds (one line per step, flushed)
    loss.png                   loss curve (rewritten at each checkpoint)
    previews/<name>-<step>.png preview at a fixed seed

Every file except the append-only ``loss.csv`` is written atomically; the state file is
written before its ``.pt``, so a checkpoint whose ``.pt`` exists is complete. A torn last line
in ``loss.csv`` is dropped on resume.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medical_diffusion.atomic_io import atomic_path, atomic_write_text
from medical_diffusion.embeddings.safe_pickle import clean_detail, safe_torch_load
from medical_diffusion.errors import InputFileError, MedDiffError
from medical_diffusion.training.config import CONFIG_FILE, TrainConfig

log = logging.getLogger(__name__)

LOSS_HEADER = ["step", "loss", "lr", "seconds"]


@dataclass
class Checkpoint:
    step: int
    embedding_path: Path
    state_path: Path


class RunFolder:
    """Paths and file operations of one training run."""

    def __init__(self, root: str | Path, name: str, text_widths: dict[str, int] | None = None):
        from medical_diffusion.embeddings.vector_blocks import embedding_format, embedding_suffix

        self.root = Path(root)
        self.name = name
        #: the backend's vector blocks (None: one block, SD1/SD2) and the embedding files they give
        self.text_widths = dict(text_widths) if text_widths else None
        self.suffix = embedding_suffix(self.text_widths)
        self.embedding_format = embedding_format(self.text_widths)
        self.ckpt_dir = self.root / "embeddings"
        self.preview_dir = self.root / "previews"
        self.config_path = self.root / CONFIG_FILE
        self.loss_csv = self.root / "loss.csv"
        self.loss_png = self.root / "loss.png"
        self.latest_path = self.root / f"{name}{self.suffix}"
        self._loss_file: io.TextIOBase | None = None

    # -- setup ----------------------------------------------------------------------------
    def create(self, config: TrainConfig, force: bool = False) -> None:
        """Start a new run here; refuse to mix with an existing run unless ``force``."""
        if self.config_path.exists() and not force:
            raise MedDiffError(
                f"{self.root}: already holds a training run (resume it with --resume {self.root}, "
                "or choose another output folder, or --force to start over)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if force:
            for old in list(self.ckpt_dir.glob(f"*{self.suffix}")) + list(self.ckpt_dir.glob("*.optim")):
                old.unlink()
            self.loss_csv.unlink(missing_ok=True)
        self.write_config(config)

    def write_config(self, config: TrainConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config.to_json())

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_paths(self, step: int) -> Checkpoint:
        pt = self.ckpt_dir / f"{self.name}-{step}{self.suffix}"
        return Checkpoint(step, pt, pt.with_name(pt.name + ".optim"))

    def save_checkpoint(
        self, vectors: torch.Tensor, step: int, state: dict[str, Any], checkpoint_name: str | None = None,
        checkpoint_hash: str | None = None,
    ) -> Checkpoint:
        """Write optimizer/RNG state, then the A1111 ``.pt`` (SDXL: ``.safetensors``), then refresh
        ``<name>.pt``; the model's name and short hash go into the file as A1111 writes them."""
        ck = self.checkpoint_paths(step)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        vec = vectors.detach().to("cpu", torch.float32).clone()
        with atomic_path(ck.state_path) as tmp:
            torch.save(dict(state, step=step, vectors=vec), tmp)
        model = dict(step=step, sd_checkpoint=checkpoint_hash, sd_checkpoint_name=checkpoint_name)
        self._write_embedding(ck.embedding_path.stem, vec, ck.embedding_path, model)
        self._write_embedding(self.name, vec, self.latest_path, model)
        return ck

    def _write_embedding(self, name: str, vectors: torch.Tensor, path: Path, meta: dict[str, Any]) -> Path:
        """One embedding file of this run's family (A1111 ``.pt``, or SDXL ``clip_l``/``clip_g`` ``.safetensors``)."""
        from medical_diffusion.embeddings import Embedding, save_embedding
        from medical_diffusion.embeddings.vector_blocks import embedding_from_vectors

        if self.text_widths is None:
            emb = Embedding(name=name, vectors=vectors, **meta)
        else:
            emb = embedding_from_vectors(name, vectors, self.text_widths, **meta)
        return save_embedding(emb, path, fmt=self.embedding_format, force=True)

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints (``.pt`` and state present), oldest first."""
        pattern = re.compile(rf"^{re.escape(self.name)}-(\d+){re.escape(self.suffix)}$")
        found = []
        for path in self.ckpt_dir.glob(f"{self.name}-*{self.suffix}") if self.ckpt_dir.is_dir() else []:
            m = pattern.match(path.name)
            if m:
                ck = self.checkpoint_paths(int(m.group(1)))
                if ck.state_path.is_file():
                    found.append(ck)
        return sorted(found, key=lambda c: c.step)

    def load_latest(self) -> tuple[Checkpoint, dict[str, Any]] | None:
        """The newest readable checkpoint and its state, or None when there is none."""
        for ck in reversed(self.checkpoints()):
            try:
                state = safe_torch_load(ck.state_path)
            except Exception as exc:  # a damaged file: fall back to the previous checkpoint
                log.warning("%s: unreadable (%s); trying an older checkpoint", ck.state_path, clean_detail(exc))
                continue
            if not isinstance(state, dict) or "vectors" not in state or "optimizer" not in state:
                log.warning("%s: not a training state file; trying an older checkpoint", ck.state_path)
                continue
            return ck, state
        return None

    # -- loss log -------------------------------------------------------------------------
    def read_losses(self) -> list[tuple[int, float, float, float]]:
        rows = []
        if not self.loss_csv.is_file():
            return rows
        with open(self.loss_csv, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                try:
                    rows.append((int(row[0]), float(row[1]), float(row[2]), float(row[3])))
                except (ValueError, IndexError):
                    continue  # header or a torn last line
        return rows

    def truncate_losses(self, step: int) -> None:
        """Keep log lines up to ``step`` (after resuming from that checkpoint)."""
        rows = [r for r in self.read_losses() if r[0] <= step]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(LOSS_HEADER)
        writer.writerows(rows)
        atomic_write_text(self.loss_csv, buf.getvalue())

    def append_loss(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if self._loss_file is None:
            new = not self.loss_csv.exists()
            self._loss_file = open(self.loss_csv, "a", encoding="utf-8", newline="")
            if new:
                self._loss_file.write(",".join(LOSS_HEADER) + "\n")
        self._loss_file.write(f"{step},{loss:.8g},{lr:.8g},{seconds:.4f}\n")
        self._loss_file.flush()

    def close(self) -> None:
        if self._loss_file is not None:
            self._loss_file.close()
            self._loss_file = None

    def plot_losses(self) -> Path | None:
        """Write ``loss.png`` (raw loss and a moving average); None when nothing is logged."""
        rows = self.read_losses()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        steps = np.array([r[0] for r in rows])
        losses = np.array([r[1] for r in rows])
        window = max(1, min(100, len(losses) // 10))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.name}: training loss")
        ax.legend(loc="upper right")
        fig.tight_layout()
        with atomic_path(self.loss_png) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return self.loss_png

    def preview_path(self, step: int) -> Path:
        return self.preview_dir / f"{self.name}-{step}.png"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config of an existing run folder (clear error when it is not one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputFileError(run_dir, "run folder not found")
    return TrainConfig.load(run_dir / CONFIG_FILE)


#: settings a resumed run keeps from its ``run_config.json`` (changing them would mix two runs)
RESUME_FIXED = (
    "name", "data_dir", "model", "n_vectors", "init", "init_text", "init_random_scale", "seed", "resolution",
    "latents", "hflip", "mask", "mask_weight", "template_file",
)


def _same(key: str, old: Any, new: Any) -> bool:
    if key in ("data_dir", "mask", "template_file") and old and new and new != "alpha":
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return old == new


def resume_differences(saved: TrainConfig, requested: dict[str, Any]) -> list[str]:
    """``"key (run: old, asked: new)"`` for every fixed setting ``requested`` would change; an empty
    ``data_dir`` means "the run's own"."""
    out = []
    for key in RESUME_FIXED:
        if key not in requested or (key == "data_dir" and not requested[key]):
            continue
        old, new = getattr(saved, key), requested[key]
        if not _same(key, old, new):
            out.append(f"{key} (run: {old!r}, asked: {new!r})")
    return out


def resume_config(run_dir: str | Path, requested: TrainConfig | dict[str, Any]) -> TrainConfig:
    """The config to resume ``run_dir`` with: its ``run_config.json`` with the settings that may change
    (steps, learning rate, previews ...) taken from ``requested``. Refuses (:class:`MedDiffError`) when
    ``requested`` changes a setting the run is defined by (name, vectors, data, resolution ...), so a
    resume never overwrites another run's config or log. One check for the API, the tab and the loop."""
    saved = load_run_config(run_dir)
    values = requested.to_dict() if isinstance(requested, TrainConfig) else dict(requested)
    diffs = resume_differences(saved, values)
    if diffs:
        raise MedDiffError(
            f"{Path(run_dir) / CONFIG_FILE}: resuming keeps the run's own {', '.join(diffs)}; "
            "give the run's values (or leave them out), or start a new run in another folder"
        )
    merged = saved.to_dict()
    merged.update({k: v for k, v in values.items() if k not in RESUME_FIXED})
    return TrainConfig.from_dict(merged)
