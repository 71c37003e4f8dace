"""Results made in the tabs, saved like the webui saves its outputs.

``WORK/outputs/<kind>/<YYYY-MM-DD>/NNNNN.png`` (the next free number): the picture shown (an image,
a grid or a strip) with A1111's ``parameters`` text chunk (prompt, negative prompt, steps, sampler,
CFG, seed, size, model, ``TI hashes``), its cells as ``NNNNN-01.png``... for a grid or strip, and
``NNNNN.json`` with every parameter and each embedding's name, file and sha256. Files are written
atomically; a number is taken by creating its JSON file exclusively, so two saves never share one.
The commands (``meddiff generate/interpolate/compose``) write the same ``parameters`` text
(:func:`png_parameters`) into their own layouts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from medical_diffusion.atomic_io import atomic_write_text
from medical_diffusion.errors import MedDiffError
from medical_diffusion.file_digest import file_sha256
from medical_diffusion.generation.prompts import names_used

SAMPLER = "Euler a"
_NUMBERED = re.compile(r"^(\d{5,})")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class Picture:
    """One picture of a result: its image, the prompt it was made from (empty for a grid) and a label."""

    image: Image.Image
    prompt: str = ""
    label: str = ""
    cfg_scale: float | None = None


@dataclass
class SavedResult:
    picture: Path
    cells: list[Path] = field(default_factory=list)
    sidecar: Path | None = None


def result_folder(work_dir: str | os.PathLike, kind: str, day: _dt.date | None = None) -> Path:
    """``WORK/outputs/<kind>/<YYYY-MM-DD>``."""
    if not _KIND.match(kind):
        raise MedDiffError(f"output kind {kind!r}: use lower-case letters, digits, '-' and '_'")
    return Path(work_dir) / "outputs" / kind / (day or _dt.date.today()).isoformat()


def _reserve(folder: Path) -> tuple[int, Path]:
    """The next free number in ``folder`` and its sidecar, created empty and exclusively."""
    folder.mkdir(parents=True, exist_ok=True)
    used = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    number = max(used, default=0) + 1
    while True:
        sidecar = folder / f"{number:05d}.json"
        try:
            fd = os.open(sidecar, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            number += 1
            continue
        os.close(fd)
        return number, sidecar


def names_in(prompts: Sequence[str], names) -> list[str]:
    """The ``names`` that appear as a word in any of ``prompts`` (sorted)."""
    return sorted(names_used(prompts, names))


def embedding_hashes(embeddings_dir: str | os.PathLike | None, prompts: Sequence[str],
                     files: Sequence[str | os.PathLike] = ()) -> dict[str, dict[str, str]]:
    """``{name: {"file": path, "sha256": hex}}`` of the embedding files in ``embeddings_dir`` and ``files``
    (by the names the prompts use, as the commands find them) that the prompts use."""
    from medical_diffusion.embeddings.readers import embedding_paths_on_disk

    folder = Path(embeddings_dir) if embeddings_dir else None
    paths = embedding_paths_on_disk(folder if folder is not None and folder.is_dir() else None,
                                    [f for f in files if Path(f).is_file()])
    return {name: {"file": str(paths[name]), "sha256": file_sha256(paths[name])} for name in names_in(prompts, paths)}


def png_parameters(prompt: str, params: Mapping[str, Any], hashes: Mapping[str, Mapping[str, str]] | None = None,
                   cfg_scale: float | None = None) -> dict[str, str]:
    """The PNG text chunks of a picture made from ``prompt``: ``{"parameters": infotext(...)}``."""
    return {"parameters": infotext(prompt, params, hashes, cfg_scale)}


def infotext(prompt: str, params: Mapping[str, Any], hashes: Mapping[str, Mapping[str, str]] | None = None,
             cfg_scale: float | None = None) -> str:
    """A1111's ``parameters`` text: the prompt, ``Negative prompt:`` and one line of settings, with
    ``TI hashes`` (the first 10 hex digits of each embedding file's sha256, as the webui writes them)."""
    settings = [("Steps", params.get("steps")), ("Sampler", SAMPLER),
                ("CFG scale", cfg_scale if cfg_scale is not None else params.get("cfg_scale")),
                ("Seed", params.get("seed"))]
    if params.get("width") and params.get("height"):
        settings.append(("Size", f"{params['width']}x{params['height']}"))
    for key, label in (("model", "Model"), ("denoising_strength", "Denoising strength")):
        if params.get(key) not in (None, ""):
            settings.append((label, params[key]))
    if hashes:
        settings.append(("TI hashes", '"' + ", ".join(f"{n}: {h['sha256'][:10]}" for n, h in sorted(hashes.items())) + '"'))
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings if v is not None))
    return "\n".join(lines)


def save_result(
    work_dir: str | os.PathLike,
    kind: str,
    picture: Image.Image,
    params: Mapping[str, Any],
    *,
    cells: Sequence[Picture] = (),
    prompt: str = "",
    embeddings_dir: str | os.PathLike | None = None,
    day: _dt.date | None = None,
    resolve_folder: Callable[[Path], Path] | None = None,
) -> SavedResult:
    """Save a tab's result under :func:`result_folder`: ``picture`` (with ``prompt``, or the first
    cell's, in its ``parameters``), each of ``cells`` when there are several, and the JSON sidecar with
    ``params``, the cells' prompts and the hashes of the embeddings the prompts use.

    ``resolve_folder`` passes that folder through the caller's path policy before anything is written
    (the tabs: ``UIContext.path``, the allowed roots with symlinks followed); it raises to refuse it."""
    from medical_diffusion.png_io import save_png

    prompts = [prompt, *(c.prompt for c in cells), str(params.get("negative_prompt") or "")]
    hashes = embedding_hashes(embeddings_dir, prompts)
    folder = result_folder(work_dir, kind, day)
    if resolve_folder is not None:
        folder = resolve_folder(folder)
    number, sidecar = _reserve(folder)
    folder = sidecar.parent
    try:
        main_prompt = prompt or (cells[0].prompt if cells else "")
        main_cfg = cells[0].cfg_scale if cells and not prompt else None
        path = folder / f"{number:05d}.png"
        sha = save_png(picture, path, text=png_parameters(main_prompt, params, hashes, main_cfg))
        records, cell_paths = [], []
        for j, cell in enumerate(cells if len(cells) > 1 else (), start=1):
            cell_path = folder / f"{number:05d}-{j:02d}.png"
            cell_sha = save_png(cell.image, cell_path, text=png_parameters(cell.prompt, params, hashes, cell.cfg_scale))
            cell_paths.append(cell_path)
            records.append({"file": cell_path.name, "prompt": cell.prompt, "label": cell.label,
                            "cfg_scale": cell.cfg_scale, "sha256": cell_sha})
        document = {"kind": kind, "file": path.name, "sha256": sha, "prompt": main_prompt, "sampler": SAMPLER,
                    "params": dict(params), "embeddings": hashes, "cells": records,
                    "saved": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        atomic_write_text(sidecar, json.dumps(document, indent=1, default=str))
    except BaseException:
        if sidecar.exists() and sidecar.stat().st_size == 0:
            sidecar.unlink()
        raise
    return SavedResult(path, cell_paths, sidecar)
