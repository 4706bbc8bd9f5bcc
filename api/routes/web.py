"""The dashboard page (docs/dashboard.md): `/` and its assets under `/web/`, from api/web/.

Plain files (ES modules, CSS, SVG): no build step, nothing fetched from elsewhere at run
time. Each answer carries a strict Content-Security-Policy (scripts, styles, images and
connections from this origin only; no inline script or style, no framing), `nosniff` and
no referrer. The files are read once, on the first request, and revalidated by ETag
(`Cache-Control: no-cache`): a new release is seen on the next load, an unchanged file costs
a 304. Only the files in api/web/ are served (a fixed table, no path from the request
reaches the file system), and none of them under /v1, /ws, /healthz, /metrics or
/clickhouse.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from api.errors import APIError
from core.settings import Settings

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSET_PREFIX = "/web/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@functools.cache
def assets() -> dict[str, Asset]:
    """Every servable file of api/web/ by name, read once."""
    found: dict[str, Asset] = {}
    for path in sorted(WEB_DIR.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        found[path.name] = Asset(body, content_type,
                                 '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return found


def _answer(asset: Asset, request: Request, if_none_match: str | None) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if if_none_match is not None and asset.etag in {
            tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    response = Response(body, media_type=asset.content_type, headers=headers)
    if request.method == "HEAD":
        response.headers["Content-Length"] = str(len(asset.body))
    return response


IfNoneMatch = Annotated[str | None, Header()]


@functools.cache
def index(dev: bool) -> Asset:
    """The page, told whether the server is in dev mode (which offers the demo sign-in):
    an attribute, not an inline script, so the Content-Security-Policy stays strict."""
    page = assets()["index.html"]
    if not dev:
        return page
    body = page.body.replace(b'data-mode="prod"', b'data-mode="dev"', 1)
    return Asset(body, page.content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


@router.api_route("/", methods=["GET", "HEAD"])
def page(request: Request, if_none_match: IfNoneMatch = None) -> Response:
    """The dashboard."""
    settings: Settings = request.app.state.settings
    return _answer(index(settings.dev), request, if_none_match)


@router.api_route(ASSET_PREFIX + "{name}", methods=["GET", "HEAD"])
def asset(name: str, request: Request, if_none_match: IfNoneMatch = None) -> Response:
    """One of the page's files; 404 for any other name."""
    found = assets().get(name)
    if found is None or name == "index.html":
        raise APIError(404, "not_found", "Not Found")
    return _answer(found, request, if_none_match)
