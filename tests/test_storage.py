"""The ClickHouse connection's own behaviour (streams/storage.py): list parameters are written out
ahead, exactly as clickhouse-connect would write them, and ClickHouse reads them back unchanged."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone

from clickhouse_connect.driver.binding import format_bind_value
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import storage
from streams.storage import written

_UTC_TIMES = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2105, 12, 31),
                          timezones=st.just(timezone.utc))
_ELEMENTS = st.one_of(st.text(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.dates(), _UTC_TIMES,
                      # Written by clickhouse-connect itself: the list is handed over as it is.
                      st.booleans(), st.floats(allow_nan=False), st.none(), st.uuids(),
                      st.datetimes(timezones=st.sampled_from([None, timezone.max])))


# Tuples (of any length, nested, holding any element), as the day rebuild's (site, kind, value)s.
_TUPLES = st.lists(st.one_of(st.tuples(st.text(), st.text(), st.text()),
                             st.lists(_ELEMENTS, max_size=4).map(tuple),
                             st.tuples(st.tuples(st.text(), st.integers(min_value=0, max_value=9)), st.dates())))


@given(st.one_of(st.lists(st.text()), st.lists(st.integers(min_value=0, max_value=2**64 - 1)),
                 st.lists(st.dates()), st.lists(_UTC_TIMES), st.lists(_ELEMENTS), _TUPLES))
@settings(max_examples=400)
def test_a_list_is_written_as_clickhouse_connect_writes_it(values):
    # What clickhouse-connect sends for the value handed over, against what it sends for the list.
    assert format_bind_value(written(values), timezone.utc) == format_bind_value(values, timezone.utc)


def test_values_other_than_lists_are_left_to_clickhouse_connect():
    for value in ("a'b", 5, date(2026, 1, 1), ("a", "b"), {"k": "v"}, None):
        assert written(value) is value
    mixed = ["a", 1.5]
    assert written(mixed) is mixed


def test_clickhouse_reads_the_written_lists_back_unchanged(services):
    client = services.client
    texts = ["", "a'b", "back\\slash", "tab\there", "new\nline", "`tick`", "\\'", "åäö 🎉", "\x00\x01\x1f", "'; DROP"]
    ids = [0, 1, 2**63, 2**64 - 1]
    days = [date(1970, 1, 1), date(2026, 12, 1), date(2149, 6, 6)]
    times = [datetime(2026, 12, 1, 23, 59, 59, tzinfo=timezone.utc), datetime(1970, 1, 1, tzinfo=timezone.utc)]
    event_ids = [str(uuid.uuid4()) for _ in range(3)]
    row = client.query(
        "SELECT {texts:Array(String)}, {ids:Array(UInt64)}, {days:Array(Date)}, {times:Array(DateTime('UTC'))},"
        " arrayMap(x -> toString(x), {event_ids:Array(UUID)}), {empty:Array(String)}",
        parameters={"texts": texts, "ids": ids, "days": days, "times": times, "event_ids": event_ids, "empty": []},
    ).result_rows[0]
    assert list(row[0]) == texts and list(row[1]) == ids and list(row[2]) == days
    assert [t.replace(tzinfo=timezone.utc) for t in row[3]] == times
    assert list(row[4]) == event_ids and list(row[5]) == []
    keys = [(text, "page", "/å") for text in texts]
    assert client.query("SELECT {keys:Array(Tuple(String, String, String))}",
                        parameters={"keys": keys}).result_rows[0][0] == keys
    # The same through raw_query and command, the client's two other methods that bind.
    assert client.raw_query("SELECT length({texts:Array(String)})", parameters={"texts": texts}).strip() == b"10"
    assert client.command("SELECT has({texts:Array(String)}, 'a''b')", parameters={"texts": texts}) == 1


def test_after_a_lookup_found_no_server_the_next_fail_at_once_until_it_is_asked_again(monkeypatch):
    """`for_lookups`' client: one timed-out or refused call, then OperationalError without a call
    for LOOKUP_TIMEOUT_S (each request would otherwise wait out its own timeout); then it asks."""
    import time

    import pytest
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    from streams import storage

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    calls, answers = [], [OperationalError("Read timed out"), DatabaseError("bad SQL"), [1]]

    class Server:
        def query(self, sql):
            calls.append(sql)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        raw_query = command = insert = query

    client = storage._fails_fast(Server(), storage._Unanswered(storage.LOOKUP_TIMEOUT_S))
    with pytest.raises(OperationalError, match="Read timed out"):
        client.query("a")
    clock[0] += storage.LOOKUP_TIMEOUT_S - 0.1
    with pytest.raises(OperationalError, match=r"did not answer 4\.9 s ago \(Read timed out\); not asked again for 0\.1 s"):
        client.command("b")
    assert calls == ["a"]
    clock[0] += 0.1
    with pytest.raises(DatabaseError, match="bad SQL"):  # an answer, if a refusal: the server is there
        client.query("c")
    assert client.query("d") == [1] and calls == ["a", "c", "d"]


def test_the_query_client_fails_at_once_while_either_client_finds_no_server_but_its_own_timeouts_do_not(monkeypatch):
    """`for_queries`' client shares the lookups' state: a question of its own that times out (a
    slow question) leaves the next to ask; a lookup that finds no server, or a question that finds
    none to take its connection (audit 115: each of the query API's 40 threads went on connecting,
    20 s a question), stops both for a while."""
    import time

    import pytest
    from clickhouse_connect.driver.exceptions import OperationalError
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    from streams import storage

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    calls = []

    def no_connection(cause: Exception) -> OperationalError:
        exc = OperationalError("HTTPConnectionPool(host='ch', port=8123): Max retries exceeded")
        exc.__cause__ = cause
        return exc

    class Server:
        def __init__(self, answers: list) -> None:
            self.answers = answers

        def query(self, sql):
            calls.append(sql)
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        raw_query = command = insert = query

    lookups = storage._fails_fast(Server([OperationalError("Read timed out")]),
                                 storage._Unanswered(storage.LOOKUP_TIMEOUT_S))
    queries = storage._fails_fast(Server([OperationalError("Read timed out"), [1], [2],
                                          no_connection(ConnectTimeoutError(None, "timed out")), [3],
                                          no_connection(NewConnectionError(None, "Connection refused"))]),
                                  lookups.unanswered, records=storage.no_connection)
    with pytest.raises(OperationalError, match="Read timed out"):
        queries.query("slow question")
    assert queries.query("next question") == [1]
    with pytest.raises(OperationalError, match="Read timed out"):
        lookups.query("key")
    clock[0] += storage.LOOKUP_TIMEOUT_S - 0.1
    with pytest.raises(OperationalError, match="did not answer"):
        queries.query("not sent")
    clock[0] += 0.1
    assert queries.query("sent again") == [2]
    for cause in ("connect timeout", "refused"):
        with pytest.raises(OperationalError, match="Max retries"):
            queries.query(cause)
        with pytest.raises(OperationalError, match="did not answer"):
            lookups.query("key, not sent")
        clock[0] += storage.LOOKUP_TIMEOUT_S
        if cause == "connect timeout":
            assert queries.query("answered") == [3]
    assert calls == ["slow question", "next question", "key", "sent again", "connect timeout", "answered", "refused"]


def test_queries_at_once_from_a_process_s_threads_keep_their_connections(clickhouse_http, caplog):
    """The query API answers on up to 40 threads; clickhouse-connect keeps 8 connections, and each
    one past them was closed after its query with a urllib3 WARNING (~300 a process in an audit)."""
    from concurrent.futures import ThreadPoolExecutor

    client = storage.connect(clickhouse_http)
    with caplog.at_level("WARNING", logger="urllib3"), ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda n: client.query(f"SELECT {n}, sleep(0.2)").result_rows[0][0], range(30)))
    assert answers == list(range(30))
    assert "Connection pool is full" not in caplog.text
