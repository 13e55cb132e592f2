"""The embedded runner: drives the stream core inside the `up` process, fed by ingest directly.

Events queue in memory and are processed in batches. The queue is bounded, so a slow database
pushes back on ingest instead of growing."""

from __future__ import annotations

import asyncio

from ingest.event import Event
from streams.core import StreamCore, process_until_written


class EmbeddedRunner:
    def __init__(self, core: StreamCore, max_batch: int = 5000, linger_s: float = 0.05,
                 max_queued: int = 100_000) -> None:
        self._core = core
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._queue: asyncio.Queue[Event] = asyncio.Queue(max_queued)
        self._task: asyncio.Task | None = None
        # Counted rather than "queue empty": under steady traffic the queue may never be empty,
        # and a drain must still end once what came before it is written.
        self._submitted = 0
        self._written = 0

    async def submit(self, event: Event) -> None:
        self._submitted += 1
        await self._queue.put(event)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-core")

    async def drain(self) -> None:
        """Wait until everything submitted so far is written."""
        target = self._submitted
        while self._written < target:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await self.drain()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._linger_s
            while len(batch) < self._max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            await process_until_written(self._core, batch)
            self._written += len(batch)
