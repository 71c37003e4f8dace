"""The extension's API routes inside the webui (``on_app_started``), behind its ``--api-auth``."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials


def auth_dependencies() -> list:
    """HTTP basic auth with the webui's ``--api-auth user:pass[,user:pass]`` when it is set."""
    from modules import shared

    spec = getattr(shared.cmd_opts, "api_auth", None)
    if not spec:
        return []
    credentials = dict(item.split(":", 1) for item in spec.strip().split(",") if ":" in item)
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)):
        expected = credentials.get(given.username)
        if expected is None or not secrets.compare_digest(given.password, expected):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return [Depends(check)]


def on_app_started(_blocks, app) -> None:
    from medical_diffusion.ui.api_routes import has_routes, make_router
    from medical_diffusion.webui.tabs import shared_context

    if has_routes(app):  # the webui can call this again on a UI reload
        return
    app.include_router(make_router(shared_context(), dependencies=auth_dependencies()))
