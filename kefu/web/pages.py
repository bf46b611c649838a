"""The web front's pages and files: the visitor chat, the agent workbench, the admin page and
the embeddable widget, served from ``kefu/web/static/`` by the same aiohttp server as the API.

Routes
------
- ``GET /`` redirects to ``/chat``;
- ``GET /chat``, ``/agent``, ``/admin``: the three pages;
- ``GET /widget.js``: the loader a host site includes with one ``<script>`` tag (any origin may
  load it: ``Access-Control-Allow-Origin: *``);
- ``GET /static/{name}``: the flat directory of scripts, styles and images the pages use.

These are not REST operations: they are left out of ``/openapi.json`` (:data:`PAGE_PATHS`).

Files are read once, at start, into memory (the directory is small and ships with the package),
with a strong ``ETag`` from their content; a request with a matching ``If-None-Match`` gets 304.
The set of files is fixed for the life of the process, so a path that is not one of them is a
404 whatever it contains (``..`` included): nothing here touches the file system per request.

Security headers
----------------
Every page carries a Content-Security-Policy that allows only the server's own scripts and
styles (no inline script, no ``eval``, no inline style attribute), and network access only to
this origin and the WebSocket origin of ``/v1/config``. The pages render every message as text;
the policy is the second wall should that ever fail. ``/chat`` may be framed by any site (the
widget opens it in an iframe); ``/agent`` and ``/admin`` may not be framed at all. All answers
carry ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["PAGE_PATHS", "STATIC_DIR", "StaticFiles", "add_pages"]

#: Where the front's files live, inside the package.
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"

#: Paths served here rather than by the REST API (not in the OpenAPI document).
PAGE_PATHS: Final = frozenset({"/", "/chat", "/agent", "/admin", "/widget.js", "/static/{name}"})

#: The page behind each route, and who may frame it.
_PAGES: Final[dict[str, tuple[str, str]]] = {
    "/chat": ("chat.html", "*"),
    "/agent": ("agent.html", "'none'"),
    "/admin": ("admin.html", "'none'"),
}

#: Files larger than this are not served (the directory holds small text and images).
MAX_FILE_BYTES: Final = 1 << 20
#: Files held at most (the directory is flat and small).
MAX_FILES: Final = 256

_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".txt": "text/plain; charset=utf-8",
}

_COMMON_HEADERS: Final[dict[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _File:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class StaticFiles:
    """The files of :data:`STATIC_DIR`, loaded once; a missing directory is an empty set."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.files: dict[str, _File] = {}
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            if len(self.files) >= MAX_FILES:
                break
            if not path.is_file() or path.name.startswith("."):
                continue
            suffix = path.suffix.lower()
            ctype = _TYPES.get(suffix) or mimetypes.guess_type(path.name)[0]
            if ctype is None or path.stat().st_size > MAX_FILE_BYTES:
                continue
            self.files[path.name] = _File(path.read_bytes(), ctype)

    def get(self, name: str) -> _File | None:
        return self.files.get(name)


def content_security_policy(ws_url: str, frame_ancestors: str) -> str:
    """The page policy: this origin, plus the WebSocket origin the pages connect to."""
    connect = ["'self'"]
    parts = urlsplit(ws_url)
    if parts.scheme in ("ws", "wss") and parts.netloc:
        connect.append(f"{parts.scheme}://{parts.netloc}")
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "media-src 'self' data:",
            "connect-src " + " ".join(connect),
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            f"frame-ancestors {frame_ancestors}",
        )
    )


def _answer(request: web.Request, f: _File, headers: dict[str, str]) -> web.Response:
    out = dict(_COMMON_HEADERS)
    out.update(headers)
    out["ETag"] = f.etag
    # Revalidate every time: a new release must reach the browser at its next load, and a 304
    # costs one round trip with no body.
    out["Cache-Control"] = "no-cache"
    if request.headers.get("If-None-Match") == f.etag:
        return web.Response(status=304, headers=out)
    return web.Response(body=f.body, headers={**out, "Content-Type": f.content_type})


def add_pages(app: web.Application, ws_url: Callable[[], str], files: StaticFiles) -> None:
    """Register the page routes on ``app``; ``ws_url`` gives the public WebSocket URL (known
    only once the WebSocket listener is bound, hence a function)."""

    def not_found() -> web.HTTPNotFound:
        return web.HTTPNotFound()  # the error middleware gives it the JSON error shape

    async def root(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/chat", headers=_COMMON_HEADERS)

    def page(name: str, ancestors: str) -> Callable[[web.Request], object]:
        async def handler(request: web.Request) -> web.Response:
            f = files.get(name)
            if f is None:
                raise not_found()
            csp = content_security_policy(ws_url(), ancestors)
            headers = {"Content-Security-Policy": csp}
            if ancestors == "'none'":
                headers["X-Frame-Options"] = "DENY"
            return _answer(request, f, headers)

        return handler

    async def widget(request: web.Request) -> web.Response:
        f = files.get("widget.js")
        if f is None:
            raise not_found()
        return _answer(request, f, {"Access-Control-Allow-Origin": "*"})

    async def static(request: web.Request) -> web.Response:
        f = files.get(request.match_info["name"])
        if f is None:
            raise not_found()
        return _answer(request, f, {})

    app.router.add_route("GET", "/", root)
    for path, (name, ancestors) in _PAGES.items():
        app.router.add_route("GET", path, page(name, ancestors))  # type: ignore[arg-type]
    app.router.add_route("GET", "/widget.js", widget)
    app.router.add_route("GET", "/static/{name}", static)
