"""The local spool (SPEC §5.5): events Kafka did not acknowledge in time, kept on disk in arrival
order until they are sent, so a broker outage never blocks or loses a beacon.

One directory per ingest process (a lock file keeps a second process out):
- `spool.log`: append-only records, each `length (4 bytes) | crc32 (4) | key length (2) | key | value`;
- `spool.pos`: how many bytes of the log are sent (replaced atomically).
When everything is sent the log is truncated to empty. When it never is (the embedded journal under
steady traffic always has a batch in flight), the log is compacted once its sent part is large: the
unsent rest is copied to a new log that replaces it. A record torn by a crash mid-write fails its
length or CRC check at open and is cut off: it was never answered 202.

Offsets handed out (`append`, `read`) and taken back (`commit`) count every byte ever appended in
this process, so they stay valid across truncations and compactions.

An append is one `write` on an O_APPEND descriptor, so an event answered 202 survives a kill -9
of the process at once; it reaches the disk itself within `sync()`'s period (a power loss can
take the last second)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import zlib
from pathlib import Path

_HEADER = struct.Struct(">II")  # payload length, crc32 of the payload
_KEY_LENGTH = struct.Struct(">H")


class SpoolFull(Exception):
    """The spool holds its maximum; the caller must refuse the event (503), not drop it."""


class SpoolLocked(Exception):
    """Another process is using this spool directory."""


class Spool:
    def __init__(self, directory: Path, max_bytes: int, compact_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.compact_bytes = compact_bytes
        self._log = directory / "spool.log"
        self._pos = directory / "spool.pos"
        self._lock_fd = self._fd = self._read_fd = -1
        self._size = self._sent = self._records = 0  # in the log file
        self._base = 0  # bytes dropped from the front of the log in this process
        self._dirty = False
        # `sync` runs on a worker thread; a compaction must not swap the log under its fsync.
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
        """Bytes of records not yet sent."""
        return self._size - self._sent

    @property
    def pending_records(self) -> int:
        return self._records

    @property
    def size_bytes(self) -> int:
        """The log's size, which `max_bytes` bounds (it shrinks once everything is sent)."""
        return self._size

    def append(self, key: bytes, value: bytes) -> int:
        """Returns the offset after this record (what `commit` takes once it is sent)."""
        return self.append_all([(key, value)])[-1]

    def append_all(self, records: list[tuple[bytes, bytes]]) -> list[int]:
        """Append these records with one `write`, all or none; returns the offset after each
        (a consumer may send them in more than one go)."""
        payloads = [_KEY_LENGTH.pack(len(key)) + key + value for key, value in records]
        data = b"".join(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload for payload in payloads)
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

    def read(self, max_records: int) -> tuple[list[tuple[bytes, bytes]], int]:
        """Up to `max_records` unsent records, oldest first, and the offset to `commit` once they
        are sent."""
        records: list[tuple[bytes, bytes]] = []
        offset = self._sent
        while len(records) < max_records and offset < self._size:
            length, _crc = _HEADER.unpack(os.pread(self._read_fd, _HEADER.size, offset))
            payload = os.pread(self._read_fd, length, offset + _HEADER.size)
            (key_length,) = _KEY_LENGTH.unpack_from(payload)
            records.append((payload[2:2 + key_length], payload[2 + key_length:]))
            offset += _HEADER.size + length
        return records, self._base + offset

    def commit(self, offset: int, records: int | None = None) -> None:
        """Everything before `offset` is sent (`records` records, if the caller knows). When that
        is everything, the log starts over; when the sent part is large, it is compacted."""
        offset -= self._base
        self._records -= self._count(self._sent, offset) if records is None else records
        self._sent = offset
        if self._sent >= self._size:
            # The cursor goes to 0 first, as in `_compact`: a kill between the two replays the
            # sent log whole, where a stale cursor over a truncated log would skip later records.
            self._write_pos(0)
            os.ftruncate(self._fd, 0)
            self._base += self._size
            self._size = self._sent = self._records = 0
        elif self._sent >= self.compact_bytes and self._size - self._sent <= self._sent:
            self._compact()
        else:
            self._write_pos(self._sent)

    def _compact(self) -> None:
        """Replace the log by its unsent rest. The cursor goes to 0 first: a crash in between
        replays the old log whole, and a replayed record is stored once downstream anyway."""
        rest = os.pread(self._read_fd, self._size - self._sent, self._sent)
        tmp = self.directory / "spool.log.new"
        with open(tmp, "wb") as out:
            out.write(rest)
            out.flush()
            os.fsync(out.fileno())
        self._write_pos(0)
        with self._swap:
            os.replace(tmp, self._log)
            os.close(self._fd)
            os.close(self._read_fd)
            self._open_log()
        self._base += self._sent
        self._size -= self._sent
        self._sent = 0
        self._dirty = False

    def _write_pos(self, sent: int) -> None:
        tmp = self._pos.with_suffix(".tmp")
        tmp.write_text(str(sent))
        os.replace(tmp, self._pos)

    def sync(self) -> None:
        with self._swap:
            if self._dirty and self._fd >= 0:
                os.fsync(self._fd)
                self._dirty = False

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
            if (zlib.crc32(payload) != crc or length < _KEY_LENGTH.size
                    or _KEY_LENGTH.unpack_from(payload)[0] > length - _KEY_LENGTH.size):
                break
            offset = end
            at_boundary = at_boundary or offset == cursor
        return offset, at_boundary
