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
unsent rest is copied to a new log that replaces it. A record torn by a crash mid-write fails its
length or CRC check at open and is cut off: it was never answered 202.

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
import errno
import fcntl
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

_HEADER = struct.Struct(">II")  # payload length, crc32 of the payload
_KEY_LENGTH = struct.Struct(">H")
_STAMPED = 0x8000  # in the key length: the accept time follows the key
_OF_INCARNATION = 0x4000  # in the key length: the site's incarnation follows the accept time
_FLAGS = _STAMPED | _OF_INCARNATION
_MAX_KEY = ~_FLAGS & 0xFFFF
_ACCEPTED = _INCARNATION = struct.Struct(">q")


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


class SpoolFull(Exception):
    """The spool holds its maximum; the caller must refuse the event (503), not drop it."""


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
        self._open_log()
        self._sent = int(self._pos.read_text() or 0) if self._pos.exists() else 0
        self._size, at_boundary = self._valid_length(self._sent)
        if self._size < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, self._size)  # a torn tail from a crash mid-write
        if not at_boundary:
            # A cursor inside a record would skip records and read the rest from mid-record:
            # send the log whole instead (duplicates are dropped by event id).
            self._sent = 0
        self._records = self._count(self._sent, self._size)

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
                raise SpoolFull(f"the spool is full ({self._size} of {self.max_bytes} bytes)")
            ends, end = [], self._base + self._size
            for payload in payloads:
                end += _HEADER.size + len(payload)
                ends.append(end)
            try:
                written = os.write(self._fd, data)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                written = 0
            if written < len(data):
                # A full disk writes what fits and says so only by the count. Kept, the torn record
                # would hide every later one from `read` and from the next start: cut it, refuse all.
                os.ftruncate(self._fd, self._size)
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

    def _compact(self, start: int, end: int) -> None:
        """Replace the log by its unsent rest. The rest up to `end` is copied and fsynced while
        appends go on; what they added meanwhile is copied at the swap. The cursor goes to 0 before
        the swap: a crash in between replays the old log whole, and a replayed record is stored
        once downstream anyway."""
        tmp = self.directory / "spool.log.new"
        with open(tmp, "wb") as out:
            out.write(os.pread(self._read_fd, end - start, start))
            out.flush()
            os.fsync(out.fileno())
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
        tmp = self._pos.with_suffix(".tmp")
        tmp.write_text(str(sent))
        os.replace(tmp, self._pos)

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

    def _valid_length(self, cursor: int) -> tuple[int, bool]:
        """Length of the log's prefix made of whole records with good checksums, and whether
        `cursor` is a record boundary in it."""
        size, offset, at_boundary = os.fstat(self._read_fd).st_size, 0, cursor == 0
        while offset + _HEADER.size <= size:
            length, crc = _HEADER.unpack(os.pread(self._read_fd, _HEADER.size, offset))
            end = offset + _HEADER.size + length
            if end > size:
                break
            payload = os.pread(self._read_fd, length, offset + _HEADER.size)
            # Zeros pass the CRC (crc32 of nothing is 0): a tail of them, as a file system leaves
            # after a power loss (size grown, data not written), would stop `read` for good.
            if zlib.crc32(payload) != crc or not _parses(payload):
                break
            offset = end
            at_boundary = at_boundary or offset == cursor
        return offset, at_boundary
