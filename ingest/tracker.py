"""`GET /js/script.js` (SPEC §5.4): the tracker, served from memory with a strong ETag, gzip when
the browser takes it, and a day of caching (a new release reaches sites within a day; the ETag
makes the revalidation after that a 304)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import rjsmin
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Comments and layout are for the people who read tracker.js, not for every page view: served
# minified (rjsmin only drops them; no name is changed), which halves the gzipped size.
SCRIPT = rjsmin.jsmin(Path(__file__).with_name("tracker.js").read_text(encoding="utf-8")).encode()
GZIPPED = gzip.compress(SCRIPT, compresslevel=9, mtime=0)
# A strong ETag names one representation: the gzipped bytes get one of their own.
ETAG = '"' + hashlib.blake2b(SCRIPT, digest_size=10).hexdigest() + '"'
GZIP_ETAG = ETAG[:-1] + '-gzip"'
_HEADERS = {
    "cache-control": "public, max-age=86400, stale-while-revalidate=604800",
    "vary": "Accept-Encoding",
    "access-control-allow-origin": "*",
    "x-content-type-options": "nosniff",
}
_MEDIA_TYPE = "application/javascript; charset=utf-8"


def _wants_gzip(request: Request) -> bool:
    """gzip is listed, and not with q=0 (RFC 9110 §12.5.3)."""
    for part in request.headers.get("accept-encoding", "").split(","):
        coding, *params = [piece.strip() for piece in part.split(";")]
        if coding.lower() == "gzip":
            return not any(p.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


async def script(request: Request) -> Response:
    zipped = _wants_gzip(request)
    etag = GZIP_ETAG if zipped else ETAG
    headers = {**_HEADERS, "etag": etag}
    wanted = request.headers.get("if-none-match", "")
    if wanted.strip() == "*" or etag in [tag.strip().removeprefix("W/") for tag in wanted.split(",")]:
        return Response(status_code=304, headers=headers)
    if zipped:
        return Response(GZIPPED, media_type=_MEDIA_TYPE, headers={**headers, "content-encoding": "gzip"})
    return Response(SCRIPT, media_type=_MEDIA_TYPE, headers=headers)


ROUTES = [Route("/js/script.js", script, methods=["GET", "HEAD"])]
