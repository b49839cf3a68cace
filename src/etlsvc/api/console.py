"""The operator console and the API docs' assets, served by ``etlsvc serve``.

Owns ``/console`` (one HTML page; its script and styles under ``/console/assets``), the
redirect from ``/``, and the Swagger UI and ReDoc files under ``/console/vendor`` that
``/schema/swagger`` and ``/schema/redoc`` load instead of a CDN. The console is static: its
script reads the JSON API with the key the operator enters once per tab (see
``static/console/console.js``), so this module holds no page logic.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from litestar import MediaType, Request, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin
from litestar.params import FromPath
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"
VENDOR = "/console/vendor"
FAVICON = "<link rel='icon' type='image/svg+xml' href='/console/assets/favicon.svg'>"

#: The console may load only what this process serves, and may talk only to it.
CONSOLE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/console")


@get("/console", include_in_schema=False, media_type=MediaType.HTML)
async def page() -> Response[bytes]:
    """The console's page (the script does the rest)."""
    return Response((STATIC / "console" / "index.html").read_bytes(), media_type=MediaType.HTML,
                    headers={"Content-Security-Policy": CONSOLE_CSP,
                             "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


#: The vendored files by name, read once: they are stored gzip-compressed.
VENDORED = {p.name.removesuffix(".gz"): p for p in (STATIC / "vendor").glob("*.gz")}


@cache
def _vendored(name: str) -> bytes:
    return VENDORED[name].read_bytes()


@get(f"{VENDOR}/{{name:str}}", include_in_schema=False)
async def vendored(request: Request, name: FromPath[str]) -> Response[bytes]:
    """A Swagger UI or ReDoc file, stored gzip-compressed: sent as it is to a browser that
    accepts gzip, decompressed for one that does not."""
    if name not in VENDORED:
        raise NotFoundException(f"no asset {name!r}")
    body = _vendored(name)
    headers = {"Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
    else:
        body = gzip.decompress(body)
    return Response(body, media_type=_TYPES[Path(name).suffix], headers=headers)


ASSETS = create_static_files_router(
    "/console/assets", [STATIC / "console"], name="console-assets",
    cache_control=CacheControlHeader(no_cache=True))

HANDLERS = [root, page, vendored, ASSETS]

#: /schema/swagger and /schema/redoc, on the vendored files.
DOCS_PLUGINS = [
    SwaggerRenderPlugin(js_url=f"{VENDOR}/swagger-ui-bundle.js",
                        css_url=f"{VENDOR}/swagger-ui.css",
                        standalone_preset_js_url=f"{VENDOR}/swagger-ui-standalone-preset.js",
                        favicon=FAVICON),
    RedocRenderPlugin(path="/redoc", js_url=f"{VENDOR}/redoc.standalone.js", google_fonts=False,
                      favicon=FAVICON),
]
