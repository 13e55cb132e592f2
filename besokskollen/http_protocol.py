"""The servers' HTTP protocol: uvicorn's (httptools), with a deadline for a request's head.

uvicorn times out only the pause between two requests on a kept-alive connection. A connection
that sent nothing yet, or whose request line and headers trickle in, was held open for as long as
the client liked, and every one holds a file descriptor — which `up`'s embedded ClickHouse shares:
an audit's 19,900 idle connections ran the process out of open files. Here a request's head must
be complete `HEAD_TIMEOUT_S` after the connection opened or the last answer was sent (nginx's
`client_header_timeout`, as deploy/nginx.conf sets it). A connection that sent nothing is closed
silently (a browser's preconnect opens one and may never use it); one cut mid-head gets a 408.
The body has its own deadline, in the application (`/api/event` 10 s, the import 300 s).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT_S = 10.0

_BODY = b"Request head not received in time."
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


class HeadDeadlineProtocol(HttpToolsProtocol):
    _head_deadline: asyncio.TimerHandle | None = None
    _head_begun = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        # A head that begins while an earlier request is answered (pipelined) gets its time
        # from that answer on (on_response_complete): cutting it sooner would lose the answer.
        if self._head_deadline is None and not self._answering():
            self._await_head()

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        self._head_begun = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._answering():
            return
        if self._head_begun:
            # Not idle: the next head began before this answer went out. uvicorn's keep-alive
            # timer (5 s), stopped only by bytes that come after it, closed it silently.
            self._unset_keepalive_if_required()
        # An idle connection is closed sooner by that timer; the deadline bounds a next request
        # that begins and then stalls.
        if self._head_deadline is None:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _answering(self) -> bool:
        """A request is being answered (a pipelined one, started as the last answer completed)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _await_head(self) -> None:
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            self.transport.write(_TIMED_OUT)
        self.transport.close()
