"""The local spool (SPEC §5.5): events Kafka did not acknowledge in time, kept on disk in arrival
order until they are sent, so a broker outage never blocks or loses a beacon.

One directory per ingest process (a lock file keeps a second process out):
- `spool.log`: append-only records, each `length (4 bytes) | crc32 (4) | key length (2) | key |
  accepted (8) | incarnation (8) | value`: `accepted` is when ingest took the event (ms since the
  epoch), `incarnation` the incarnation of its site (`Site.incarnation`). The two top bits of the
  key length say which are there: a log written before they were kept has neither, one written
  before 2026-12-03 no incarnation;
- `spool.pos`: how many bytes of the log are sent (replaced atomically).
When everything is sent the log is truncated to empty. When it never is (the embedded journal under
steady traffic always has a batch in flight), the log is compacted once its sent part is large: the
unsent rest is copied to a new log that replaces it.

At open, a record that fails its length or CRC check is not the end of the log: the records after
it were answered 202 too. A torn or zeroed tail (a crash mid-write, a power loss) is cut off; bytes
damaged in the middle are skipped up to the next whole record, the log is rewritten without them
and the damaged file is kept beside it for the operator (`spool.log.damaged-<time>`), each with
a WARNING. A cursor file that is no number sends the log whole (duplicates are dropped by event
id downstream).

Offsets handed out (`append`, `read`) and taken back (`commit`) count every byte ever appended in
this process, so they stay valid across truncations and compactions.

An append is one `write` on an O_APPEND descriptor, so an event answered 202 survives a kill -9
of the process at once; it reaches the disk itself within `sync()`'s period (a power loss can
take the last second).

Appends come from the event loop; `commit` (with the `read`s before it: one consumer) and `sync`
may run on worker threads, because a cursor's rename or a compaction's fsync can wait 100 ms and
more while the disk writes back ClickHouse's parts. Appends wait only for counter updates and
the final swap of a compaction, never for its copy or fsync."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from besokskollen.logs import Repeats

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")  # payload length, crc32 of the payload
_KEY_LENGTH = struct.Struct(">H")
_STAMPED = 0x8000  # in the key length: the accept time follows the key
_OF_INCARNATION = 0x4000  # in the key length: the site's incarnation follows the accept time
_FLAGS = _STAMPED | _OF_INCARNATION
_MAX_KEY = ~_FLAGS & 0xFFFF
_ACCEPTED = _INCARNATION = struct.Struct(">q")
# No record is near this long (an event is a few KiB): a longer length read while looking for the
# next whole record after damaged bytes is itself damage, not worth a CRC over megabytes.
_LONGEST_RECORD = 16 * 1024 * 1024
# A client refused (503) because the spool cannot take its event should come back when an outage
# may be over.
RETRY_AFTER_S = 30
# A spool that cannot take events says so once a minute, with how many it refused meanwhile.
_REFUSALS_LOGGED_EVERY_S = 60.0


class Record(NamedTuple):
    key: bytes
    value: bytes
    # When ingest took the event, in ms since the epoch: what Kafka's record timestamp says of an
    # event sent at once, and of a spooled one once it is sent (a worker judges by it whether the
    # event is of a deleted site). None in a log written before it was kept.
    accepted_ms: int | None
    # The incarnation of the event's site ingest took it for (`Site.incarnation`), sent as the
    # record's `bk-site` header (streams/topic.py). None in a log written before it was kept.
    incarnation: int | None = None


class _Scan(NamedTuple):
    """What `open` found in the log: the spans of whole records, the damaged spans between them,
    where the last whole record ends, and the cursor as a byte offset into the kept records (0 when
    the cursor was no record boundary)."""
    kept: list[tuple[int, int]]
    damaged: list[tuple[int, int]]
    end: int
    cursor: int

    @property
    def length(self) -> int:
        return sum(end - start for start, end in self.kept)


def _whole_record(data: mmap.mmap, offset: int, size: int, longest: int | None = None) -> int | None:
    """Where the record at `offset` ends, if one whole, with a good checksum, starts there."""
    length, crc = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if end > size or (longest is not None and length > longest):
        return None
    payload = data[offset + _HEADER.size:end]
    # Zeros pass the CRC (crc32 of nothing is 0): a tail of them, as a file system leaves after a
    # power loss (size grown, data not written), would stop `read` for good.
    if zlib.crc32(payload) != crc or not _parses(payload):
        return None
    return end


def _payload(key: bytes, value: bytes, accepted_ms: int, incarnation: int | None) -> bytes:
    if len(key) > _MAX_KEY:
        raise ValueError(f"a spool record's key is at most {_MAX_KEY} bytes")
    if incarnation is None:
        return _KEY_LENGTH.pack(len(key) | _STAMPED) + key + _ACCEPTED.pack(accepted_ms) + value
    return (_KEY_LENGTH.pack(len(key) | _FLAGS) + key + _ACCEPTED.pack(accepted_ms) + _INCARNATION.pack(incarnation)
            + value)


def _fields(payload: bytes) -> tuple[int, int]:
    """Where the key ends and where the value starts."""
    (field,) = _KEY_LENGTH.unpack_from(payload)
    end = _KEY_LENGTH.size + (field & ~_FLAGS)
    stamps = (_ACCEPTED.size if field & _STAMPED else 0) + (_INCARNATION.size if field & _OF_INCARNATION else 0)
    return end, end + stamps


def _record(payload: bytes) -> Record:
    (field,) = _KEY_LENGTH.unpack_from(payload)
    end, value = _fields(payload)
    key = payload[_KEY_LENGTH.size:end]
    accepted = incarnation = None
    if field & _STAMPED:
        (accepted,) = _ACCEPTED.unpack_from(payload, end)
        end += _ACCEPTED.size
    if field & _OF_INCARNATION:
        (incarnation,) = _INCARNATION.unpack_from(payload, end)
    return Record(key, payload[value:], accepted, incarnation)


def _parses(payload: bytes) -> bool:
    """Whether the payload is long enough for the key (and stamps) its key length names."""
    return len(payload) >= _KEY_LENGTH.size and _fields(payload)[1] <= len(payload)


class SpoolRefused(Exception):
    """The spool cannot keep the event; the caller must refuse it (503), not drop it."""


class SpoolFull(SpoolRefused):
    """The spool holds its maximum, or the disk is full."""


class SpoolUnwritable(SpoolRefused):
    """The log cannot be written (permissions, a read-only or failing disk)."""


class SpoolLocked(Exception):
    """Another process is using this spool directory."""


class Spool:
    def __init__(self, directory: Path, max_bytes: int, compact_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        # A log never empty when a batch commits (steady traffic) grows by what is written until
        # it is compacted: at a quarter of the bound at most, or a small bound filled (503) with
        # next to nothing waiting. Full then means at least half the bound unsent.
        self.compact_bytes = min(compact_bytes, max_bytes // 4)
        self._log = directory / "spool.log"
        self._pos = directory / "spool.pos"
        self._lock_fd = self._fd = self._read_fd = -1
        self._size = self._sent = self._records = 0  # in the log file
        self._base = 0  # bytes dropped from the front of the log in this process
        self._dirty = False
        # A full or unwritable spool refuses every event: one line a minute says so, with a count.
        self._repeats = Repeats(_REFUSALS_LOGGED_EVERY_S)
        # `_state` guards the counters and the log's descriptors against a commit on another
        # thread; `_swap` keeps a compaction from swapping the log under an fsync. Order: `_swap`
        # first, so that an fsync holding `_swap` never makes an append wait.
        self._state = threading.Lock()
        self._swap = threading.Lock()

    def open(self) -> None:
        """Lock the directory and check the log. A second call is a no-op: the CLI opens a server's
        spool before the server starts, so a full log is checked once and the lock never lapses."""
        if self._fd >= 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "spool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool directory {self.directory} is in use by another process;"
                              " give each ingest process its own BK_SPOOL_DIR") from None
        try:
            self._open_log()
            cursor = self._read_pos()
            scan = self._scan(cursor)
            size = os.fstat(self._fd).st_size
            if scan.damaged:
                self._rewrite(scan, size - scan.end)
            elif scan.end < size:
                self._cut_tail(scan.end)
        except BaseException:
            for fd in (self._fd, self._read_fd, self._lock_fd):
                if fd >= 0:
                    os.close(fd)
            self._lock_fd = self._fd = self._read_fd = -1
            raise
        self._size = scan.length
        # A cursor that is no record boundary would skip records and read the rest from
        # mid-record: the log is sent whole instead (duplicates are dropped by event id).
        self._sent = scan.cursor
        self._records = self._count(self._sent, self._size)

    def _read_pos(self) -> int:
        try:
            text = self._pos.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            log.warning("%s holds %r, not a byte offset; the spool is sent whole again (events are stored once)",
                        self._pos, text[:40])
            return 0
        return int(text)

    def _scan(self, cursor: int) -> _Scan:
        """Walk the log's records; past bytes that are no whole record, look for the next one."""
        size = os.fstat(self._read_fd).st_size
        kept: list[tuple[int, int]] = []
        damaged: list[tuple[int, int]] = []
        offset = length = 0
        mapped = 0
        if size == 0:
            return _Scan(kept, damaged, 0, 0)
        with mmap.mmap(self._read_fd, size, access=mmap.ACCESS_READ) as data:
            while offset + _HEADER.size <= size:
                end = _whole_record(data, offset, size)
                if end is None:
                    resume = next((at for at in range(offset + 1, size - _HEADER.size + 1)
                                   if _whole_record(data, at, size, _LONGEST_RECORD) is not None), None)
                    if resume is None:
                        break  # a tail that is no record
                    damaged.append((offset, resume))
                    offset = resume
                    continue
                if kept and kept[-1][1] == offset:
                    kept[-1] = (kept[-1][0], end)
                else:
                    kept.append((offset, end))
                length += end - offset
                offset = end
                if offset == cursor:
                    mapped = length
        return _Scan(kept, damaged, offset, mapped)

    def _rewrite(self, scan: _Scan, tail: int) -> None:
        """Replace a log damaged in the middle by its whole records (without the `tail` bytes after
        the last one either); the damaged file stays whole."""
        skipped = sum(end - start for start, end in scan.damaged) + tail
        tmp = self.directory / "spool.log.new"
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                for start, end in scan.kept:
                    out.write(os.pread(self._read_fd, end - start, start))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            # Nothing changed: a start with room (or the damaged file moved away) repairs it.
            raise OSError(exc.errno, f"{self._log} is damaged ({skipped} bytes), and"
                                     f" rewriting it without them needs {scan.length} bytes beside it:"
                                     f" {exc.strerror or exc}") from None
        kept_as = self._unused_name("spool.log.damaged")
        os.link(self._log, kept_as)
        self._write_pos(0)  # a crash from here sends whichever log it finds whole, and stores it once
        os.replace(tmp, self._log)
        os.close(self._fd)
        os.close(self._read_fd)
        self._open_log()
        if scan.cursor:
            self._write_pos(scan.cursor)
        after = scan.damaged[-1][1]
        log.warning("%s: %d bytes in %d place(s) are damaged (they fail their checksums; %d of them at its end); the"
                    " events in them are lost, the %d bytes of whole records before and after are kept (%d after"
                    " the last damage), and the damaged file is kept as %s", self._log, skipped,
                    len(scan.damaged) + bool(tail), tail, scan.length,
                    sum(end - max(start, after) for start, end in scan.kept if end > after), kept_as)

    def _cut_tail(self, end: int) -> None:
        """Cut what follows the last whole record: a write torn by a crash (never answered 202), or
        zeros a power loss left; bytes that are not zeros are kept beside the log."""
        tail = os.pread(self._read_fd, os.fstat(self._read_fd).st_size - end, end)
        if tail.strip(b"\0"):
            kept_as = self._unused_name("spool.log.cut")
            with open(os.open(kept_as, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(tail)
            log.warning("%s: cut %d bytes at its end that are no whole record (a write torn by a crash, never"
                        " answered 202, or damage); they are kept as %s", self._log, len(tail), kept_as)
        else:
            log.warning("%s: cut %d bytes of zeros at its end (left by a power loss)", self._log, len(tail))
        os.ftruncate(self._fd, end)

    def _unused_name(self, prefix: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1, 10_000):
            path = self.directory / (f"{prefix}-{stamp}" + (f".{n}" if n > 1 else ""))
            if not path.exists():
                return path
        raise FileExistsError(f"{prefix}-{stamp}")

    def _say(self, level: int, message: str, *args: object) -> None:
        """Log, at most once a minute for each message (with how many were left out)."""
        if log.isEnabledFor(level):
            record = log.makeRecord(log.name, level, __file__, 0, message, args, None)
            if self._repeats.filter(record):
                log.handle(record)

    def _open_log(self) -> None:
        self._fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._read_fd = os.open(self._log, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            with self._swap:
                for fd in (self._fd, self._read_fd, self._lock_fd):
                    os.close(fd)
                self._lock_fd = self._fd = self._read_fd = -1

    @property
    def pending_bytes(self) -> int:
        """Bytes of records not yet sent (under the lock: a compaction moves both counters)."""
        with self._state:
            return self._size - self._sent

    @property
    def pending_records(self) -> int:
        return self._records

    @property
    def size_bytes(self) -> int:
        """The log's size, which `max_bytes` bounds (it shrinks once everything is sent)."""
        return self._size

    def append(self, key: bytes, value: bytes, accepted_ms: int | None = None, incarnation: int | None = None) -> int:
        """Returns the offset after this record (what `commit` takes once it is sent)."""
        return self.append_all([Record(key, value, accepted_ms, incarnation)])[-1]

    def append_all(self, records: Sequence[Record]) -> list[int]:
        """Append these records (an `accepted_ms` of None: now) with one `write`, all or none;
        returns the offset after each (a consumer may send them in more than one go)."""
        now = time.time_ns() // 1_000_000
        payloads = [_payload(r.key, r.value, now if r.accepted_ms is None else r.accepted_ms, r.incarnation)
                    for r in records]
        data = b"".join(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload for payload in payloads)
        with self._state:
            if self._size + len(data) > self.max_bytes:
                self._say(logging.WARNING, "the spool in %s is full (BK_SPOOL_MAX_BYTES, %d bytes): events are answered"
                          " 503 until what it holds is sent on", self.directory, self.max_bytes)
                raise SpoolFull(f"the spool is full ({self._size} of {self.max_bytes} bytes)")
            ends, end = [], self._base + self._size
            for payload in payloads:
                end += _HEADER.size + len(payload)
                ends.append(end)
            try:
                written = os.write(self._fd, data)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    self._say(logging.ERROR, "cannot write to %s (%s): events are answered 503 until it can",
                              self._log, exc.strerror or exc)
                    raise SpoolUnwritable(f"cannot write to {self._log}: {exc.strerror or exc}") from None
                written = 0
            if written < len(data):
                # A full disk writes what fits and says so only by the count. Kept, the torn record
                # would hide every later one from `read`: cut it, refuse all.
                os.ftruncate(self._fd, self._size)
                self._say(logging.ERROR, "no space left on the disk of %s: events are answered 503 until there is",
                          self.directory)
                raise SpoolFull(f"no space left on the disk of {self.directory}")
            self._size += len(data)
            self._records += len(records)
            self._dirty = True
            return ends

    def read(self, max_records: int) -> tuple[list[Record], int]:
        """Up to `max_records` unsent records, oldest first, and the offset to `commit` once they
        are sent."""
        records: list[Record] = []
        offset = self._sent
        with self._state:
            size = self._size
        while len(records) < max_records and offset < size:
            length, _crc = _HEADER.unpack(os.pread(self._read_fd, _HEADER.size, offset))
            payload = os.pread(self._read_fd, length, offset + _HEADER.size)
            records.append(_record(payload))
            offset += _HEADER.size + length
        return records, self._base + offset

    def commit(self, offset: int, records: int | None = None) -> None:
        """Everything before `offset` is sent (`records` records, if the caller knows). When that
        is everything, the log starts over; when the sent part is large, it is compacted. Only the
        committing thread moves `_sent` and `_base`, so it reads them without the lock."""
        offset -= self._base
        done = self._count(self._sent, offset) if records is None else records
        with self._state:
            self._records -= done
            self._sent = offset
            everything, size = offset >= self._size, self._size
        try:
            if everything:
                # The cursor goes to 0 first, as in `_compact`: a kill between the two replays the
                # sent log whole, where a stale cursor over a truncated log would skip later records.
                self._write_pos(0)
                with self._state:
                    if self._size == size:  # nothing was appended meanwhile
                        os.ftruncate(self._fd, 0)
                        self._base += self._size
                        self._size = self._sent = self._records = 0
                        return
                self._write_pos(offset)
            elif offset >= self.compact_bytes and size - offset <= offset:
                self._compact(offset, size)
            else:
                self._write_pos(offset)
        except OSError as exc:
            # The records are sent; only the record of it is not saved. A restart sends them again
            # (stored once downstream); raising would stop the sending.
            self._say(logging.ERROR, "cannot save the progress of the spool in %s (%s): a restart sends again what"
                      " was sent since, and the log grows until it can start over", self.directory,
                      exc.strerror or exc)

    def _compact(self, start: int, end: int) -> None:
        """Replace the log by its unsent rest. The rest up to `end` is copied and fsynced while
        appends go on; what they added meanwhile is copied at the swap. The cursor goes to 0 before
        the swap: a crash in between replays the old log whole, and a replayed record is stored
        once downstream anyway."""
        tmp = self.directory / "spool.log.new"
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                out.write(os.pread(self._read_fd, end - start, start))
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._write_pos(0)
        with self._swap, self._state:
            tail = os.pread(self._read_fd, self._size - end, end)
            if tail:
                with open(tmp, "ab") as out:
                    out.write(tail)
            os.replace(tmp, self._log)
            os.close(self._fd)
            os.close(self._read_fd)
            self._open_log()
            self._base += start
            self._size -= start
            self._sent = 0
            self._dirty = bool(tail)  # the rest up to `end` is on the disk already

    async def commit_off_loop(self, offset: int, records: int | None = None) -> None:
        """`commit` on a worker thread, finished even when the caller is cancelled: `close` must
        not run under it."""
        done = asyncio.ensure_future(asyncio.to_thread(self.commit, offset, records))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await done
            raise

    def _write_pos(self, sent: int) -> None:
        if not sent:
            # No cursor file is cursor 0: removing it needs no room on a full disk.
            with contextlib.suppress(FileNotFoundError):
                self._pos.unlink()
            return
        tmp = self._pos.with_suffix(".tmp")
        try:
            tmp.write_text(str(sent))
            os.replace(tmp, self._pos)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def sync(self) -> None:
        with self._swap:
            with self._state:
                # Cleared before the fsync: an append during it sets it again for the next sync.
                dirty, self._dirty = self._dirty, False
            if dirty and self._fd >= 0:
                try:
                    os.fsync(self._fd)
                except OSError:
                    self._dirty = True
                    raise

    def _count(self, start: int, end: int) -> int:
        """Records between two record boundaries (headers only are read)."""
        n, offset = 0, start
        while offset < end:
            (length, _crc) = _HEADER.unpack(os.pread(self._read_fd, _HEADER.size, offset))
            offset += _HEADER.size + length
            n += 1
        return n
