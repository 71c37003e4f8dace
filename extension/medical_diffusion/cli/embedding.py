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
    p.add_argument("files", nargs="+", type=Path, help="embedding files (or diffusers folders)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--model", help="model (diffusers folder, .safetensors/.ckpt, or 'tiny') whose token vectors set the norm scale")
    scale.add_argument("--token-norm", type=float, help="the model's mean token-vector norm, if known")
    p.add_argument("--tolerance", type=float, default=None, help="warn when norms are more than this factor from the token scale (default 3)")
    p.add_argument("--expected-width", type=int, help="accept this token width (a custom or tiny model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=inspect_command)

    p = sub.add_parser("compare", help="per-vector and mean cosine similarity, norm ratio")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--expected-width", type=int, help="accept this token width (a custom or tiny model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=compare_command)

    p = sub.add_parser("convert", help="rewrite an embedding in another format")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path, help="output file (.pt / .safetensors) or folder (diffusers)")
    p.add_argument("--to", required=True, choices=FORMAT_CHOICES, dest="fmt")
    p.add_argument("--name", help="token for a diffusers folder (default: the input's name)")
    p.add_argument("--expected-width", type=int, help="accept this token width (a custom or tiny model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=convert_command)

    p = sub.add_parser("blend", help="interpolate two embeddings into a new one (linear or spherical)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--weight", type=float, required=True, help="0 gives A, 1 gives B")
    p.add_argument("--mode", choices=("linear", "slerp"), default="linear")
    p.add_argument("--name", required=True, help="name of the new embedding (lowercase; also the file stem)")
    p.add_argument("-o", "--output", type=Path, help="output file/folder (default: NAME beside A)")
    p.add_argument("--to", choices=FORMAT_CHOICES, default=None, dest="fmt",
                   help="output format (default: a1111 .pt; an SDXL pair: safetensors with clip_l/clip_g)")
    p.add_argument("--expected-width", type=int, help="accept this token width (a custom or tiny model)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=blend_command)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def inspect_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.inspection import DEFAULT_TOLERANCE, format_report, inspect_embedding, scales_for
    from medical_diffusion.embeddings.readers import load_embedding

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if tolerance <= 1:
        raise MedDiffError(f"--tolerance {tolerance} must be greater than 1")
    from medical_diffusion.backend.families import tiny_family

    if tiny_family(args.model) and args.expected_width is None:  # the demo models' widths are no SD widths
        from medical_diffusion.backend.tiny import build_tiny_backend

        args.expected_width = build_tiny_backend(family=tiny_family(args.model)).text_width
    reports, failures = [], []
    for path in args.files:
        try:
            scale = args.token_norm
            if args.model:
                scale = scales_for(load_embedding(path, args.expected_width), args.model)
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


def compare_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.inspection import compare_report, format_compare_report
    from medical_diffusion.embeddings.readers import load_embedding

    result = compare_report(load_embedding(args.a, args.expected_width), load_embedding(args.b, args.expected_width))
    result["files"] = [str(args.a), str(args.b)]
    print(json.dumps(result, indent=2) if args.json else format_compare_report(result))
    return 0


def _save(emb, output: Path, fmt: str, force: bool) -> Path:
    from medical_diffusion.embeddings.writers import save_embedding

    written = save_embedding(emb, output, fmt=fmt, force=force)
    token = f", token {emb.name!r}" if fmt == "diffusers" and written.stem == "learned_embeds" else ""
    print(f"wrote {written} ({fmt}, name {written.stem!r}{token}, {emb.n_vectors} x {emb.width})")
    return written


def convert_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.readers import load_embedding

    emb = load_embedding(args.input, args.expected_width)
    if args.name:
        emb.name = args.name
    if args.output.resolve() == args.input.resolve():
        raise MedDiffError(f"{args.output}: output is the input file; choose another path")
    _save(emb, args.output, args.fmt, args.force)
    return 0


def blend_command(args: argparse.Namespace) -> int:
    from medical_diffusion.embeddings.blend import blend_embeddings
    from medical_diffusion.embeddings.readers import load_embedding

    a = load_embedding(args.a, args.expected_width)
    b = load_embedding(args.b, args.expected_width)
    mixed = blend_embeddings(a, b, args.weight, args.mode, args.name)
    fmt = args.fmt or ("safetensors" if mixed.is_sdxl else "a1111")
    output = args.output or args.a.parent / (args.name + _SUFFIX[fmt])
    if fmt != "diffusers" and output.stem != args.name:
        raise MedDiffError(f"{output}: file stem differs from --name {args.name!r}; the file name is the embedding's name")
    _save(mixed, output, fmt, args.force)
    return 0
