"""``meddiff ui``: the Medical Diffusion tabs as a standalone app."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ui", help="launch the tabs in a browser without the webui",
                              description="Launch the Medical Diffusion tabs (gradio) on the diffusers backend. "
                              "It answers on 127.0.0.1 only unless --host says otherwise; another address "
                              "needs --api-auth (or --insecure).")
    p.add_argument("--model", default="tiny",
                   help="diffusers folder, .ckpt/.safetensors file (SD1/SD2/SDXL), or 'tiny' (default) / 'tiny-sd1' / "
                        "'tiny-sdxl' (random-weight workflow demos)")
    p.add_argument("--work-dir", default="meddiff-work", help="folder the tabs write to (default: ./meddiff-work)")
    p.add_argument("--embeddings-dir", default=None,
                   help="embeddings folder the tabs list, train into and read (default: the embeddings home, "
                        "./embeddings or $MEDDIFF_EMBEDDINGS_DIR, shared with the other commands)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]",
                   help="HTTP basic credentials for the API and the page's login (the webui's syntax)")
    p.add_argument("--api-token", action="append", metavar="TOKEN",
                   help="accept 'Authorization: Bearer TOKEN' on the API (repeatable; also $MEDDIFF_API_TOKEN)")
    p.add_argument("--allowed-roots", nargs="+", metavar="DIR",
                   help="folders the tabs and the API may read and write (default: $MEDDIFF_ALLOWED_ROOTS, else any)")
    from medical_diffusion.devices import add_device_arguments

    add_device_arguments(p, attention=True)
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-auth (anyone who reaches the port can use it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medical_diffusion.allowed_roots import ENV_VAR, is_inside_roots
    from medical_diffusion.devices import runtime_from_args
    from medical_diffusion.embeddings.home import describe_home, embeddings_home
    from medical_diffusion.errors import MedDiffError
    from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity
    from medical_diffusion.ui.standalone import launch, make_context

    runtime = runtime_from_args(args)  # before the model is built (on first use, by the tabs)
    if args.allowed_roots:
        missing = [d for d in args.allowed_roots if not os.path.isdir(d)]
        if missing:
            raise MedDiffError(f"--allowed-roots: not a folder: {', '.join(missing)}")
        os.environ[ENV_VAR] = os.pathsep.join(os.path.abspath(d) for d in args.allowed_roots)
    security = ServerSecurity.for_bind(args.host, ApiCredentials.from_options(args.api_auth, args.api_token),
                                       insecure=args.insecure)
    embeddings = embeddings_home(args.embeddings_dir)
    if not is_inside_roots(embeddings):
        raise MedDiffError(f"the embeddings folder {describe_home(args.embeddings_dir)} is outside the allowed "
                           "roots (--allowed-roots or $MEDDIFF_ALLOWED_ROOTS): give --embeddings-dir inside them, "
                           "or allow its folder too")
    print(f"embeddings: {describe_home(args.embeddings_dir)}", flush=True)
    launch(make_context(args.model, args.work_dir, embeddings, runtime),
           host=args.host, port=args.port, security=security, insecure=args.insecure)
    return 0
