"""`besokskollen import FILE --site S` (SPEC §5.3): an NDJSON file (gzip or not, `-` for standard
input) in chunks of lines, either
posted to a running server's `/api/v1/events/import` or run through the importer and an embedded
stream core against the data folder directly. Chunks go one after another, each stored before
the next, so visitor ids come out as one request of the whole file would give them.

Line numbers in the summary count across the whole file, not per chunk."""

from __future__ import annotations

import gzip
import io
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

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

    def __str__(self) -> str:
        """With where it stopped, when that was past the first chunk (a server gone mid-import)."""
        totals: Totals | None = getattr(self, "totals", None)
        if totals is not None and totals.in_flight is None and totals.accepted:  # the file, read past a chunk
            return (f"{super().__str__()}; the chunks before were sent and are stored ({totals.accepted:,} events);"
                    " importing the whole file again is safe")
        if totals is None or totals.in_flight is None or totals.in_flight[0] == 1:
            return super().__str__()
        first, last = totals.in_flight
        return (f"{super().__str__()}; stopped at line {first:,}: the lines before it are stored ({totals.accepted:,}"
                f" events), lines {first:,}–{last:,} may be; importing the whole file again is safe")


class TooLarge(Exception):
    """The server refused the chunk's size (413): send it in smaller parts."""


@dataclass
class Totals:
    accepted: int = 0
    rejected: list[dict] = field(default_factory=list)
    dropped: int = 0
    unconfirmed: int = 0  # accepted by a server that had not stored them yet when it answered
    interrupted: bool = False  # Ctrl-C: what was sent before is stored, the rest was not sent
    in_flight: tuple[int, int] | None = None  # the lines of the chunk sent when interrupted


# Waiting for the rate limit (429) or a server that cannot store right now (503): as it says.
RETRY_AFTER_DEFAULT_S = 5.0
RETRY_AFTER_MAX_S = 60.0
UNAVAILABLE_TRIES = 10


def remote(url: str, key: str, site_id: str, sleep: Callable[[float], None] = time.sleep) -> Send:
    endpoint = url.rstrip("/") + "/api/v1/events/import"
    headers = {"content-type": "application/x-ndjson", "authorization": f"Bearer {key}"}

    def send(body: bytes) -> dict:
        unavailable = 0
        while True:
            try:
                # A request waits until its events are stored (Kafka: up to two minutes).
                response = httpx.post(endpoint, params={"site_id": site_id}, content=body, headers=headers, timeout=300)
            except httpx.HTTPError as exc:
                raise ImportFailed(f"could not reach {endpoint}: {exc}") from exc
            if response.status_code == 200:
                return response.json()["data"]
            if response.status_code == 413:
                raise TooLarge
            # The import counts against the key's rate limit like any API request; a busy or
            # recovering server says when to come back. Nothing of a refused chunk was stored.
            if response.status_code == 429 or (response.status_code == 503 and unavailable < UNAVAILABLE_TRIES):
                unavailable += response.status_code == 503
                sleep(_retry_after(response))
                continue
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise ImportFailed(f"{endpoint} answered {response.status_code}: {message}")

    return send


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.1), RETRY_AFTER_MAX_S)
    except ValueError:
        return RETRY_AFTER_DEFAULT_S


def local(settings: Settings, site_id: str) -> Send:
    """Open the storage itself (the embedded engine only when no server holds the folder)."""
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError
    from clickhouse_connect.driver.exceptions import OperationalError

    from besokskollen.app import open_services
    from ingest import importer
    from ingest.event import utcnow
    from streams import storage
    from streams.core import BatchChanged

    try:
        services = open_services(settings)
    except OperationalError:
        raise  # a server that does not answer: said in one line by the CLI, as by every one-shot command
    except ClickHouseError as exc:
        # A server's URL is named without its user:password@ (this line ends up in logs).
        where = settings.clickhouse_url if settings.clickhouse_url.startswith("chdb://") else \
            storage.server(settings.clickhouse_url)
        raise ImportFailed(f"cannot open {where} (if a server runs on it, import with --url): {exc}") from exc
    site = services.sites.get(site_id)
    if site is None:
        raise ImportFailed(f"no site with id {site_id!r}")
    core = services.stream_core()

    def send(body: bytes) -> dict:
        now = utcnow()
        parsed = importer.parse(body, site, now, services.visitors.id_key(), services.raw_events.complete_since(now))
        events = importer.to_events(parsed.lines, site, services.visitors)
        try:
            # Judged in front of the writes, as `up` and the workers judge a batch: a site deleted
            # meanwhile, and perhaps created again by another account, got the rest of the file.
            core.process(events, still_current=lambda: services.sites.is_current(site))  # stored when it returns
        except BatchChanged:
            raise ImportFailed(f"site {site_id!r} was deleted during the import; the lines before this part were"
                               " stored, and deleted with it") from None
        # Lines, as the endpoint counts them (copies of one event id are stored once).
        return {"accepted": len(parsed.lines), "rejected": parsed.rejected, "dropped": parsed.dropped, "stored": True}

    return send


# What a file starts with when it is compressed in a way the import does not read (`file`'s magic).
_OTHER_COMPRESSION = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
_GZIP = b"\x1f\x8b"
_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # "Not a gzipped file", "ended before …", "CRC check failed", bad data


class _Prefixed(io.RawIOBase):
    """A pipe whose first bytes were read to tell its format: those bytes, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._head[:len(buffer)] if self._head else self._rest.read1(len(buffer))
        self._head = self._head[len(data):]
        buffer[:len(data)] = data
        return len(data)


class Source:
    """The lines to import: a file or a pipe (`<(…)`, `-` for standard input), gzip-compressed or
    not (told by its first bytes, as `zcat` does). A gzip file is read through once before any
    line is sent — its checksum comes at its end, and a damaged one would have sent damaged lines
    first; from a pipe it is unpacked into a temporary file on the way. `size` and `done` are for
    the bar: bytes of the file as stored (None for a pipe: no total)."""

    def __init__(self, file: str | Path) -> None:
        file = str(file)
        self.name = "stdin" if file == "-" else file
        if file == "-" and sys.stdin is None:  # started with standard input closed (`<&-`)
            raise ImportFailed("there is no standard input to read (`-`)")
        try:
            self._opened = None if file == "-" else open(file, "rb")  # noqa: SIM115 - closed in __exit__
            self._stored: BinaryIO = self._opened or sys.stdin.buffer
            stat = os.fstat(self._stored.fileno())
            self.size = stat.st_size if S_ISREG(stat.st_mode) else None
            if self.size is not None:  # a file, also as standard input (`- < export.ndjson`)
                self.name = self.name if file == "-" else Path(file).name
                head = self._stored.read(6)
                self._stored.seek(0)
            else:
                head = self._stored.read(6)  # a pipe may hand over one byte at a time
                self._stored = io.BufferedReader(_Prefixed(head, self._stored))
        except OSError as exc:
            raise ImportFailed(f"cannot read {file}: {exc.strerror or exc}") from None
        for magic, kind in _OTHER_COMPRESSION.items():
            if head.startswith(magic):
                raise ImportFailed(f"{self.name} is {kind}-compressed; the import reads plain or gzip NDJSON"
                                   " (unpack it first, or pipe it: … | besokskollen import - --site S)")
        self.gzipped = head.startswith(_GZIP)
        self._lines: Iterable[bytes] = self._stored
        self._unpacked: BinaryIO | None = None
        self._read = 0

    def check(self, advance: Callable[[int], None]) -> None:
        """Read a gzip file through (its checksum is at its end); from a pipe, into a temporary
        file the lines are then read from. `advance(done)` as it goes. Plain text: nothing to do."""
        if not self.gzipped:
            return
        unpacked = None if self.size is not None else tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        try:
            with gzip.GzipFile(fileobj=self._stored) as packed:
                while block := packed.read(1 << 20):
                    if unpacked is not None:
                        unpacked.write(block)
                    advance(self._stored.tell() if self.size is not None else packed.tell())
        except _GZIP_ERRORS as exc:
            if unpacked is not None:
                unpacked.close()
            raise ImportFailed(f"{self.name} is not a whole gzip file ({exc}); nothing was imported") from None
        if unpacked is None:
            self._stored.seek(0)
            self._lines = gzip.GzipFile(fileobj=self._stored)
        else:  # read on from the unpacked copy, with its size for the bar
            self._unpacked = self._stored = self._lines = unpacked
            self.size = unpacked.tell()
            unpacked.seek(0)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self._opened, self._unpacked):
            if stream is not None:
                stream.close()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for line in self._lines:
                self._read += len(line)
                yield line
        except _GZIP_ERRORS as exc:  # checked before; the file changed since, or the disk failed
            raise ImportFailed(f"{self.name}: {exc}") from None

    @property
    def done(self) -> int:
        return self._stored.tell() if self.size is not None else self._read


def chunks(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(lines before the chunk, chunk body): CHUNK_LINES lines, fewer if they are long. A UTF-8
    byte order mark before the first line (Windows exports) is not part of it."""
    chunk: list[bytes] = []
    size = before = 0
    for number, line in enumerate(lines):
        chunk.append(line.removeprefix(b"\xef\xbb\xbf") if number == 0 else line)
        size += len(line)
        if len(chunk) == CHUNK_LINES or size >= CHUNK_BYTES:
            yield before, b"".join(chunk)
            before += len(chunk)
            chunk, size = [], 0
    if chunk:
        yield before, b"".join(chunk)


def run(file: str | Path, send: Send) -> Totals:
    """Import `file` (a path, or `-` for standard input) chunk by chunk through `send`."""
    totals = Totals()
    columns = (TextColumn("{task.fields[doing]} {task.fields[name]}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Source(file) as source, Progress(*columns, console=Console(stderr=True)) as progress:
        if source.gzipped:
            checking = progress.add_task("check", total=source.size, name=source.name, doing="checking")
            source.check(lambda done: progress.update(checking, completed=done))
            # Read through: the file's size, or from a pipe what it held.
            progress.update(checking, total=source.size, completed=source.size)
        task = progress.add_task("import", total=source.size, name=source.name, doing="importing")
        try:
            for before, body in chunks(source):
                totals.in_flight = (before + 1, before + body.count(b"\n") + (not body.endswith(b"\n")))
                _send(send, before, body, totals)
                totals.in_flight = None
                progress.update(task, completed=source.done)
        except KeyboardInterrupt:
            totals.interrupted = True
        except ImportFailed as exc:
            exc.totals = totals
            raise
        if not totals.interrupted:  # full, also without a total (a pipe) or a chunk (an empty file)
            progress.update(task, total=source.done, completed=source.done)
    return totals


def _send(send: Send, before: int, body: bytes, totals: Totals) -> None:
    """One chunk; one the server finds too large goes again in halves, and a single line too large
    for it is a rejected line, not the end of the import."""
    # The server refuses a body without events (400 empty_body); its blank lines (a BOM starts
    # any line of a joined file) only count.
    if not any(line.removeprefix(b"\xef\xbb\xbf").strip() for line in body.split(b"\n")):
        return
    try:
        data = send(body)
    except TooLarge:
        # Cut at newlines only, as the server counts lines: a lone CR is JSON whitespace.
        lines = [line + b"\n" for line in body.removesuffix(b"\n").split(b"\n")]
        if len(lines) == 1:
            totals.rejected.append({"line": before + 1, "field": "", "code": "line_too_large",
                                    "message": "line is larger than the server takes in one request"})
            return
        half = len(lines) // 2
        _send(send, before, b"".join(lines[:half]), totals)
        _send(send, before + half, b"".join(lines[half:]), totals)
        return
    totals.accepted += data["accepted"]
    totals.dropped += len(data["dropped"])
    totals.rejected += [{**r, "line": r["line"] + before} for r in data["rejected"]]
    totals.unconfirmed += 0 if data["stored"] else data["accepted"]


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
    if totals.interrupted:
        # The chunk on its way may have been stored, whole or in part, without its answer.
        flight = (f", and lines {totals.in_flight[0]:,}–{totals.in_flight[1]:,}, sent when it stopped, may be"
                  if totals.in_flight else "")
        print(f"interrupted: the lines counted above are stored{flight}; importing the whole file again is safe "
              "(each event is stored once)", file=sys.stderr)
        return 130
    return 1 if totals.rejected else 0
