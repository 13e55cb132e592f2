"""`besokskollen copy --to URL`: every table of one ClickHouse into another — how `up`'s embedded
data folder moves to the distributed topology's ClickHouse server (or cluster) with nothing lost
and nothing recomputed. The target gets the schema first (its own mode: cluster or not), then the
rows table by table in blocks, with a progress bar. A target that already holds events is refused:
a second copy would double the tables that are not keyed (salts)."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streams import replay

# Written by the stream core from the others, or per process: not copied.
_SKIP = {"schema_migrations", "worker_status"}


class CopyRefused(Exception):
    pass


def copy(source: Client, target: Client, session_timeout_s: int, raw_events_ttl_days: int,
         cluster: str | None = None) -> dict[str, int]:
    replay.upgrade(target, session_timeout_s, raw_events_ttl_days, cluster)
    if target.query("SELECT count() FROM events").result_rows[0][0]:
        raise CopyRefused("the target already holds events; copy into an empty deployment")
    engines = {name: engine for name, engine in source.query(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase() AND engine LIKE '%MergeTree'"
        " ORDER BY name").result_rows if name not in _SKIP and not name.endswith("_local")}
    tables = list(engines)
    counts = {t: source.query(f"SELECT count() FROM {t}{' FINAL' if 'Replacing' in engines[t] else ''}").result_rows[0][0]
              for t in tables}
    copied: dict[str, int] = {}
    columns = TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    with Progress(*columns) as progress:
        for table in tables:
            task = progress.add_task(table, total=counts[table])
            names = [row[0] for row in source.query(
                "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}"
                " ORDER BY position", parameters={"t": table}).result_rows]
            copied[table] = 0
            # A ReplacingMergeTree goes as its reads see it (FINAL): of rows with one key and no
            # version (a revoked key, a redelivered event) the last inserted wins, and the source's
            # parts are read in no set order — unmerged, a revocation could land before its key.
            final = " FINAL" if "Replacing" in engines[table] else ""
            with source.query_row_block_stream(f"SELECT {', '.join(names)} FROM {table}{final}") as blocks:
                for block in blocks:
                    target.insert(table, block, column_names=names)
                    copied[table] += len(block)
                    progress.advance(task, len(block))
    return copied
