"""A ClickHouse HTTP front over chDB, so several test processes can share one real engine.

chDB runs ClickHouse in-process and locks its data path, so an ingest, a worker and an API process
cannot open the same data together. This front owns the path and speaks the part of ClickHouse's
HTTP interface that clickhouse-connect's HTTP client uses:

    python -m tests.chfront --path /abs/data/dir --port 0 --ready-file /tmp/chfront.port

Port 0 picks a free port; the chosen port is printed and written to the ready file as soon as the
socket listens. Clients connect with
``clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=False)``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from chdb import _chdb

# URL parameters consumed by the HTTP layer; every other one, except param_*, is an engine setting.
TRANSPORT_PARAMS = frozenset({
    "query", "database", "default_format", "session_id", "session_timeout", "session_check",
    "query_id", "user", "password", "quota_key", "role", "compress", "decompress", "buffer_size",
    "wait_end_of_query", "client_protocol_version", "enable_http_compression",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
})

# ClickHouse's exceptionCodeToHTTPStatus, for the codes an embedded engine can raise.
BAD_REQUEST = frozenset({
    "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
    "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME",
    "CANNOT_PARSE_NUMBER", "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4",
    "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID",
    "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE",
    "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE",
    "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH", "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
})
NOT_FOUND = frozenset({
    "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
    "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
    "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
    "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE",
})

_INSERT = re.compile(rb"\s*INSERT\b", re.IGNORECASE)
# `INSERT INTO t (cols) [SETTINGS ...] FORMAT f` followed by data; quoted text is skipped whole, and
# VALUES/SELECT/WITH mean the statement carries no separate data block.
_INSERT_DATA = re.compile(rb"""
    \s*(?P<head>INSERT\s+INTO\s+
        (?: '(?:\\.|[^'\\])*' | `(?:\\.|[^`\\])*` | "(?:\\.|[^"\\])*"
          | (?!(?<!\w)(?:VALUES|SELECT|WITH)\b)[^'`";] )*?)
    \s+FORMAT\s+(?P<format>\w+)[^\S\n]*\n?   # data starts after the first newline, as on a server
""", re.IGNORECASE | re.DOTALL | re.VERBOSE)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*(?:SETTINGS\b[^;]*)?;?\s*$", re.IGNORECASE)
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ERROR_CODE = re.compile(r"Code: (\d+)\. ")
_ERROR_NAME = re.compile(r"\(([A-Z0-9_]+)\)\s*$")
_ERROR_VERSION = re.compile(r"\s*\(version [^)]*\)\s*$")  # chDB appends it to some messages


def _fail(code: int, name: str, message: str):
    # Same text shape as chDB's own exceptions, so one parser turns both into responses.
    raise RuntimeError(f"Code: {code}. DB::Exception: {message}. ({name})")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _decompress(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "lz4":
        import lz4.frame  # clickhouse-connect's "lz4" is the LZ4 frame format

        return lz4.frame.decompress(data)
    if encoding == "zstd":
        from backports import zstd

        return zstd.decompress(data)
    _fail(89, "UNKNOWN_COMPRESSION_METHOD", f"Unsupported Content-Encoding {encoding!r}")


class _Session:
    """One chDB handle per HTTP session_id: SET, USE and temporary tables persist as on a server."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.users = 0
        self.expires = 0.0
        self.undo_cache: dict[tuple, list[str]] = {}

    def undo(self, settings: dict[str, str], database: str | None) -> list[str]:
        """Statements that put back the session's own database and values of these settings.

        Reading system.settings costs ~3 ms, so the answer is cached until the session runs a
        statement that may change its state.
        """
        key = (tuple(sorted(settings)), database)
        if key in self.undo_cache:
            return self.undo_cache[key]
        undo = []
        if database:
            current = self.conn.query("SELECT currentDatabase()", "TabSeparated").bytes().decode()
            undo.append(f"USE {_ident(current.strip())}")
        if settings:
            names = ", ".join(_quote(name) for name in settings)
            query = f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})"
            rows = self.conn.query(query, "JSONEachRow").bytes().splitlines()
            values = {name: "DEFAULT" for name in settings}
            for row in map(json.loads, rows):
                if row["changed"]:
                    values[row["name"]] = _quote(row["value"])
            undo.append("SET " + ", ".join(f"{k} = {v}" for k, v in values.items()))
        self.undo_cache[key] = undo
        return undo


class Engine:
    def __init__(self, path: str):
        self.path = path
        # Holding one handle keeps the embedded engine up between requests.
        self._root = _chdb.connect(path)
        about = self._root.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = about.decode().split()
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            for session in self._sessions.values():
                session.conn.close()
            self._sessions.clear()
        self._root.close()

    @contextmanager
    def _connection(self, session_id: str | None, timeout: float):
        """Yield (handle, session or None) for one request."""
        if not session_id:  # handles are cheap (~0.1 ms), so a session-less request gets its own
            conn = _chdb.connect(self.path)
            try:
                yield conn, None
            finally:
                conn.close()
            return
        with self._lock:
            now = time.monotonic()
            for sid, idle in list(self._sessions.items()):
                if idle.users == 0 and idle.expires < now:
                    idle.conn.close()
                    del self._sessions[sid]
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = _Session(_chdb.connect(self.path))
            session.users += 1
        try:
            with session.lock:  # ClickHouse rejects concurrent use of a session; queueing is kinder
                yield session.conn, session
        finally:
            with self._lock:
                session.users -= 1
                session.expires = time.monotonic() + timeout

    def execute(self, sql: bytes, params: dict[str, str]):
        """Run one HTTP query; return (body, output format or None, summary dict)."""
        bind = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items()
                    if not k.startswith("param_") and k not in TRANSPORT_PARAMS}
        for name in settings:
            if not _SETTING_NAME.fullmatch(name):
                _fail(115, "UNKNOWN_SETTING", f"Unknown setting {name!r}")
        default_format = params.get("default_format") or "TabSeparated"
        database = params.get("database")
        timeout = float(params.get("session_timeout") or 60)
        with self._connection(params.get("session_id"), timeout) as (conn, session):
            kind = _statement_kind(conn, sql)
            # URL settings apply to this query only, so a session's own state is put back after.
            undo = session.undo(settings, database) if session else []
            try:
                if database:
                    conn.query(f"USE {_ident(database)}", "TabSeparated")
                if settings:
                    assignments = ", ".join(f"{k} = {_quote(v)}" for k, v in settings.items())
                    conn.query(f"SET {assignments}", "TabSeparated")
                result = _run(conn, sql, default_format, bind)
            finally:
                for statement in undo:
                    conn.query(statement, "TabSeparated")
                if session and kind not in ("READ_ONLY", "INSERT"):
                    session.undo_cache.clear()  # SET, USE and the like move what undo restores to
        out_format = None
        if kind == "READ_ONLY":
            match = _TRAILING_FORMAT.search(sql.decode("utf-8", "replace"))
            out_format = match.group(1) if match else default_format
        body = result.bytes() or b""
        summary = {
            "read_rows": str(result.rows_read()),
            "read_bytes": str(result.bytes_read()),
            "written_rows": str(result.rows_written()),
            "written_bytes": str(result.bytes_written()),
            "total_rows_to_read": str(result.rows_read()),
            "elapsed_ns": str(int(result.elapsed() * 1e9)),
        }
        return body, out_format, summary


def _run(conn, sql: bytes, default_format: str, bind: dict[str, str]):
    insert = _INSERT_DATA.match(sql)
    if insert is None:
        return conn.query(sql, default_format, params=bind)
    # Stream the data block: chDB splits query text at ';' (its multi-statement support) and caps
    # it at max_query_size, both of which corrupt binary data sent inline.
    inserter = conn.send_insert(insert["head"].decode(), insert["format"].decode())
    try:
        conn.insert_append(inserter, sql[insert.end():])
    except Exception:
        conn.insert_cancel(inserter)
        raise
    return conn.insert_done(inserter)


def _statement_kind(conn, sql: bytes) -> str:
    """INSERT, READ_ONLY (has a result set), or another chDB query class (DDL, SET, ...)."""
    if _INSERT.match(sql):  # skip parsing a large inline data block
        return "INSERT"
    text = sql.decode("utf-8", "replace")
    if not text.strip():
        _fail(62, "SYNTAX_ERROR", "Empty query")
    report = conn.classify_query(text)
    if report["statement_count"] > 1:  # chDB would run them all; a server refuses
        _fail(62, "SYNTAX_ERROR", "Multi-statements are not allowed")
    return report["query_class"].name


def _error(ex: Exception) -> tuple[int, str, str]:
    """(HTTP status, ClickHouse error code, `Code: N. DB::Exception: ... (NAME)`) for a failure."""
    text = str(ex)
    match = _ERROR_CODE.search(text)
    if match is None:  # not from the engine: a bug here, or undecodable input
        text = f"Code: 1001. DB::Exception: {type(ex).__name__}: {text}. (STD_EXCEPTION)"
        match = _ERROR_CODE.search(text)
    text = _ERROR_VERSION.sub("", text[match.start():].rstrip())
    named = _ERROR_NAME.search(text)
    name = named.group(1) if named else ""
    status = 400 if name in BAD_REQUEST else 404 if name in NOT_FOUND else 500
    return status, match.group(1), text


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clickhouse-connect pools its connections
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms ACK stalls
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - errors already go back to the client
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        raw_body = self._read_body()  # always drain it, or the next keep-alive request desyncs
        if url.path == "/ping" or (url.path == "/" and not url.query and not raw_body):
            return self._reply(200, b"Ok.\n", {})
        if url.path != "/":
            return self._reply(404, f"There is no handle {url.path}\n".encode(), {})
        engine = self.server.engine
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = {
            "X-ClickHouse-Query-Id": params.get("query_id") or str(uuid.uuid4()),
            "X-ClickHouse-Timezone": engine.timezone,
            "X-ClickHouse-Server-Display-Name": "chfront",
        }
        try:
            body = _decompress(raw_body, self.headers.get("Content-Encoding", ""))
            if self.headers.get_content_type() == "multipart/form-data":
                params.update(self._form_fields(body))
                body = b""
            query = params.get("query", "").encode()
            # As on a server: the query parameter, then the body (the rest of it, or insert data).
            sql = query + b"\n" + body if query and body else query or body
            out, out_format, summary = engine.execute(sql, params)
        except Exception as ex:  # noqa: BLE001 - every failure becomes a ClickHouse error reply
            status, code, text = _error(ex)
            headers["X-ClickHouse-Exception-Code"] = code
            return self._reply(status, f"{text} (version {engine.version})\n".encode(), headers)
        if out_format:
            headers["X-ClickHouse-Format"] = out_format
        headers["X-ClickHouse-Summary"] = json.dumps(summary, separators=(",", ":"))
        self._reply(200, out, headers)

    do_POST = do_GET

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []  # http.server does not decode chunked bodies; urllib3 streams inserts so
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _form_fields(self, body: bytes) -> dict[str, str]:
        """The fields of a multipart body (clickhouse-connect sends long query params so)."""
        header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        fields = {}
        for part in BytesParser(policy=HTTP).parsebytes(header + body).iter_parts():
            if part.get_filename() is not None:
                _fail(48, "NOT_IMPLEMENTED", "External data is not supported by chfront")
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True).decode()
        return fields

    def _reply(self, status: int, body: bytes, headers: dict[str, str]):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, port: int):
        self.engine = engine
        super().__init__(("127.0.0.1", port), _Handler)


def serve(path: str, port: int = 0, ready_file: str | None = None) -> None:
    """Serve the chDB data at ``path`` on 127.0.0.1:``port`` until SIGTERM/SIGINT."""
    engine = Engine(os.path.abspath(path))
    server = _Server(engine, port)
    # Turn SIGTERM into a normal exit so the engine closes cleanly (data is safe either way).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        port = server.server_address[1]
        print(port, flush=True)
        if ready_file:  # write then rename, so a waiting fixture never reads a partial number
            with open(ready_file + ".tmp", "w") as f:
                f.write(str(port))
            os.replace(ready_file + ".tmp", ready_file)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="chDB data directory")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ready-file", help="file to write the listening port to")
    args = parser.parse_args(argv)
    serve(args.path, args.port, args.ready_file)


if __name__ == "__main__":
    main()
