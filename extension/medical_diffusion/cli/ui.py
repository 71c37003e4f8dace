"""``meddiff ui``: the Medical Diffusion tabs as a standalone app."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ui", help="launch the tabs in a browser without the webui",
                              description="Launch the Medical Diffusion tabs (gradio) on the diffusers backend.")
    p.add_argument("--model", default="tiny",
                   help="diffusers folder, .ckpt/.safetensors file, or 'tiny' (random-weight workflow demo; default)")
    p.add_argument("--work-dir", default="meddiff-work", help="folder the tabs write to (default: ./meddiff-work)")
    p.add_argument("--embeddings-dir", default=None, help="embeddings folder (default: WORK_DIR/embeddings)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7861)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medical_diffusion.ui.standalone import launch, make_context

    launch(make_context(args.model, args.work_dir, args.embeddings_dir), host=args.host, port=args.port)
    return 0
