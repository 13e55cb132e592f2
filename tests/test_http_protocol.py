"""The servers' HTTP protocol (besokskollen/http_protocol.py): a request's head has a deadline, a
request whose head arrived does not, and kept-alive connections work as before. Served by uvicorn
with the protocol, as `_serve` serves the apps, with a short deadline."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from besokskollen import http_protocol
from besokskollen.http_protocol import HeadDeadlineProtocol
from tests.conftest import free_port, wait_until

DEADLINE_S = 1.0


async def _echo(scope, receive, send) -> None:
    """Answers with the body it read; `/slow` after three deadlines."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(DEADLINE_S * 3)
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server(monkeypatch) -> Iterator[int]:
    """uvicorn's keep-alive timeout out of the way."""
    yield from _serve(monkeypatch, keep_alive_s=30)


@pytest.fixture
def server_as_run(monkeypatch) -> Iterator[int]:
    """uvicorn's keep-alive timeout half the deadline, as the servers run (5 s and 10 s)."""
    yield from _serve(monkeypatch, keep_alive_s=DEADLINE_S / 2)


def _serve(monkeypatch, keep_alive_s: float) -> Iterator[int]:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", DEADLINE_S)
    port = free_port()
    config = uvicorn.Config(_echo, host="127.0.0.1", port=port, http=HeadDeadlineProtocol, lifespan="off",
                            log_level="warning", timeout_keep_alive=keep_alive_s)
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    wait_until(lambda: running.started, 10, "the server")
    yield port
    running.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(connection: socket.socket) -> bytes:
    """Everything until the server closes the connection (a timeout fails the test)."""
    received = b""
    while chunk := connection.recv(4096):
        received += chunk
    return received


def _read_until(connection: socket.socket, end: bytes) -> bytes:
    """What arrives until it ends with `end` (the server closing first fails the test)."""
    received = b""
    while not received.endswith(end):
        chunk = connection.recv(4096)
        assert chunk, f"closed after {received!r}"
        received += chunk
    return received


def _exchange(connection: socket.socket, body: bytes) -> bytes:
    connection.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return _read_until(connection, b"\r\n\r\n" + body)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    with _connect(server) as connection:
        assert _read_all(connection) == b""


def test_a_head_that_stalls_gets_408_and_is_closed(server):
    with _connect(server) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in answer


def test_a_head_that_trickles_in_past_the_deadline_is_cut(server):
    """Each byte in time for a read, the whole head too late: the deadline is for the head."""
    with _connect(server) as connection:
        cut = False
        for byte in b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 40:
            try:
                connection.sendall(bytes([byte]))
            except OSError:  # closed under us
                cut = True
                break
            time.sleep(DEADLINE_S / 10)
        answer = b"" if cut else _read_all(connection)
    assert cut or answer.startswith(b"HTTP/1.1 408 ")


def test_a_slow_body_and_kept_alive_requests_are_not_cut(server):
    """Once a head is in, the application owns the request (its body deadlines are its own); a
    kept-alive connection gets a fresh deadline for each next head."""
    with _connect(server) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab")
        time.sleep(DEADLINE_S * 3)
        connection.sendall(b"cde")
        assert _read_until(connection, b"abcde").startswith(b"HTTP/1.1 200 ")
        for n in range(3):
            time.sleep(DEADLINE_S * 0.6)  # together past one deadline, each within its own
            assert _exchange(connection, b"%d" % n).startswith(b"HTTP/1.1 200 ")
        # Idle again past the deadline: closed, without an answer.
        assert _read_all(connection) == b""


def test_pipelined_requests_are_all_answered(server):
    with _connect(server) as connection:
        connection.sendall(b"".join(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n%d" % n for n in range(3)))
        assert _read_until(connection, b"\r\n\r\n2").count(b"HTTP/1.1 200 ") == 3
        time.sleep(DEADLINE_S * 2)
        assert _read_all(connection) == b""


def test_a_pipelined_head_waiting_behind_a_slow_answer_gets_its_time_after_that_answer(server):
    """Cut while the earlier request was still answered, its 408 took that answer's place."""
    with _connect(server) as connection:
        connection.sendall(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nsPOST / HTT")
        answer = _read_all(connection)  # the slow answer, then the 408 a deadline after it
    first, _, rest = answer.partition(b"\r\n\r\ns")
    assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 408 "), answer


def test_a_slow_pipelined_request_is_answered_whole(server):
    """Started as the answer before it completed, it was not given a head deadline's cut."""
    with _connect(server) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nf"
                           b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\ns")
        assert _read_until(connection, b"\r\n\r\ns").count(b"HTTP/1.1 200 ") == 2


def test_a_head_begun_before_the_last_answer_gets_the_deadline_not_the_keep_alive_timeout(server_as_run):
    """Its bytes came before the answer, so none came after it to stop uvicorn's keep-alive
    timer: the connection was closed silently at the keep-alive timeout, a head in time unanswered."""
    with _connect(server_as_run) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\naPOST / HTTP/1.1\r\nhost: x\r\n")
        time.sleep(DEADLINE_S * 0.75)  # past the keep-alive timeout, within the deadline
        connection.sendall(b"content-length: 1\r\n\r\nb")
        assert _read_until(connection, b"\r\n\r\nb").count(b"HTTP/1.1 200 ") == 2
        # A begun head that stalls gets its 408 at the deadline, not a silent close.
        connection.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\ncPOST / HTT")
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer, answer
