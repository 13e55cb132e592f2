"""`GET /js/script.js` (SPEC §5.4): the tracker, served from memory with a strong ETag, gzip when
the browser takes it, and a day of caching (a new release reaches sites within a day; the ETag
makes the revalidation after that a 304)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SOURCE = (Path(__file__).with_name("tracker.js")).read_bytes()
GZIPPED = gzip.compress(SOURCE, compresslevel=9, mtime=0)
ETAG = '"' + hashlib.blake2b(SOURCE, digest_size=10).hexdigest() + '"'
_HEADERS = {
    "cache-control": "public, max-age=86400, stale-while-revalidate=604800",
    "etag": ETAG,
    "vary": "Accept-Encoding",
    "access-control-allow-origin": "*",
    "x-content-type-options": "nosniff",
}
_MEDIA_TYPE = "application/javascript; charset=utf-8"


def _wants_gzip(request: Request) -> bool:
    return any(part.split(";")[0].strip() == "gzip" for part in request.headers.get("accept-encoding", "").split(","))


async def script(request: Request) -> Response:
    if ETAG in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=_HEADERS)
    if _wants_gzip(request):
        return Response(GZIPPED, media_type=_MEDIA_TYPE, headers={**_HEADERS, "content-encoding": "gzip"})
    return Response(SOURCE, media_type=_MEDIA_TYPE, headers=_HEADERS)


ROUTES = [Route("/js/script.js", script, methods=["GET", "HEAD"])]
