"""Reading a request's body within a size limit and a deadline (`/api/event`, the import)."""

from __future__ import annotations

import asyncio
import weakref

from starlette.requests import ClientDisconnect, Request


class BodyTooSlow(Exception):
    """The body did not arrive within its deadline."""


class _BodyDeadlines:
    """Deadlines of the requests reading their bodies, kept by one sweep every SWEEP_S per event
    loop instead of a timer per request: `asyncio.timeout` made, pushed and cancelled a timer for
    each event (~3 µs of a ~50 µs request), whose body is nearly always there before the handler
    asks for it. A body is cut at its deadline, up to SWEEP_S later; as `asyncio.timeout` does,
    by cancelling the reading task, which a cancellation from elsewhere still ends."""

    SWEEP_S = 0.25

    def __init__(self) -> None:
        self._due: dict[asyncio.Task, float] = {}
        self._expired: set[asyncio.Task] = set()
        self._sweeping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def start(self, task: asyncio.Task, deadline_s: float) -> None:
        loop = task.get_loop()
        self._due[task] = loop.time() + deadline_s
        if loop not in self._sweeping:
            self._sweeping.add(loop)
            loop.call_later(self.SWEEP_S, self._sweep, loop)

    def stop(self, task: asyncio.Task) -> bool:
        """No deadline for the task any more; whether it expired (and cancelled the task)."""
        self._due.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now, pending = loop.time(), False
        for task, due in list(self._due.items()):
            if task.get_loop() is not loop:
                continue
            if due <= now:
                del self._due[task]
                self._expired.add(task)
                task.cancel()  # delivered where it waits: in read_body, which it has not left
            else:
                pending = True
        if pending:
            loop.call_later(self.SWEEP_S, self._sweep, loop)
        else:
            self._sweeping.discard(loop)


_deadlines = _BodyDeadlines()


async def read_body(request: Request, limit: int, deadline_s: float) -> bytes | None:
    """The body, or None when it is larger than `limit` (read no further than that). Read from the
    ASGI messages themselves: a beacon's body is one message, taken as it is. Raises BodyTooSlow
    when it takes longer than `deadline_s`: a client trickling a byte every few seconds held a
    request (and its socket) open for hours."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    task = asyncio.current_task()
    cancelling = task.cancelling()
    _deadlines.start(task, deadline_s)
    body = b""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            body = body + chunk if body else chunk  # bounded by `limit`
            if len(body) > limit:
                return None
            if not message.get("more_body", False):
                return body
    except asyncio.CancelledError:
        if _deadlines.stop(task) and task.uncancel() <= cancelling:
            raise BodyTooSlow from None
        raise
    finally:
        _deadlines.stop(task)
