"""Write embeddings in the formats A1111, ComfyUI and diffusers load. All writes are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medical_diffusion.atomic_io import atomic_path, check_writable
from medical_diffusion.embeddings.model import Embedding, check_name, validate
from medical_diffusion.embeddings.webui_pt import save_webui_pt
from medical_diffusion.errors import MedDiffError

FORMATS = ("a1111", "safetensors", "diffusers")
#: A1111 writes this placeholder token id for every embedding (``Embedding.save``)
A1111_TOKEN_ID = 265
#: tensor key for single-block ``.safetensors`` (as kohya sd-scripts writes; A1111 and ComfyUI
#: accept any single key, ComfyUI also takes SDXL ``clip_l``/``clip_g`` by name)
SAFETENSORS_KEY = "emb_params"
DIFFUSERS_FILE = "learned_embeds.safetensors"


def _name_for(stem: str, path: Path) -> str:
    try:
        return check_name(stem)
    except ValueError as exc:
        raise MedDiffError(f"{path}: {exc}; the file name is the embedding's name") from None


def a1111_dict(emb: Embedding, name: str) -> dict:
    """The dictionary A1111's ``Embedding.save`` writes (exactly these keys)."""
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": emb.vectors.detach().to("cpu", torch.float32).clone()},
        "name": name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def _metadata(emb: Embedding, name: str) -> dict[str, str]:
    meta = {"name": name, "format": "medical_diffusion embedding"}
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        value = getattr(emb, key)
        if value is not None:
            meta[key] = str(value)
    return meta


def _require_suffix(path: Path, allowed: tuple[str, ...], fmt: str) -> None:
    if path.suffix.lower() not in allowed:
        raise MedDiffError(f"{path}: format {fmt!r} needs a file ending in {' or '.join(allowed)}")


def save_embedding(emb: Embedding, path: str | os.PathLike, fmt: str = "a1111", force: bool = False) -> Path:
    """Write ``emb`` to ``path`` atomically and return the written file.

    - ``"a1111"``: ``.pt`` with exactly A1111's keys, float32, detached;
    - ``"safetensors"``: one tensor ``emb_params`` (SDXL: ``clip_l`` + ``clip_g``) plus string
      metadata (name, step, checkpoint);
    - ``"diffusers"``: ``{token: Tensor[n, width]}`` as ``learned_embeds.safetensors`` inside
      ``path`` when it has no suffix, else the given ``.safetensors``/``.bin`` file.

    The stored name is the file stem (for diffusers folders/``learned_embeds.*``: ``emb.name``);
    it must be lowercase. Existing files are replaced only with ``force``.
    """
    if fmt not in FORMATS:
        raise MedDiffError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    validate(emb, f"<embedding {emb.name!r}>", expected_widths={k: int(v.shape[1]) for k, v in emb.parts().items()})

    if fmt == "diffusers":
        if path.suffix.lower() in (".safetensors", ".bin"):
            target = path
        elif path.suffix:
            raise MedDiffError(f"{path}: format 'diffusers' needs a folder or a .safetensors/.bin file")
        else:
            target = path / DIFFUSERS_FILE
        token = emb.name if target.stem.lower() == "learned_embeds" else target.stem
        name = _name_for(token, target)
        if emb.is_sdxl:
            raise MedDiffError(f"{target}: SDXL pair embeddings can be written only as 'safetensors' (clip_l + clip_g)")
        check_writable(target, force)
        tensors = {name: emb.vectors.clone()}
        if target.suffix.lower() == ".bin":  # the webui reads .bin too: keep it to what its check accepts
            save_webui_pt(tensors, target)
        else:
            from safetensors.torch import save_file

            with atomic_path(target) as tmp:
                save_file(tensors, str(tmp))
        return target

    if fmt == "a1111":
        _require_suffix(path, (".pt",), fmt)
        name = _name_for(path.stem, path)
        if emb.is_sdxl:
            raise MedDiffError(f"{path}: SDXL pair embeddings can be written only as 'safetensors' (clip_l + clip_g)")
        check_writable(path, force)
        save_webui_pt(a1111_dict(emb, name), path)
        return path

    _require_suffix(path, (".safetensors",), fmt)
    name = _name_for(path.stem, path)
    check_writable(path, force)
    from safetensors.torch import save_file

    if emb.is_sdxl:
        tensors = {"clip_l": emb.vectors.clone(), "clip_g": emb.extra["clip_g"].clone()}
    else:
        tensors = {SAFETENSORS_KEY: emb.vectors.clone()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=_metadata(emb, name))
    return path
