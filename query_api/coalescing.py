"""Identical questions asked at once share their computations.

Pages that share a widget ask the same question together: a Next.js build or a wave of ISR
revalidations sends the same `popular/products` for every page, a dashboard's viewers the same
overview. Each used to run its own ClickHouse queries: 90 identical 30-day overviews sent at once
(`up --demo`) waited up to 757 ms, p50 430 ms, the queries queued on 2 cores.

Every answer is still computed after its request arrived, so a request sees every write that
was done before it was sent (an import's events, a site's new time zone), whichever process did
it. A question asked while the same question is being computed does not take that answer, which
may have read before the write: it waits for the next computation, which starts when the one
under way ends, and which every identical question asked meanwhile shares. A herd thus costs two
computations, and each waits at most for the rest of one and the whole of the next.

A computation's error reaches each question that shared it as an error of its own: the same
class, message and cause, with that request's traceback alone (raised again as one object, it
gathered every waiter's frames: a herd of 40 logged 4.5 MB and held the event loop 0.37 s). An
error of the computation under way also answers the questions waiting for the next: it happened
after they were asked, and on a hung ClickHouse asking again would double their wait.
A question that waits holds its request thread, as it would computing."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TypeVar

from besokskollen import metrics

T = TypeVar("T")


@dataclass
class _Question:
    running: Future | None  # the computation under way
    next: Future | None = None  # the one to start when it ends; questions asked meanwhile share it


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._questions: dict[Hashable, _Question] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, or the result of a computation under `key` that started after this call
        (or the error of one that ended after it). Called from request threads (the API's
        handlers are synchronous)."""
        mine: Future | None = Future()
        with self._lock:
            question = self._questions.get(key)
            if question is None:  # none under way: start now
                self._questions[key] = question = _Question(running=mine)
                before = None
            elif question.next is None:  # start when the one under way ends
                question.next, before = mine, question.running
            else:  # share the next one
                shared = question.next
                mine = None
        if mine is None:
            metrics.ANSWERS_SHARED.inc()
            if (failure := shared.exception()) is None:
                return shared.result()
            raise _copy_of(failure)
        if before is not None:
            wait([before])
            # The one under way failed while these questions waited: so do they, without asking
            # again (on a hung ClickHouse, each would wait out a second timeout after the first).
            # Its end took them off the question (`_done`): those asked since start afresh.
            if (failure := before.exception()) is not None:
                mine.set_exception(failure)
                raise _copy_of(failure)
            with self._lock:
                question.running, question.next = mine, None
        try:
            result = compute()
        except BaseException as exc:
            self._done(key, question, failed=True)
            mine.set_exception(exc)
            raise
        self._done(key, question)
        mine.set_result(result)
        return result

    def _done(self, key: Hashable, question: _Question, failed: bool = False) -> None:
        """Before the waiters are answered: the next computation may start at once. After a
        failure the questions waiting for the next get that failure (`run`), and any question
        asked from now on starts a computation of its own: none gets an error older than itself
        (a failure counts from here; one asked between the raise and this lock may get it)."""
        with self._lock:
            question.running = None
            if failed:
                question.next = None
            if question.next is None and self._questions.get(key) is question:
                del self._questions[key]


def _copy_of(exc: BaseException) -> BaseException:
    """Another exception like `exc`, without its traceback (the raise gives it the raiser's):
    a shallow copy, or, for a class whose `__init__` wants other arguments than `args` holds
    (APIError), one made with `__new__` and given its arguments, attributes and cause. `exc`
    itself if neither can be made."""
    try:
        twin = copy.copy(exc)
    except Exception:  # noqa: BLE001 - made without __init__ below
        try:
            twin = type(exc).__new__(type(exc), *exc.args)
            twin.args = exc.args
            if hasattr(exc, "__dict__"):
                twin.__dict__.update(exc.__dict__)
        except Exception:  # noqa: BLE001 - raised as it is, tracebacks and all
            return exc
    twin.__traceback__ = None
    twin.__cause__, twin.__context__ = exc.__cause__, exc.__context__
    twin.__suppress_context__ = exc.__suppress_context__
    return twin
