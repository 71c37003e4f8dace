"""``meddiff ui``: the tabs without the webui, on the diffusers backend."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medical_diffusion.devices import Runtime
from medical_diffusion.ui.api_guard import ApiCredentials, ServerSecurity, is_loopback
from medical_diffusion.ui.context import UIContext

log = logging.getLogger(__name__)

JAVASCRIPT_DIR = Path(__file__).resolve().parents[3] / "javascript"


def make_context(model: str, work_dir: str | Path, embeddings_dir: str | Path | None = None,
                 runtime: Runtime | None = None) -> UIContext:
    """The standalone app's host: the model is built on first use on ``runtime``'s device and precision
    (default: the CPU in fp32, as before ``--device`` existed); embeddings are listed, trained into and
    read in ``embeddings_dir`` (default: the embeddings home, shared with the other commands)."""
    from medical_diffusion.backend.diffusers_backend import load_backend
    from medical_diffusion.embeddings.home import embeddings_home

    work_dir = Path(work_dir).resolve()
    from medical_diffusion.backend.families import tiny_family

    family = tiny_family(model)
    label = (f"tiny random-weight {family}-shaped demo model: a workflow demo, its pictures are noise"
             if family else model)
    runtime = runtime or Runtime(torch.device("cpu"), torch.float32)
    return UIContext(
        backend_factory=lambda: load_backend(model, device=runtime.device, dtype=runtime.dtype,
                                             attention=runtime.attention),
        runtime=runtime,
        work_dir=work_dir,
        embeddings_dir=embeddings_home(embeddings_dir),
        model_label=label,
        model_id=model,
    )


def javascript_source() -> str:
    """The extension's ``javascript/*.js`` (the webui loads these itself)."""
    if not JAVASCRIPT_DIR.is_dir():
        return ""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(JAVASCRIPT_DIR.glob("*.js")))


def launch(ctx: UIContext, host: str = "127.0.0.1", port: int = 7861, block: bool = True,
           security: ServerSecurity | None = None, insecure: bool = False):
    """Serve the tabs and the API on ``host:port``.

    ``security`` (default: no credentials) decides the API's auth, the page's login (gradio
    ``auth``) and the ``Host`` names answered; every request with a foreign ``Origin`` or ``Host`` is
    refused. A non-loopback ``host`` without ``--api-auth`` is refused unless ``insecure``.
    """
    from medical_diffusion.ui.api_routes import has_routes, make_router
    from medical_diffusion.ui.app import build_blocks

    if security is None:
        security = ServerSecurity.for_bind(host, ApiCredentials(), insecure=insecure)
    elif not is_loopback(host) and not security.credentials.users and not insecure:
        ServerSecurity.for_bind(host, security.credentials)  # raises with the explanation
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    ctx.embeddings_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(ctx)
    script = javascript_source()
    if script:
        with blocks:  # run the extension's scripts once the page has loaded
            blocks.load(None, None, None, _js=f"() => {{ {script} }}")
    blocks.queue(concurrency_count=1)
    auth = "API and page need a login" if security.credentials.enabled else "no login (local only)"
    log.info("Medical Diffusion UI on http://%s:%d (work folder %s; embeddings %s; %s)", host, port, ctx.work_dir,
             ctx.embeddings_dir, auth)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_api=False,
                  inbrowser=False, quiet=True, auth=security.gradio_auth(),
                  app_kwargs={"middleware": [security.middleware()]})
    if not has_routes(blocks.server_app):
        blocks.server_app.include_router(make_router(ctx, dependencies=security.router_dependencies()))
    if block:
        blocks.block_thread()
    return blocks
