"""The embedded runner: drives the stream core inside the `up` process, fed by ingest directly.

Events queue in memory and are processed in batches. The queue is bounded, so a slow database
pushes back on ingest instead of growing.

Each event is first appended to a journal on disk (the spool's file format, `ingest/spool.py`),
so an event answered 202 survives a `kill -9` of the process: the journal is cut back as batches
are written, and whatever it still holds at start is written first. The stream core is idempotent,
so an event that was written but not yet cut from the journal costs a second, harmless pass.

Each event is queued and journaled with the incarnation of its site (`Site.incarnation`); events of
a site deleted, or deleted and created again, since they were taken are dropped, as a worker drops
them (`SiteRegistry.of_current_sites`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from besokskollen import metrics
from ingest.event import Event
from ingest.spool import Record, Spool
from streams.core import StreamCore, process_until_written
from streams.sites import SiteRegistry, count_dropped

log = logging.getLogger(__name__)

_SYNC_PERIOD_S = 1.0
# A stop waits this long for what was answered 202 to be written. Past it (ClickHouse does not take
# writes), the rest stays journaled and is written at the next start: a stop must end, within the
# grace period a supervisor gives it before a kill (Kubernetes: 30 s).
STOP_DRAIN_S = 20.0

_Entry = tuple[Event, int, int | None, int | None]  # see `EmbeddedRunner._queue`


class EmbeddedRunner:
    def __init__(self, core: StreamCore, journal: Spool, max_batch: int = 5000, linger_s: float = 0.05,
                 max_queued: int = 100_000, stop_drain_s: float = STOP_DRAIN_S, sites: SiteRegistry | None = None
                 ) -> None:
        """`sites`: to drop the events of sites deleted (or deleted and created again) since they
        were queued, as a worker does; None judges none (a runner tested alone)."""
        self._core = core
        self._sites = sites
        self._stop_drain_s = stop_drain_s
        self._journal = journal
        self._max_batch = max_batch
        self._linger_s = linger_s
        # (event, the journal's offset after its record, its site's incarnation, when it was taken
        # in ms), in journal order: a batch's last entry is how far the journal is written. Bounded
        # by `_room`, taken before the journal, because waiting for a full queue after it could
        # reorder the two.
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._room = asyncio.Semaphore(max_queued)
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # while running
        self._recovered = False
        # (events, incarnation, when taken) to journal and queue at the end of this turn
        self._waiting: list[tuple[Sequence[Event], int | None, int]] = []
        self._appended: asyncio.Future[None] | None = None
        # Counted rather than "queue empty": under steady traffic the queue may never be empty,
        # and a drain must still end once what came before it is written.
        self._submitted = 0
        self._written = 0

    async def submit(self, event: Event, incarnation: int | None = None) -> None:
        """Returns once the event is journaled and queued; raises `SpoolRefused` (the caller answers
        503) when the journal is at its limit. `incarnation`: of the site it was taken for."""
        await self.submit_all([event], incarnation)

    async def submit_all(self, events: Sequence[Event], incarnation: int | None = None,
                         accepted_ms: int | None = None) -> None:
        """`submit` for many events of one site (an import's part), in order, with one wait: a
        task per event cost an import ~8 % of its time in the event loop. `accepted_ms`: when they
        were taken (an import's request), if not now."""
        taken = 0
        try:
            for _ in events:
                await self._room.acquire()
                taken += 1
        except BaseException:
            for _ in range(taken):
                self._room.release()
            raise
        if self._appended is None:
            # The events submitted in one turn of the event loop are journaled with one `write`.
            self._appended = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._append_waiting)
        if accepted_ms is None:
            accepted_ms = time.time_ns() // 1_000_000
        self._waiting.append((events, incarnation, accepted_ms))
        # Shielded: the turn's future is every submitter's, and one request cancelled while it
        # waits (a server stopping) cancelled it for all of them, whose events were journaled.
        await asyncio.shield(self._appended)

    def _append_waiting(self) -> None:
        """Journal the turn's events and queue them, whether or not their submitters still wait:
        an event journaled is written (a submitter cancelled meanwhile got no answer; its event
        counts once, not twice). When the journal refuses them, their room is given back."""
        groups, appended = self._waiting, self._appended
        self._waiting, self._appended = [], None
        try:
            # Each record's own end: a batch may end inside the turn's records, and the rest must
            # stay journaled until they are written.
            ends = iter(self._journal.append_all([Record(event.kafka_key, event.to_bytes(), accepted_ms, incarnation)
                                                  for events, incarnation, accepted_ms in groups for event in events]))
        except Exception as exc:  # SpoolRefused (or another error): every event of the turn is refused
            for events, _, _ in groups:
                for _ in events:
                    self._room.release()
            appended.set_exception(exc)
            appended.exception()  # seen: with every submitter cancelled, asyncio would log it as never retrieved
            return
        for events, incarnation, accepted_ms in groups:
            for event in events:
                self._queue.put_nowait((event, next(ends), incarnation, accepted_ms))
            self._submitted += len(events)
        appended.set_result(None)

    async def start(self) -> None:
        """Open the journal and start writing: first what a process that died left in it, then
        what comes. New events are taken meanwhile (journaled behind the old ones), so a long
        replay holds up no request and no health probe; `recovered` says when it is done."""
        self._journal.open()
        metrics.watch_spool(self._journal)
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._run(self._journal.pending_records), name="stream-core"),
                       asyncio.create_task(self._sync(), name="journal-sync")]

    @property
    def recovered(self) -> bool:
        """Whether what the journal held at start is written (`up`'s /readyz waits for it)."""
        return self._recovered

    async def drain(self) -> None:
        """Wait until everything submitted so far is written (and what the journal held at start)."""
        target = self._submitted
        while not self._recovered or self._written < target:
            await asyncio.sleep(0.01)

    def wait_written(self, timeout_s: float) -> None:
        """`drain` for a caller on another thread (a sync route of the query API), for at most
        `timeout_s`; at once when the runner is not running, or on its own event loop (where
        waiting would hold up the writes it waits for)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            return
        written = asyncio.run_coroutine_threadsafe(self.drain(), loop)
        try:
            written.result(timeout_s)
        except Exception:  # timed out, or the runner stopped meanwhile: the caller goes on without
            written.cancel()

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), self._stop_drain_s)
        except TimeoutError:
            log.warning("stopping with %d events not written yet: they stay in the journal in %s and are written"
                        " at the next start", self._submitted - self._written, self._journal.directory)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loop = None
        self._journal.close()

    async def _recover(self, journaled: int) -> None:
        """Write the first `journaled` records of the journal: what a process that died left."""
        if journaled:
            log.info("writing %d events journaled before the last stop", journaled)
        while journaled:
            records, end = self._journal.read(min(self._max_batch, journaled))
            events = Event.decode_each([record.value for record in records])
            await self._write([(event, end, record.incarnation, record.accepted_ms)
                               for record, event in zip(records, events) if event is not None])
            await self._cut(end, len(records))
            journaled -= len(records)
        self._recovered = True

    async def _run(self, journaled: int) -> None:
        await self._recover(journaled)
        while True:
            batch = [await self._queue.get()]
            # One timeout for the batch, and what is queued already taken without waiting:
            # `wait_for` per event took 84 ms of the event loop that answers /api/event per
            # 5,000 events queued (get_nowait: 1 ms; measured alone, on a busy machine).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._linger_s):
                    while len(batch) < self._max_batch:
                        batch.append(self._queue.get_nowait() if not self._queue.empty() else await self._queue.get())
            await self._write(batch)
            await self._cut(batch[-1][1], len(batch))
            self._written += len(batch)
            for _ in batch:
                self._room.release()

    async def _write(self, entries: list[_Entry]) -> None:
        """Write the events of these entries whose site is the one with the id now (judged again in
        front of the writes, as a worker's batch is: a site deleted and created again while the
        batch was processed)."""
        kept: list = []

        def current() -> list:
            if self._sites is None:
                return entries
            return self._sites.of_current_sites(entries, lambda entry: (entry[0].site_id, entry[2], entry[3]))

        def batch() -> list[Event]:
            kept[:] = current()
            return [entry[0] for entry in kept]

        started = time.perf_counter()
        await process_until_written(self._core, batch, lambda: len(current()) == len(kept))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.EVENTS_PROCESSED.inc(len(kept))
        count_dropped(len(entries) - len(kept))

    async def _cut(self, end: int, records: int) -> None:
        """Cut written records from the journal, off the event loop that answers /api/event.
        When its cursor cannot be saved (a full disk), they stay journaled, to be written again
        (harmlessly) after a restart; raising would end the task that writes while `up` goes on
        answering 202."""
        try:
            await self._journal.commit_off_loop(end, records)
        except OSError as exc:
            log.error("could not cut written events from the journal in %s: %s", self._journal.directory, exc)

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(_SYNC_PERIOD_S)
            try:
                await asyncio.to_thread(self._journal.sync)
            except OSError as exc:  # the next second tries again; the events are in the page cache
                log.error("could not fsync the journal in %s: %s", self._journal.directory, exc)
