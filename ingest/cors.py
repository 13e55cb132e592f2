"""The CORS headers of the tracking endpoint (`/api/event`, SPEC §5.1: CORS `*`), on every answer —
also the one a server gives while it starts (`besokskollen/health.py`)."""

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, OPTIONS",
    "access-control-allow-headers": "content-type",
    "access-control-max-age": "86400",
    # So a page's script can see why an event was dropped, and when to send a refused one again.
    "access-control-expose-headers": "x-dropped, retry-after",
}
