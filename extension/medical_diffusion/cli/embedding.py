"""``meddiff embedding inspect|compare|convert|blend``: work with embedding files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medical_diffusion.errors import MedDiffError

FORMAT_CHOICES = ("a1111", "safetensors", "diffusers")
_SUFFIX = {"a1111": ".pt", "safetensors": ".safetensors", "diffusers": ""}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embedding",
        help="inspect, compare, convert and blend embedding files",
        description="Embedding files: A1111 .pt/.safetensors/PNG/WebP, diffusers learned_embeds, bare tensors.",
    )
    sub = parser.add_subparsers(dest="embedding_command", metavar="ACTION", required=True)

    p = sub.add_parser("inspect", help="name, shape, model family, training metadata, size, norm statistics")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_NAME",
                   help="embedding files (or diffusers folders), or names of embeddings in the embeddings home")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--model", help="model (diffusers folder, .safetensors/.ckpt, or 'tiny') whose token vectors set the norm scale")
    scale.add_argument("--token-norm", type=float, help="the model's mean token-vector norm, if known")
    p.add_argument("--tolerance", type=float, default=None, help="warn when norms are more than this factor from the token scale (default 3)")
    p.add_argument("--expected-width", type=int, metavar="N",
                   help="the model's token width (a custom or tiny model's; --model tiny knows it): warn when a "
                        "file does not fit it (default: any width is reported, an unknown one as such)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_home_arg(p)
    p.set_defaults(func=inspect_command)

    p = sub.add_parser("compare", help="per-vector and mean cosine similarity, norm ratio")
    p.add_argument("a", type=Path, help="embedding file or name")
    p.add_argument("b", type=Path, help="embedding file or name")
    p.add_argument("--expected-width", type=int, metavar="N",
                   help="refuse files that do not fit a model of this token width (default: any width)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_home_arg(p)
    p.set_defaults(func=compare_command)

    p = sub.add_parser("convert", help="rewrite an embedding in another format")
    p.add_argument("input", type=Path, help="embedding file or name")
    p.add_argument("output", type=Path, help="output file (.pt / .safetensors) or folder (diffusers)")
    p.add_argument("--to", required=True, choices=FORMAT_CHOICES, dest="fmt")
    p.add_argument("--name", help="token for a diffusers folder (default: the input's name)")
    p.add_argument("--expected-width", type=int, metavar="N",
                   help="refuse files that do not fit a model of this token width (default: any width)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_home_arg(p)
    p.set_defaults(func=convert_command)

    p = sub.add_parser("blend", help="interpolate two embeddings into a new one (linear or spherical)")
    p.add_argument("a", type=Path, help="embedding file or name")
    p.add_argument("b", type=Path, help="embedding file or name")
    p.add_argument("--weight", type=float, required=True, help="0 gives A, 1 gives B")
    p.add_argument("--mode", choices=("linear", "slerp"), default="linear")
    p.add_argument("--name", required=True, help="name of the new embedding (lowercase; also the file stem)")
    p.add_argument("-o", "--output", type=Path, help="output file/folder (default: NAME beside A)")
    p.add_argument("--to", choices=FORMAT_CHOICES, default=None, dest="fmt",
                   help="output format (default: a1111 .pt; an SDXL pair: safetensors with clip_l/clip_g)")
    p.add_argument("--expected-width", type=int, metavar="N",
                   help="refuse files that do not fit a model of this token width (default: any width)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_home_arg(p)
    p.set_defaults(func=blend_command)


def _add_home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="where an embedding given by NAME (not a path) is looked up (default: the embeddings home, "
                        "./embeddings or $MEDDIFF_EMBEDDINGS_DIR)")


def _embedding_path(text: str | Path, embeddings_dir: str | None = None) -> Path:
    """``text`` as a path when it exists or looks like a file; else the file of the embedding of that
    name in the embeddings home, or a :class:`MedDiffError` saying where it looked."""
    from medical_diffusion.embeddings.home import describe_home, embeddings_home
    from medical_diffusion.embeddings.readers import EMBEDDING_SUFFIXES, embedding_paths_on_disk

    path = Path(text)
    if path.exists() or len(path.parts) != 1 or path.suffix.lower() in EMBEDDING_SUFFIXES:
        return path
    home = embeddings_home(embeddings_dir)
    found = embedding_paths_on_disk(home) if home.is_dir() else {}
    if path.name.lower() in found:
        return found[path.name.lower()]
    raise MedDiffError(f"{text}: no such file, and no embedding of that name in the embeddings home "
                       f"{describe_home(embeddings_dir)}" + ("" if home.is_dir() else ", which does not exist")
                       + f"; found there: {', '.join(sorted(found)) or 'none'}")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _model_token_scale(model: str, expected_width: int | None):
    """``(scale_for, expected_width)`` for ``--model``: a model file or folder is read for its token
    matrices (no model is built); a named model (``tiny``) is loaded once, and gives the width."""
    from medical_diffusion.embeddings.inspection import backend_scales_for, scales_for

    if Path(model).exists():
        return (lambda emb: scales_for(emb, model)), expected_width
    from medical_diffusion.backend.families import is_tiny_model

    if not is_tiny_model(model):
        raise MedDiffError(f"--model {model}: no such model file or folder")
    from medical_diffusion.backend.diffusers_backend import load_backend

    backend = load_backend(model)
    width = expected_width if expected_width is not None else int(backend.text_width)
    return (lambda emb: backend_scales_for(emb, backend, f"model {model}")), width


def inspect_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.inspection import DEFAULT_TOLERANCE, format_report, inspect_embedding
    from medical_diffusion.embeddings.readers import load_embedding

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if tolerance <= 1:
        raise MedDiffError(f"--tolerance {tolerance} must be greater than 1")
    scale_of = None
    if args.model:
        scale_of, args.expected_width = _model_token_scale(args.model, args.expected_width)
    reports, failures = [], []
    for path in args.files:
        try:
            path = _embedding_path(path, args.embeddings_dir)
            scale = args.token_norm
            if scale_of is not None:
                emb = load_embedding(path, check_width=False)
                fits_model = args.expected_width is None or _fits(emb, path, args.expected_width)
                scale = scale_of(emb) if fits_model else None
            reports.append(inspect_embedding(path, scale, tolerance, args.expected_width))
        except MedDiffError as exc:
            if len(args.files) == 1:
                raise
            failures.append(str(exc))
            print(f"meddiff embedding inspect: error: {exc}", file=sys.stderr)
    if args.json:
        _print_json(reports[0] if len(args.files) == 1 else {"reports": reports, "errors": failures})
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 1 if failures else 0


def _fits(emb, path, width: int) -> bool:
    """Whether ``emb`` fits a model of token width ``width`` (inspect reports it when not)."""
    from medical_diffusion.embeddings.model import validate
    from medical_diffusion.errors import InputFileError

    try:
        validate(emb, path, width)
    except InputFileError:
        return False
    return True


def _load(path: Path, expected_width: int | None):
    """An embedding for compare/convert/blend: any width, unless ``--expected-width`` names the model's."""
    from medical_diffusion.embeddings.readers import load_embedding

    return load_embedding(path, expected_width, check_width=expected_width is not None)


def compare_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.inspection import compare_report, format_compare_report

    args.a, args.b = _embedding_path(args.a, args.embeddings_dir), _embedding_path(args.b, args.embeddings_dir)
    result = compare_report(_load(args.a, args.expected_width), _load(args.b, args.expected_width))
    result["files"] = [str(args.a), str(args.b)]
    print(json.dumps(result, indent=2) if args.json else format_compare_report(result))
    return 0


def _save(emb, output: Path, fmt: str, force: bool) -> Path:
    from medical_diffusion.embeddings.inspection import fits
    from medical_diffusion.embeddings.writers import save_embedding

    written = save_embedding(emb, output, fmt=fmt, force=force)
    token = f", token {emb.name!r}" if fmt == "diffusers" and written.stem == "learned_embeds" else ""
    print(f"wrote {written} ({fmt}, name {written.stem!r}{token}, {emb.n_vectors} x {emb.width}; fits {fits(emb)})")
    return written


def convert_command(args: argparse.Namespace) -> int:
    args.input = _embedding_path(args.input, args.embeddings_dir)
    emb = _load(args.input, args.expected_width)
    if args.name:
        emb.name = args.name
    if args.output.resolve() == args.input.resolve():
        raise MedDiffError(f"{args.output}: output is the input file; choose another path")
    _save(emb, args.output, args.fmt, args.force)
    return 0


def blend_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.blend import blend_embeddings

    args.a, args.b = _embedding_path(args.a, args.embeddings_dir), _embedding_path(args.b, args.embeddings_dir)
    a, b = _load(args.a, args.expected_width), _load(args.b, args.expected_width)
    mixed = blend_embeddings(a, b, args.weight, args.mode, args.name)
    fmt = args.fmt or ("safetensors" if mixed.is_sdxl else "a1111")
    output = args.output or args.a.parent / (args.name + _SUFFIX[fmt])
    if fmt != "diffusers" and output.stem != args.name:
        raise MedDiffError(f"{output}: file stem differs from --name {args.name!r}; the file name is the embedding's name")
    _save(mixed, output, fmt, args.force)
    return 0
