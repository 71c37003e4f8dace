"""Who may call the HTTP API, and from where.

- :class:`ApiCredentials`: HTTP basic users (``--api-auth USER:PASS[,USER:PASS]``, the webui's syntax)
  and bearer tokens (``--api-token``, ``MEDDIFF_API_TOKEN``), checked in constant time.
- :func:`read_json_object`: a POST body must say ``Content-Type: application/json`` (415 otherwise), so a
  web page cannot send one as a CORS "simple request" without the browser asking first.
- :class:`HostOriginGuard`: ASGI middleware refusing (403) a ``Host`` the server was not bound for (DNS
  rebinding) and an ``Origin`` other than the server's own (another site's page in the user's browser),
  for plain HTTP and websockets (gradio's queue) alike.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from medical_diffusion.errors import MedDiffError
from medical_diffusion.limits import MAX_BODY_BYTES

log = logging.getLogger(__name__)

TOKEN_ENV_VAR = "MEDDIFF_API_TOKEN"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def parse_api_auth(spec: str | None) -> dict[str, str]:
    """``"alice:pw,bob:pw2"`` -> ``{"alice": "pw", "bob": "pw2"}`` (the webui's ``--api-auth``)."""
    users: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise MedDiffError(f"--api-auth: {item.split(':')[0]!r}... must be USER:PASSWORD (comma-separated pairs)")
        users[user] = password
    return users


@dataclass(frozen=True)
class ApiCredentials:
    """Accepted basic-auth users and bearer tokens; none of either means the API is open."""

    users: dict[str, str] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, api_auth: str | None = None, tokens: Iterable[str] | None = None,
                     use_env: bool = True) -> "ApiCredentials":
        found = [t.strip() for t in (tokens or ()) if t and t.strip()]
        if use_env and os.environ.get(TOKEN_ENV_VAR, "").strip():
            found.append(os.environ[TOKEN_ENV_VAR].strip())
        return cls(parse_api_auth(api_auth), tuple(found))

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)

    def accepts(self, authorization: str | None) -> bool:
        """True for a matching ``Basic`` or ``Bearer`` ``Authorization`` header (always when disabled)."""
        if not self.enabled:
            return True
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return any(secrets.compare_digest(value.encode(), t.encode()) for t in self.tokens)
        if scheme.lower() == "basic" and value and self.users:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
            expected = self.users.get(user)
            return bool(sep) and expected is not None and secrets.compare_digest(password.encode(), expected.encode())
        return False

    def dependency(self):
        """A FastAPI dependency answering 401 unless :meth:`accepts` the request."""
        def check(request: Request) -> None:
            if not self.accepts(request.headers.get("authorization")):
                challenge = ", ".join((["Basic realm=\"meddiff\""] if self.users else [])
                                      + (["Bearer"] if self.tokens else []))
                raise HTTPException(status_code=401, detail="Incorrect or missing credentials",
                                    headers={"WWW-Authenticate": challenge})

        return check


async def read_json_object(request) -> dict[str, Any]:
    """The request's JSON object body: 415 unless ``Content-Type: application/json``, 400 when it is
    not valid JSON, 422 when it is JSON but not an object."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(status_code=415, detail="the body must be JSON sent with Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(status_code=413, detail=f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(status_code=413, detail=f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise HTTPException(status_code=422, detail=f"the body must be a JSON object, got {type(data).__name__}")
    return data


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the bind address of a local-only server)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """The host part of ``host[:port]`` / ``[v6]:port``, lowercased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def hosts_for_bind(bind: str) -> frozenset[str] | None:
    """``Host`` names a server bound to ``bind`` answers: loopback names for a loopback bind, the
    address itself (and loopback) for another address, any (None) for a wildcard bind."""
    bind = bind.strip().strip("[]").lower()
    if bind in ("", "0.0.0.0", "::"):
        return None
    return LOOPBACK_NAMES | {bind}


def request_problem(headers: dict[str, str], allowed_hosts: Collection[str] | None) -> str | None:
    """Why a request must be refused (foreign ``Host`` or ``Origin``), or None."""
    host = headers.get("host", "")
    if allowed_hosts is not None:
        name = _host_name(host)
        if name not in allowed_hosts and not (is_loopback(name) and any(map(is_loopback, allowed_hosts))):
            return f"Host {host!r} is not an address this server answers (DNS rebinding?)"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        if origin.strip().lower() == "null" or not parts.netloc or parts.netloc.lower() != host.strip().lower():
            return f"requests from {origin!r} are not allowed (cross-site); use the app's own page"
    return None


class HostOriginGuard:
    """ASGI middleware: 403 (websocket: close) for requests :func:`request_problem` refuses."""

    def __init__(self, app, allowed_hosts: Collection[str] | None = None):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            problem = request_problem(headers, self.allowed_hosts)
            if problem is not None:
                log.warning("refused %s %s: %s", scope["type"], scope.get("path", ""), problem)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": problem}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class ServerSecurity:
    """What ``meddiff ui`` enforces: credentials for the API (and the gradio login when set), and the
    ``Host`` names it answers."""

    credentials: ApiCredentials
    allowed_hosts: frozenset[str] | None

    @classmethod
    def for_bind(cls, bind: str, credentials: ApiCredentials, insecure: bool = False) -> "ServerSecurity":
        """Refuse (:class:`MedDiffError`) a non-loopback ``bind`` without credentials unless ``insecure``."""
        if not is_loopback(bind) and not credentials.users and not insecure:
            raise MedDiffError(
                f"--host {bind} makes the app reachable from other machines: give --api-auth USER:PASS "
                "(used for the page's login and the API), or --insecure to run it open anyway"
            )
        return cls(credentials, hosts_for_bind(bind))

    def router_dependencies(self) -> list:
        from fastapi import Depends

        return [Depends(self.credentials.dependency())] if self.credentials.enabled else []

    def middleware(self):
        from starlette.middleware import Middleware

        return Middleware(HostOriginGuard, allowed_hosts=self.allowed_hosts)

    def gradio_auth(self) -> list[tuple[str, str]] | None:
        """``launch(auth=...)`` for the page: the basic-auth users, or None (open page)."""
        return sorted(self.credentials.users.items()) or None
