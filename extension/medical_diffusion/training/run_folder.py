"""The training run folder: config, checkpoints with optimizer state, loss log and curve, previews.

Layout::

    run_config.json            settings that reproduce the run
    <name>.pt                  latest embedding (A1111 format)
    embeddings/<name>-<step>.pt        checkpoint (A1111 format, loads in the webui and diffusers)
    embeddings/<name>-<step>.pt.optim  optimizer state + exact vectors, for --resume
    loss.csv                   step,loss,lr,seconds (one line per step, flushed)
    loss.png                   loss curve (rewritten at each checkpoint; validation loss beside it)
    previews/<name>-<step>.png preview at a fixed seed

With the options on, also::

    val_loss.csv               step,val_loss (validation)
    best.pt, best.json         the vectors with the lowest validation loss so far, their step and loss
    <name>-ema.pt              EMA of the vectors (rewritten at each checkpoint)
    tensorboard/               TensorBoard event files

Every file except the append-only ``loss.csv``/``val_loss.csv`` is written atomically; the state file is
written before its ``.pt``, so a checkpoint whose ``.pt`` exists is complete (``best.json`` likewise
after ``best.pt``). A torn last line in a ``.csv`` is dropped on resume.

An SDXL run (``text_widths`` with ``clip_l``/``clip_g``) writes every embedding file as ``.safetensors``
with keys ``clip_l`` and ``clip_g`` instead of ``.pt`` (``<name>.safetensors``, ``best.safetensors``,
``embeddings/<name>-<step>.safetensors`` + ``.safetensors.optim``); the state file keeps the one
concatenated tensor the backend trains.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
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
VAL_HEADER = ["step", "val_loss"]


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
        self.val_csv = self.root / "val_loss.csv"
        self.best_meta_path = self.root / "best.json"
        self.tensorboard_dir = self.root / "tensorboard"
        self._loss_file: io.TextIOBase | None = None
        self._val_file: io.TextIOBase | None = None

    @property
    def best_path(self) -> Path:
        """The embedding with the lowest validation loss so far."""
        return self.root / f"best{self.suffix}"

    @property
    def ema_path(self) -> Path:
        """The EMA of the vectors, rewritten at each checkpoint."""
        return self.root / f"{self.name}-ema{self.suffix}"

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
            for suffix in (".pt", ".safetensors", ".optim"):  # both families' files: --force starts over
                for old in self.ckpt_dir.glob(f"*{suffix}"):
                    old.unlink()
            for old in (self.loss_csv, self.val_csv, self.best_meta_path):
                old.unlink(missing_ok=True)
            for stem in (self.name, "best", f"{self.name}-ema"):
                for suffix in (".pt", ".safetensors"):
                    (self.root / f"{stem}{suffix}").unlink(missing_ok=True)
            for old in self.tensorboard_dir.glob("events.out.tfevents.*") if self.tensorboard_dir.is_dir() else []:
                old.unlink()
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
        self.write_embedding(vec, ck.embedding_path, step, checkpoint_name, checkpoint_hash)
        self.write_embedding(vec, self.latest_path, step, checkpoint_name, checkpoint_hash)
        return ck

    def write_embedding(self, vectors: torch.Tensor, path: Path, step: int, checkpoint_name: str | None = None,
                        checkpoint_hash: str | None = None) -> Path:
        """Write ``vectors`` as an embedding file of this run's family at ``path`` (A1111 ``.pt``, or SDXL
        ``clip_l``/``clip_g`` ``.safetensors``; atomically; the stored name is the file stem).

        Every embedding file of a run (checkpoints, latest, best, EMA) is written here."""
        from medical_diffusion.embeddings import Embedding, save_embedding
        from medical_diffusion.embeddings.vector_blocks import embedding_from_vectors

        vec = vectors.detach().to("cpu", torch.float32).clone()
        meta = dict(step=step, sd_checkpoint=checkpoint_hash, sd_checkpoint_name=checkpoint_name)
        name = Path(path).stem
        if self.text_widths is None:  # SD1/SD2: an A1111 .pt
            emb = Embedding(name=name, vectors=vec, **meta)
        else:  # SDXL: clip_l/clip_g .safetensors
            emb = embedding_from_vectors(name, vec, self.text_widths, **meta)
        return save_embedding(emb, path, fmt=self.embedding_format, force=True)

    # -- best by validation loss ----------------------------------------------------------
    def save_best(self, vectors: torch.Tensor, step: int, val_loss: float, checkpoint_name: str | None = None,
                  checkpoint_hash: str | None = None) -> Path:
        """``best.pt`` then ``best.json`` (``{"step", "val_loss", "embedding"}``), each atomically."""
        path = self.write_embedding(vectors, self.best_path, step, checkpoint_name, checkpoint_hash)
        meta = {"step": int(step), "val_loss": float(val_loss), "embedding": path.name}
        atomic_write_text(self.best_meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    def remove_best(self) -> bool:
        """Delete ``best.*`` (a resumed run whose checkpoint holds no best); True when something was removed."""
        found = False
        for path in (self.best_meta_path, self.best_path):
            if path.is_file():
                path.unlink()
                found = True
        return found

    def read_best(self) -> tuple[int, float] | None:
        """``(step, val_loss)`` of ``best.json`` when it and ``best.pt`` are there and readable."""
        if not (self.best_meta_path.is_file() and self.best_path.is_file()):
            return None
        try:
            meta = json.loads(self.best_meta_path.read_text("utf-8"))
            step, loss = int(meta["step"]), float(meta["val_loss"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); the best is taken from %s", self.best_meta_path, exc, self.val_csv.name)
            return None
        return (step, loss) if math.isfinite(loss) else None

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

    def read_val_losses(self) -> list[tuple[int, float]]:
        rows: list[tuple[int, float]] = []
        if not self.val_csv.is_file():
            return rows
        with open(self.val_csv, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                try:
                    rows.append((int(row[0]), float(row[1])))
                except (ValueError, IndexError):
                    continue  # header or a torn last line
        return rows

    def truncate_val_losses(self, step: int) -> None:
        """Keep validation lines up to ``step`` (none when ``step`` < 0); nothing to do without the file."""
        if not self.val_csv.exists():
            return
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(VAL_HEADER)
        writer.writerows((s, f"{v:.8g}") for s, v in self.read_val_losses() if s <= step)
        atomic_write_text(self.val_csv, buf.getvalue())

    def append_val_loss(self, step: int, val_loss: float) -> None:
        if self._val_file is None:
            new = not self.val_csv.exists()
            self._val_file = open(self.val_csv, "a", encoding="utf-8", newline="")
            if new:
                self._val_file.write(",".join(VAL_HEADER) + "\n")
        self._val_file.write(f"{step},{val_loss:.8g}\n")
        self._val_file.flush()

    def close(self) -> None:
        for attr in ("_loss_file", "_val_file"):
            handle = getattr(self, attr)
            if handle is not None:
                handle.close()
                setattr(self, attr, None)

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
        val = self.read_val_losses()
        if val:
            ax.plot([r[0] for r in val], [r[1] for r in val], lw=1.5, marker="o", ms=3, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.name}: training loss" + (" and validation loss" if val else ""))
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
    "name", "data_dir", "data_class", "model", "n_vectors", "init", "init_text", "init_random_scale", "seed", "resolution",
    "latents", "hflip", "bucketing", "mask", "mask_weight", "template_file",
    # validation set and its draws, loss weighting and EMA define what the run's numbers mean
    "val_data", "val_timesteps", "min_snr_gamma", "ema_decay",
)


def _same(key: str, old: Any, new: Any) -> bool:
    if key in ("data_dir", "mask", "template_file", "val_data") and old and new and new not in ("alpha", "auto"):
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return old == new


def resume_differences(saved: TrainConfig, requested: dict[str, Any]) -> list[str]:
    """``"key (run: old, asked: new)"`` for every fixed setting ``requested`` would change; an empty
    ``data_dir`` means "the run's own"."""
    out = []
    for key in RESUME_FIXED:
        if key not in requested or (key in ("data_dir", "data_class") and not requested[key]):
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
