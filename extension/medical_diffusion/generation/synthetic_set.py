"""Synthetic data sets: N images per class prompt, in ``<out>/<label>/NNNNN.png`` (the layout the
classifier experiments read, e.g. ``neg/`` and ``pos/``), with ``manifest.json`` recording the
seed, prompt and every parameter; each PNG carries A1111's ``parameters`` text (its prompt, seed,
settings and ``TI hashes``). Interrupted runs resume: images already in the manifest whose
file still has the recorded checksum are kept; the rest are (re)made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.backend.base import ModelBackend
from medical_diffusion.errors import Cancelled, InputFileError, MedDiffError
from medical_diffusion.generation.guidance import encode_composable
from medical_diffusion.generation.outputs import names_in, png_parameters
from medical_diffusion.generation.sampling import latents_to_images, sample_latents
from medical_diffusion.limits import MAX_BATCH_SIZE, check_range
from medical_diffusion.png_io import save_png

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_LABEL_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SetParams:
    """Everything that decides the pixels (compared on resume)."""

    classes: dict[str, str]  # label -> prompt (A1111 composable syntax)
    seed: int = 0
    steps: int = 100
    cfg_scale: float = 2.0
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    paired_seeds: bool = False  # same seeds for every class (paired comparisons)
    sampler: str = "euler_a"
    model: str = ""
    embeddings: dict[str, str] = field(default_factory=dict)  # name -> sha256 of its vectors


@dataclass
class SetResult:
    generated: int
    skipped: int
    failures: list[tuple[str, str]]  # (relative path, problem)
    manifest: Path


def embedding_fingerprint(vectors) -> str:
    """sha256 of an embedding's float32 vectors (identifies it in manifests); an ``Embedding`` counts
    with all its blocks (an SDXL pair: clip_l then clip_g, as the sampler gets them)."""
    if not isinstance(vectors, torch.Tensor):
        from medical_diffusion.embeddings.vector_blocks import vectors_from_embedding

        vectors = vectors_from_embedding(vectors)
    return hashlib.sha256(vectors.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def image_seed(params: SetParams, class_index: int, index: int) -> int:
    """Seed of image ``index`` of class ``class_index``: stable when N grows on resume."""
    if params.paired_seeds:
        return params.seed + index
    return params.seed + index * len(params.classes) + class_index


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
        if not isinstance(data, dict) or "params" not in data or "images" not in data:
            raise ValueError("missing 'params' or 'images'")
        return data
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"unreadable manifest ({exc}); move it away to start a new set") from exc


def _param_differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _file_sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def generate_set(
    backend: ModelBackend,
    params: SetParams,
    out_dir: str | Path,
    n_per_class: int,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 1,
    restart: bool = False,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    ti_hashes: Mapping[str, Mapping[str, str]] | None = None,
) -> SetResult:
    """Make (or finish) ``n_per_class`` images for every class of ``params``.

    ``batch_size`` images (1 .. ``limits.MAX_BATCH_SIZE``) go through the model per call; each
    keeps its own seed's generator for its initial and ancestral noise, so the images do not depend
    on the batch size (to float rounding) and a rerun remakes only the missing ones.
    A folder made with other parameters is refused unless ``restart`` (which discards the old
    manifest entries; files are overwritten as they are regenerated). Failures of single batches
    are collected and the run goes on. ``should_stop()`` is asked before every sampler step; True
    keeps the images made so far (in the manifest, so a rerun resumes) and raises :class:`Cancelled`.
    ``ti_hashes`` (``{name: {"file", "sha256"}}`` of the embedding files used, see
    :func:`~medical_diffusion.generation.outputs.embedding_hashes`) go into each PNG's ``parameters``.
    """
    if n_per_class < 1:
        raise MedDiffError("the number of images per class must be at least 1")
    check_range("batch size", batch_size, 1, MAX_BATCH_SIZE)
    if not params.classes:
        raise MedDiffError("no class prompts given")
    for label in params.classes:
        if not _LABEL_OK.match(label):
            raise MedDiffError(f"class label {label!r} must be a plain folder name (letters, digits, . _ -)")
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    new_params = asdict(params)
    manifest = None if restart else _read_manifest(manifest_path)
    if manifest is not None:
        diffs = _param_differences(manifest["params"], new_params)
        if diffs:
            raise MedDiffError(
                f"{manifest_path}: this folder was generated with other parameters ({'; '.join(diffs)}); "
                "use another output folder or --restart"
            )
        images: dict[str, dict] = manifest["images"]
    else:
        images = {}

    todo: list[tuple[int, str, int, int]] = []  # (class index, label, index, seed)
    skipped = 0
    for ci, label in enumerate(params.classes):
        for i in range(n_per_class):
            rel = f"{label}/{i:05d}.png"
            rec = images.get(rel)
            if rec is not None and _file_sha(out_dir / rel) == rec.get("sha256"):
                skipped += 1
                continue
            todo.append((ci, label, i, image_seed(params, ci, i)))
    total = len(todo)
    done = 0
    failures: list[tuple[str, str]] = []

    def write_manifest() -> None:
        data = {"version": 1, "params": new_params, "n_per_class": n_per_class, "images": dict(sorted(images.items()))}
        atomic_write_text(manifest_path, json.dumps(data, indent=1))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest()
    if progress is not None:
        progress(0, total)
    conds: dict[str, object] = {}
    hashes = {label: {name: ti_hashes[name] for name in names_in([prompt, params.negative_prompt], ti_hashes or {})}
              for label, prompt in params.classes.items()}  # each class's PNGs name the embeddings it uses
    for start in range(0, total, batch_size):
        batch = todo[start : start + batch_size]
        # one prompt per call: split the batch where the class changes
        groups: dict[str, list] = {}
        for item in batch:
            groups.setdefault(item[1], []).append(item)
        for label, items in groups.items():
            prompt = params.classes[label]
            try:
                if label not in conds:
                    conds[label] = encode_composable(backend, prompt, params.negative_prompt, embeddings)
                latents = sample_latents(
                    backend, conds[label], seeds=[s for *_, s in items], steps=params.steps,
                    cfg_scale=params.cfg_scale, width=params.width, height=params.height,
                    should_stop=should_stop,
                )
                for (ci, _, i, seed), image in zip(items, latents_to_images(backend, latents)):
                    rel = f"{label}/{i:05d}.png"
                    text = png_parameters(prompt, {**new_params, "seed": seed}, hashes[label])
                    sha = save_png(image, out_dir / rel, text=text)
                    images[rel] = {"label": label, "index": i, "seed": seed, "prompt": prompt, "sha256": sha}
            except Cancelled:
                write_manifest()
                raise
            except (MedDiffError, RuntimeError, ValueError, OSError) as exc:
                for _, _, i, _ in items:
                    failures.append((f"{label}/{i:05d}.png", f"{exc.__class__.__name__}: {exc}"))
                log.warning("generation failed for %d image(s) of %s: %s", len(items), label, exc)
            done += len(items)
        write_manifest()
        if progress is not None:
            progress(done, total)
    return SetResult(generated=total - len(failures), skipped=skipped, failures=failures, manifest=manifest_path)
