"""Identical questions asked at once are answered by one computation.

Pages that share a widget ask the same question together: a Next.js build or a wave of ISR
revalidations sends the same `popular/products` for every page, a dashboard's viewers the same
overview. Each used to run its own ClickHouse queries: 90 identical 30-day overviews sent at once
(`up --demo`) waited up to 757 ms, p50 430 ms, the queries queued on 2 cores. Now a question
asked while the same question is being computed waits for that computation and gets its answer.

Only a computation still running is shared; none is kept once answered. So an answer is at most
one computation older than its request, and a client that has seen an answer never gets an older
one afterwards: computations of one question run one after another, and the next starts after
the last was answered."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TypeVar

from besokskollen import metrics

T = TypeVar("T")


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, or the result (or exception) of the computation under `key` that is
        running now. Called from request threads (the API's handlers are synchronous)."""
        with self._lock:
            running = self._running.get(key)
            if running is None:
                mine: Future = Future()
                self._running[key] = mine
        if running is not None:
            metrics.ANSWERS_SHARED.inc()
            return running.result()
        try:
            result = compute()
        except BaseException as exc:
            self._done(key)
            mine.set_exception(exc)
            raise
        self._done(key)
        mine.set_result(result)
        return result

    def _done(self, key: Hashable) -> None:
        """Taken off before the waiters are answered: a question asked after the computation
        ended starts another."""
        with self._lock:
            del self._running[key]
