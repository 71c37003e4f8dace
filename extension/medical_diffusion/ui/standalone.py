"""``meddiff ui``: the tabs without the webui, on the diffusers backend."""

from __future__ import annotations

import logging
from pathlib import Path

from medical_diffusion.ui.context import UIContext

log = logging.getLogger(__name__)

JAVASCRIPT_DIR = Path(__file__).resolve().parents[3] / "javascript"


def make_context(model: str, work_dir: str | Path, embeddings_dir: str | Path | None = None) -> UIContext:
    from medical_diffusion.backend.diffusers_backend import load_backend

    work_dir = Path(work_dir).resolve()
    label = "tiny random-weight demo model: a workflow demo, its pictures are noise" if model == "tiny" else model
    return UIContext(
        backend_factory=lambda: load_backend(model),
        work_dir=work_dir,
        embeddings_dir=Path(embeddings_dir).resolve() if embeddings_dir else work_dir / "embeddings",
        model_label=label,
        model_id=model,
    )


def javascript_source() -> str:
    """The extension's ``javascript/*.js`` (the webui loads these itself)."""
    if not JAVASCRIPT_DIR.is_dir():
        return ""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(JAVASCRIPT_DIR.glob("*.js")))


def launch(ctx: UIContext, host: str = "127.0.0.1", port: int = 7861, block: bool = True):
    from medical_diffusion.ui.app import build_blocks

    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    ctx.embeddings_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(ctx)
    script = javascript_source()
    if script:
        with blocks:  # run the extension's scripts once the page has loaded
            blocks.load(None, None, None, _js=f"() => {{ {script} }}")
    blocks.queue(concurrency_count=1)
    log.info("Medical Diffusion UI on http://%s:%d (work folder %s)", host, port, ctx.work_dir)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_api=False,
                  inbrowser=False, quiet=True)
    from medical_diffusion.ui.api_routes import has_routes, make_router

    if not has_routes(blocks.server_app):
        blocks.server_app.include_router(make_router(ctx))
    if block:
        blocks.block_thread()
    return blocks
