"""`besokskollen import FILE --site S` (SPEC §5.3): an NDJSON file in chunks of lines, either
posted to a running server's `/api/v1/events/import` or run through the importer and an embedded
stream core against the data folder directly. Chunks go one after another, each stored before
the next, so visitor ids come out as one request of the whole file would give them.

Line numbers in the summary count across the whole file, not per chunk."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from besokskollen.config import Settings

CHUNK_LINES = 5000
# Well under the server's default BK_MAX_IMPORT_BYTES, whatever the length of the lines.
CHUNK_BYTES = 8 * 1024 * 1024
SHOWN_REJECTIONS = 20

# One chunk's body → the import reply's `data`.
Send = Callable[[bytes], dict]


class ImportFailed(Exception):
    """A usage or connection problem: nothing more can be imported (exit code 2)."""


@dataclass
class Totals:
    accepted: int = 0
    rejected: list[dict] = field(default_factory=list)
    dropped: int = 0
    unconfirmed: int = 0  # accepted by a server that had not stored them yet when it answered


def remote(url: str, key: str, site_id: str) -> Send:
    endpoint = url.rstrip("/") + "/api/v1/events/import"
    headers = {"content-type": "application/x-ndjson", "authorization": f"Bearer {key}"}

    def send(body: bytes) -> dict:
        try:
            # A request waits until its events are stored (Kafka: up to two minutes).
            response = httpx.post(endpoint, params={"site_id": site_id}, content=body, headers=headers, timeout=300)
        except httpx.HTTPError as exc:
            raise ImportFailed(f"could not reach {endpoint}: {exc}") from exc
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ImportFailed(f"{endpoint} answered {response.status_code}: {message}")
        return response.json()["data"]

    return send


def local(settings: Settings, site_id: str) -> Send:
    """Open the storage itself (the embedded engine only when no server holds the folder)."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    from besokskollen.app import open_services
    from ingest import importer
    from ingest.event import utcnow
    from streams.core import StreamCore

    try:
        services = open_services(settings)
    except ClickHouseError as exc:
        raise ImportFailed(f"cannot open {settings.clickhouse_url} (if a server runs on it, import with --url): "
                           f"{exc}") from exc
    site = services.sites.get(site_id)
    if site is None:
        raise ImportFailed(f"no site with id {site_id!r}")
    core = StreamCore(services.client, settings.session_timeout_s)

    def send(body: bytes) -> dict:
        parsed = importer.parse(body, site, utcnow(), settings.raw_events_ttl_days)
        events = importer.to_events(parsed.lines, site, services.visitors)
        core.process(events)  # stored when it returns
        return {"accepted": len(events), "rejected": parsed.rejected, "dropped": parsed.dropped, "stored": True}

    return send


def chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(lines before the chunk, chunk body): CHUNK_LINES lines, fewer if they are long."""
    lines: list[bytes] = []
    size = before = 0
    with open(path, "rb") as f:
        for line in f:
            lines.append(line)
            size += len(line)
            if len(lines) == CHUNK_LINES or size >= CHUNK_BYTES:
                yield before, b"".join(lines)
                before += len(lines)
                lines, size = [], 0
    if lines:
        yield before, b"".join(lines)


def run(path: Path, send: Send) -> Totals:
    totals = Totals()
    columns = (TextColumn("importing {task.fields[name]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("import", total=path.stat().st_size, name=path.name)
        for before, body in chunks(path):
            if body.strip():  # the server refuses an empty body; blank lines only count
                data = send(body)
                totals.accepted += data["accepted"]
                totals.dropped += len(data["dropped"])
                totals.rejected += [{**r, "line": r["line"] + before} for r in data["rejected"]]
                totals.unconfirmed += 0 if data["stored"] else data["accepted"]
            progress.advance(task, len(body))
    return totals


def report(totals: Totals) -> int:
    """Print the summary; the exit code: 0 when every line was accepted or dropped, else 1."""
    print(f"accepted {totals.accepted}, rejected {len(totals.rejected)}, dropped {totals.dropped} (bots)")
    if totals.unconfirmed:
        print(f"{totals.unconfirmed} accepted events were not yet stored when the server answered; "
              "they are on their way through Kafka", file=sys.stderr)
    for r in totals.rejected[:SHOWN_REJECTIONS]:
        print(f"  line {r['line']}: {r['message']} ({r['code']})")  # the message names the field
    if len(totals.rejected) > SHOWN_REJECTIONS:
        print(f"  … and {len(totals.rejected) - SHOWN_REJECTIONS} more rejected lines")
    return 1 if totals.rejected else 0
