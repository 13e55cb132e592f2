"""`besokskollen copy --to URL`: every table of one ClickHouse into another — how `up`'s embedded
data folder moves to the distributed topology's ClickHouse server (or cluster) with nothing lost
and nothing recomputed. The target gets the schema first (its own mode: cluster or not), then the
rows table by table in blocks, with a progress bar. A target that already holds events (raw, or
only as daily totals once they expired) is refused: a second copy would double the tables that
are not keyed (salts), and the numbers of a deployment whose raw events expired.

While rows go, the target holds a marker table (`copy_unfinished`), dropped once every table is
there: a copy that was killed or failed midway is known as such, and the next run empties what
it left and starts over instead of refusing a target that "already holds events" — keeping what
the target's own processes wrote meanwhile (`_KEPT_KEYED`, `_KEPT_PLAIN`). A target with sites
of its own is refused too: two sites of one domain would stand side by side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streams import migrations, replay

MARKER = "copy_unfinished"

# Written by the stream core from the others, or per process: not copied.
_SKIP = {"schema_migrations", "worker_status", MARKER}
# What the target's own processes write before any event reaches them (their BK_ADMIN_KEY, the
# day's salt, a site made there): a copy started again keeps it. Of keyed tables the source's
# rows go again as they are (reads keep one of each key); the others get those not there yet.
_KEPT_KEYED = {"api_keys", "sites", "goals", "funnels"}
_KEPT_PLAIN = {"salts", "site_claims", "goal_backfills"}


class CopyRefused(Exception):
    pass


class CopyStopped(Exception):
    """The copy failed (its cause: the target or the source stopped answering, or refused a
    statement) after rows started to go: the target holds the marker, a new run starts over."""


def unfinished(client: Client) -> bool:
    """Whether a copy into this ClickHouse started and did not finish."""
    return bool(client.query("SELECT count() FROM system.tables WHERE database = currentDatabase()"
                             " AND name = {t:String}", parameters={"t": MARKER}).result_rows[0][0])


def copy(source: Client, target: Client, session_timeout_s: int, raw_events_ttl_days: int,
         cluster: str | None = None, say=lambda line: None) -> dict[str, int]:
    if unfinished(source):
        raise CopyRefused("the source itself holds a copy that did not finish; finish that copy first")
    # The source as this release reads it, as `up` would make it at its next start: a folder last
    # run by an older release gets its migrations, and the derived tables a migration asks to be
    # rebuilt are replayed here — the target, migrated while empty, would never replay them.
    on_source = migrations.cluster_of(source)
    replay.upgrade(source, session_timeout_s, raw_events_ttl_days, on_source.name if on_source else None)
    engines = {name: engine for name, engine in source.query(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase() AND engine LIKE '%MergeTree'"
        " ORDER BY name").result_rows if name not in _SKIP and not name.endswith("_local")}
    tables = list(engines)
    replay.upgrade(target, session_timeout_s, raw_events_ttl_days, cluster)
    on = migrations.Cluster(cluster) if cluster else None
    again = unfinished(target)
    if again:
        say("the last copy into this target did not finish: emptying what it copied and starting over")
        for table in tables:
            if table not in _KEPT_KEYED | _KEPT_PLAIN:
                migrations.truncate(target, table, on)
    # The daily totals too: a deployment whose raw events all expired (BK_RAW_EVENTS_TTL_DAYS) still
    # holds its numbers, which a copy would double.
    elif target.query("SELECT (SELECT count() FROM events) + (SELECT count() FROM rollup_1d)").result_rows[0][0]:
        raise CopyRefused("the target already holds events (another deployment's, or a finished copy's);"
                          " copy into an empty deployment")
    # A site made on the target would stand beside the copied one of its domain, and its settings
    # (a timezone) win over the copied site's.
    elif sites := [row[0] for row in target.query("SELECT domain FROM sites FINAL WHERE deleted = 0 ORDER BY domain")
                   .result_rows]:
        raise CopyRefused(f"the target already has sites ({', '.join(sites[:5])}{', …' if len(sites) > 5 else ''});"
                          " copy into a deployment without any (delete them there first)")
    migrations.run_ddl(target, f"CREATE TABLE IF NOT EXISTS {MARKER} (started DateTime) ENGINE = MergeTree"
                               " ORDER BY tuple()", on)
    # A ReplacingMergeTree goes as its reads see it (FINAL): of rows with one key and no version
    # (a revoked key, a redelivered event) the last inserted wins, and the source's parts are read
    # in no set order — unmerged, a revocation could land before its key.
    final = {t: " FINAL" if "Replacing" in engines[t] else "" for t in tables}
    counts = {t: source.query(f"SELECT count() FROM {t}{final[t]}").result_rows[0][0] for t in tables}
    copied: dict[str, int] = {}
    columns = TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    with Progress(*columns) as progress, _stopped():
        for table in tables:
            task = progress.add_task(table, total=counts[table])
            names = [row[0] for row in source.query(
                "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}"
                " ORDER BY position", parameters={"t": table}).result_rows]
            copied[table] = 0
            # Compared as text: a row may hold a map or an array, which a set cannot.
            there = {repr(tuple(row)) for row in target.query(f"SELECT {', '.join(names)} FROM {table}").result_rows} \
                if again and table in _KEPT_PLAIN else set()
            with source.query_row_block_stream(f"SELECT {', '.join(names)} FROM {table}{final[table]}") as blocks:
                for block in blocks:
                    new = [row for row in block if repr(tuple(row)) not in there] if there else block
                    if new:
                        target.insert(table, new, column_names=names)
                    copied[table] += len(new)
                    progress.advance(task, len(block))
    migrations.run_ddl(target, f"DROP TABLE IF EXISTS {MARKER}", on)
    return copied


@contextmanager
def _stopped() -> Iterator[None]:
    try:
        yield
    except (OperationalError, DatabaseError) as exc:
        raise CopyStopped(str(exc)) from exc
