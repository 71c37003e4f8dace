"""The extension's API routes inside the webui (``on_app_started``), behind its ``--api-auth``."""

from __future__ import annotations


def auth_dependencies() -> list:
    """HTTP basic auth with the webui's ``--api-auth user:pass[,user:pass]`` when it is set (the same
    check as ``meddiff ui --api-auth``: :class:`~medical_diffusion.ui.api_guard.ApiCredentials`)."""
    from fastapi import Depends
    from modules import shared

    from medical_diffusion.ui.api_guard import ApiCredentials

    spec = getattr(shared.cmd_opts, "api_auth", None)
    if not spec:
        return []
    credentials = ApiCredentials.from_options(spec, use_env=False)
    return [Depends(credentials.dependency())]


def on_app_started(_blocks, app) -> None:
    from medical_diffusion.ui.api_routes import has_routes, make_router
    from medical_diffusion.webui.tabs import shared_context

    if has_routes(app):  # the webui can call this again on a UI reload
        return
    app.include_router(make_router(shared_context(), dependencies=auth_dependencies()))
