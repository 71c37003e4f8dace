"""What an embedding file holds: shape, model family, training metadata, size and norm statistics.

The norm check compares the trained vectors with the scale of the model's own token vectors
(the mean L2 norm of the rows of its token-embedding matrix). That scale depends on the text
encoder's weights, so it is read from the model the user names (``token_embedding_scale``) or
given by the user; no built-in reference value is shipped, because we could not find an
authoritative published number for SD1/SD2 and the weights cannot be downloaded here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medical_diffusion.embeddings.model import SDXL_WIDTHS, Embedding, validate
from medical_diffusion.embeddings.readers import read_embedding
from medical_diffusion.embeddings.safe_pickle import safe_torch_load
from medical_diffusion.errors import InputFileError, MedDiffError

#: how far (as a factor either way) the mean vector norm may stray from the token scale before
#: we warn. A judgement call, not a measured constant: the warning is a hint, and the CLI lets
#: users change it with ``--tolerance``.
DEFAULT_TOLERANCE = 3.0
_TOKEN_KEY_SUFFIX = "token_embedding.weight"
#: which model an embedding's vectors fit, by :attr:`Embedding.family`
FAMILY_FITS = {
    "SD1": "SD 1.x (CLIP ViT-L, 768)",
    "SD2": "SD 2.x (OpenCLIP ViT-H, 1024)",
    "SDXL": "SDXL (clip_l 768 + clip_g 1280)",
}


def fits(emb: Embedding) -> str:
    """The model family ``emb`` fits, in words (``"unknown width N (a custom or tiny model)"`` otherwise)."""
    if emb.is_sdxl and {k: int(t.shape[1]) for k, t in emb.parts().items()} != SDXL_WIDTHS:
        l, g = (int(t.shape[1]) for t in emb.parts().values())
        return f"an SDXL-shaped model with clip_l {l} + clip_g {g} (a custom or tiny model, not SDXL itself)"
    return FAMILY_FITS.get(emb.family or "", f"unknown width {emb.width} (a custom or tiny model)")


def family_mismatch(a: Embedding, b: Embedding) -> str | None:
    """Why ``a`` and ``b`` cannot be compared vector by vector, or None when they can."""
    pa, pb = a.parts(), b.parts()
    if list(pa) == list(pb) and all(pa[k].shape[1] == pb[k].shape[1] for k in pa):
        return None
    return (f"{a.name!r} fits {fits(a)} and {b.name!r} fits {fits(b)}: they were made for different models, "
            "whose text encoders have different token spaces (widths "
            f"{'+'.join(str(int(t.shape[1])) for t in pa.values())} vs "
            f"{'+'.join(str(int(t.shape[1])) for t in pb.values())}), so their vectors cannot be compared "
            "vector by vector; compare embeddings trained for the same model family")


def compare_report(a: Embedding, b: Embedding) -> dict[str, Any]:
    """:func:`~medical_diffusion.embeddings.similarity.compare_embeddings` plus the family each fits;
    :class:`MedDiffError` saying why when they belong to different model families."""
    from medical_diffusion.embeddings.similarity import compare_embeddings

    reason = family_mismatch(a, b)
    if reason:
        raise MedDiffError(reason)
    result = compare_embeddings(a, b)
    result["fits_a"], result["fits_b"] = fits(a), fits(b)
    return result


def format_compare_report(result: dict[str, Any]) -> str:
    """Text of :func:`compare_report`: which family A and B fit, then the similarity figures."""
    from medical_diffusion.embeddings.similarity import format_comparison

    return f"fits: A {result['fits_a']}, B {result['fits_b']}\n" + format_comparison(result)


def human_size(n_bytes: int) -> str:
    """``"260.1 KB (< 1 MB)"`` style file size."""
    value, unit = float(n_bytes), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            break
        value /= 1024
    text = f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
    return f"{text} (< 1 MB)" if n_bytes < 1024 * 1024 else text


def norm_stats(vectors: torch.Tensor) -> dict[str, Any]:
    """Per-vector L2 norms and their min/mean/max/std."""
    norms = vectors.norm(dim=1)
    return {
        "min": float(norms.min()),
        "mean": float(norms.mean()),
        "max": float(norms.max()),
        "std": float(norms.std()) if norms.numel() > 1 else 0.0,
        "per_vector": [round(float(x), 6) for x in norms],
    }


def _token_matrices(model: str) -> list[tuple[str, torch.Tensor]]:
    """``(key, weight)`` of every token-embedding matrix in a checkpoint file or diffusers folder."""
    path = Path(model)
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        files = [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]
        if not files:
            raise InputFileError(path, "no text_encoder/model.safetensors or text_encoder/pytorch_model.bin in this model folder")
        extra = path / "text_encoder_2"
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (extra / name).is_file():
                files.append(extra / name)
                break
    elif path.is_file():
        files = [path]
    else:
        raise InputFileError(path, "no such model file or folder")
    found: list[tuple[str, torch.Tensor]] = []
    for file in files:
        if file.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt", device="cpu") as fh:
                    for key in fh.keys():
                        if key.endswith(_TOKEN_KEY_SUFFIX):
                            found.append((key, fh.get_tensor(key)))
            except Exception as exc:  # safetensors raises its own error types
                raise InputFileError(file, f"not a readable safetensors file ({exc})") from None
        else:
            data = safe_torch_load(file)
            state = data.get("state_dict", data) if isinstance(data, dict) else {}
            found += [(k, v) for k, v in state.items() if isinstance(k, str) and k.endswith(_TOKEN_KEY_SUFFIX)]
    if not found:
        raise InputFileError(path, f"no '*{_TOKEN_KEY_SUFFIX}' tensor found; is this a Stable Diffusion model?")
    return found


def token_embedding_scale(model: str | os.PathLike, width: int) -> float:
    """Mean L2 norm of the token vectors of width ``width`` in ``model`` (a diffusers folder or a
    ``.safetensors``/``.ckpt`` checkpoint; a named model such as ``"tiny"`` is the caller's to load:
    :func:`backend_scales_for`)."""
    matrices = _token_matrices(str(model))
    for _key, weight in matrices:
        if weight.ndim == 2 and weight.shape[1] == width:
            return float(weight.float().norm(dim=1).mean())
    widths = sorted({int(w.shape[-1]) for _, w in matrices})
    raise MedDiffError(f"{model}: token width(s) {widths} do not match the embedding's width {width}")


def _norm_warnings(label: str, stats: dict, scale: float | None, tolerance: float) -> list[str]:
    out = []
    zero = sum(1 for n in stats["per_vector"] if n == 0.0)
    if zero:
        out.append(f"{label}{zero} vector(s) are all zeros (never trained?)")
    if scale is None or scale <= 0:
        return out
    ratio = stats["mean"] / scale
    far = [i for i, n in enumerate(stats["per_vector"]) if not (scale / tolerance <= n <= scale * tolerance)]
    if not (1 / tolerance <= ratio <= tolerance):
        out.append(
            f"{label}mean vector norm {stats['mean']:.4g} is {ratio:.3g}x the model's token scale {scale:.4g} "
            f"(outside {1 / tolerance:.3g}x..{tolerance:.3g}x): prompts may be dominated or ignored; "
            "consider a lower learning rate or fewer steps"
        )
    elif far:
        out.append(f"{label}{len(far)} of {len(stats['per_vector'])} vectors have norms outside "
                   f"{1 / tolerance:.3g}x..{tolerance:.3g}x the token scale {scale:.4g} (first: #{far[0]})")
    return out


def _width_words(emb: Embedding) -> str:
    """``width 32`` or ``clip_l 32 + clip_g 48`` (an SDXL-shaped pair)."""
    if emb.is_sdxl:
        return " + ".join(f"{part} {int(t.shape[1])}" for part, t in emb.parts().items())
    return f"width {emb.width}"


def inspect_embedding(
    path: str | os.PathLike,
    token_scale: float | dict[str, float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    expected_width: int | None = None,
    scale_hint: str = "pass --model (or --token-norm)",
    width_hint: str = "give --expected-width N or --model",
) -> dict[str, Any]:
    """A JSON-ready report on one embedding file, whatever model it was made for.

    A width that fits no Stable Diffusion text encoder (a custom or tiny model's) is reported as an
    unknown family, with a note (``width_hint``: how to name the model; the CLI's flags by default);
    one that does not fit ``expected_width`` (the model's width) gets a warning, and no norm check.
    ``token_scale`` is the model's token-vector scale (one number, or per SDXL block
    ``{"clip_l": ..., "clip_g": ...}``); without it the norm check is skipped, with a note that
    says how to give one (``scale_hint``).
    """
    emb, fmt, file = read_embedding(path, check_width=False)
    notes: list[str] = []
    warnings: list[str] = []
    fits_model, family = True, emb.family
    try:
        validate(emb, file, expected_width)
    except InputFileError as exc:
        if expected_width is None:
            family = None
            total = f" ({emb.width} in all)" if emb.is_sdxl else ""
            notes.append(f"{_width_words(emb)}{total} fits no Stable Diffusion text encoder (768 SD1, 1024 SD2, "
                         f"768+1280 SDXL): an embedding for a custom or tiny model? {width_hint} to check it "
                         "against that model")
        else:
            warnings.append(f"does not fit the model: {exc.problem}")
            fits_model, token_scale = False, None
    size = file.stat().st_size
    report: dict[str, Any] = {
        "file": str(file),
        "format": fmt,
        "name": emb.name,
        "vectors": emb.n_vectors,
        "width": emb.width,
        "family": family or f"unknown ({_width_words(emb)})",
        "fits": fits(emb),
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
        "file_size_bytes": size,
        "file_size": human_size(size),
        "norms": {},
        "token_scale": token_scale,
        "warnings": warnings,
    }
    for part, tensor in emb.parts().items():
        stats = norm_stats(tensor)
        report["norms"][part] = stats
        scale = token_scale.get(part) if isinstance(token_scale, dict) else token_scale
        label = "" if part == "vectors" else f"{part}: "
        report["warnings"] += _norm_warnings(label, stats, scale, tolerance)
    if token_scale is None and fits_model:
        notes.append(f"norm scale check skipped: {scale_hint} to compare with the model's token vectors")
    if notes:
        report["notes"] = notes
    return report


def backend_token_scale(backend) -> float | dict[str, float] | None:
    """A loaded model's token-vector scale for the norm check: one number, or per SDXL block
    (``block_token_norms``); None when a multi-block model cannot say per block."""
    widths = getattr(backend, "text_widths", None) or {}
    if len(widths) > 1:
        per_block = getattr(backend, "block_token_norms", None)
        return per_block() if per_block is not None else None
    return backend.token_embedding_norm()


def scales_for(emb: Embedding, model: str | os.PathLike) -> float | dict[str, float]:
    """Token scale(s) of the model file or folder ``model`` matching ``emb``'s block widths."""
    if emb.is_sdxl:
        return {part: token_embedding_scale(model, int(t.shape[1])) for part, t in emb.parts().items()}
    return token_embedding_scale(model, emb.width)


def backend_scales_for(emb: Embedding, backend, label: str = "the model") -> float | dict[str, float] | None:
    """Token scale(s) of a loaded model (``backend``) for ``emb``; :class:`MedDiffError` naming both
    layouts when the embedding's blocks are not the model's."""
    want = {part: int(t.shape[1]) for part, t in emb.parts().items()}
    have = dict(getattr(backend, "text_widths", None) or {"vectors": int(backend.text_width)})
    if list(have.values()) != list(want.values()):
        raise MedDiffError(f"{label}: token blocks {have} do not match the embedding's {want}")
    return backend_token_scale(backend)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_embedding`'s report."""
    lines = [
        f"{report['file']}",
        f"  name        {report['name']}",
        f"  format      {report['format']}",
        f"  vectors     {report['vectors']} x {report['width']}  ({report['family']})",
        f"  fits        {report['fits']}",
        f"  step        {report['step'] if report['step'] is not None else '-'}",
        f"  checkpoint  {report['sd_checkpoint'] or '-'}  {report['sd_checkpoint_name'] or ''}".rstrip(),
        f"  file size   {report['file_size']}",
    ]
    for part, stats in report["norms"].items():
        label = "norms" if part == "vectors" else f"norms {part}"
        lines.append(f"  {label:<11} min {stats['min']:.4g}  mean {stats['mean']:.4g}  max {stats['max']:.4g}  std {stats['std']:.4g}")
    scale = report["token_scale"]
    if scale is not None:
        text = ", ".join(f"{k} {v:.4g}" for k, v in scale.items()) if isinstance(scale, dict) else f"{scale:.4g}"
        lines.append(f"  token scale {text} (mean norm of the model's token vectors)")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    lines += [f"  WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)
