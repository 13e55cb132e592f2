"""`besokskollen` command line (SPEC §4). Flags override the BK_ environment."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from besokskollen.config import MAX_PARTITIONS, Settings, misspelt, server_url_problem, settings_problems
from besokskollen.logs import collapse_client_repeats
from ingest.event import without_control_characters
from ingest.spool import Spool, SpoolLocked


def _settings(args: argparse.Namespace) -> Settings:
    # A flag replaces its variable, which is then not read (nor checked).
    overrides = {}
    if getattr(args, "data", None):
        overrides["clickhouse_url"] = "chdb://" + str(Path(args.data).resolve())
    for flag, setting in (("instance_id", "worker_instance_id"), ("host", "host"), ("port", "port")):
        if getattr(args, flag, None):
            overrides[setting] = getattr(args, flag)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for line in settings_problems(exc):
            print(f"besokskollen {args.command}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    folder = settings.data_folder
    if folder is not None and folder.exists() and not folder.is_dir():
        _usage_error(args, f"the data folder {folder} is a file")
    return settings


def _interrupted(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """A command that cannot run as configured or asked: one line, exit 2 (as a bad setting)."""
    print(f"besokskollen {args.command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _partition_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a partition count (1–{MAX_PARTITIONS:,}, as BK_KAFKA_PARTITIONS)")
    return int(text)


def _port(text: str) -> int:
    """A --port flag, checked as BK_PORT is (the OS would take 70000 as 70000 mod 65536)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1–65535)")
    return int(text)


def _account(text: str) -> str:
    """An --account flag: a name, as the sites and keys of the account carry it."""
    if not text or text != text.strip() or without_control_characters(text) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not an account name (no surrounding spaces or control characters)")
    return text


def _site(text: str) -> str:
    """A --site flag: given empty (`--site "$SITE"` with SITE unset), a key for every site of the
    account would be made where one site's was asked for."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name the site, or leave --site out for a user-level key")
    return text


_BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0"


def _address(args: argparse.Namespace, settings: Settings) -> tuple[str, int]:
    """Flags, else BK_HOST / BK_PORT (both in `settings`), else the command's own default."""
    return settings.host or "127.0.0.1", settings.port or args.default_port


def _listen(command: str, host: str, port: int) -> socket.socket:
    from besokskollen import health

    try:
        return health.listening_socket(host, port)
    except OSError as exc:
        print(f"besokskollen {command}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _stopped(signum, frame) -> NoReturn:
    raise SystemExit(0)


def _stopped_while_starting(signum, frame) -> NoReturn:
    logging.getLogger("besokskollen").info("stopped (%s) while starting", signal.Signals(signum).name)
    raise SystemExit(0)


# What a server keeps for itself below the open-files limit: the embedded engine's files, epoll
# and timer descriptors, and ~3 per thread (an audit saw ~400 at rest in `up`).
_FILES_KEPT_BACK = 1000


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one and return it. Every connection holds a
    descriptor, and the embedded ClickHouse shares the process's: past the limit its queries and
    the stream core's writes failed (`Too many open files`) and new connections got no answer (an
    audit held 19,900 idle connections against 20,000). Containers often start with a soft limit
    of 1,024 under a far higher hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # above the kernel's nr_open: keep what there is
            pass
    return soft


def _serve(app, sock: socket.socket) -> None:
    """Serve on the socket `_listen` made (answered on while the server started)."""
    import uvicorn  # servers only: one-shot commands start ~0.2 s sooner without it

    from besokskollen.http_protocol import HeadDeadlineProtocol

    # uvicorn takes SIGTERM, shuts down gracefully (the lifespan drains the journal) and then
    # raises the signal again under the handler that was in place before it started. With the
    # default one the process died of that signal — exit status 143 after a complete, clean stop,
    # which systemd, Docker and Kubernetes report as a failure. A stop that was carried out exits 0.
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)  # Ctrl+C is a stop as well (it exited 130)
    # What starting made (modules, the app, compiled patterns: ~150,000 objects in `up`) lives as
    # long as the process. Frozen, it is left out of full garbage collections, which walked all
    # of it every ~15 s under load, holding the GIL (0.1-0.15 s each in the embedded soak, the
    # event loop serving requests waiting meanwhile).
    gc.collect()
    gc.freeze()
    # proxy_headers off: X-Forwarded-For is honoured by our own code, and only from
    # BK_TRUSTED_PROXIES (uvicorn would otherwise replace the peer with it, hiding the proxy).
    config = uvicorn.Config(app, http=HeadDeadlineProtocol, log_level="info", access_log=False, proxy_headers=False)
    host, port = sock.getsockname()[:2]
    # uvicorn names no address for a socket it was given
    logging.getLogger("uvicorn.error").info("listening on http://%s:%s (Ctrl+C to stop)",
                                            f"[{host}]" if ":" in host else host, port)
    files = raise_open_files_limit()
    logging.getLogger("uvicorn.error").info(
        "up to %d open files: ~%d connections at once (put a proxy that times out idle and slow clients in"
        " front; deploy/nginx.conf)", files, max(files - _FILES_KEPT_BACK, 0))
    uvicorn.Server(config).run(sockets=[sock])


# In `up` the stream core's thread runs Python for ~0.2 ms an event, and the event loop that
# answers /api/event and the API gave the GIL up at each write and send, then waited up to the
# switch interval (5 ms by default) for it. At 1 ms, /api/event's p99 under wrk (64 connections,
# 15 s) was 28-33 ms against 44-57 ms in 5 alternating pairs, its rate the same within this
# machine's noise (-9 % to +24 %), and the core kept up as before (docs/benchmarks.md).
UP_SWITCH_INTERVAL_S = 0.001


def cmd_up(args: argparse.Namespace) -> None:
    from besokskollen import demo, health
    from besokskollen.app import DEFAULT_ACCOUNT, make_handoff, open_services, server_app

    settings = _settings(args)
    spool = _claim_spool("up", settings)
    host, port = _address(args, settings)
    sock = _listen("up", host, port)
    with health.answering_while_starting(sock):
        services = open_services(settings, wait=True)
        # The demo seeding takes a while too: answered meanwhile, as while waiting.
        core = services.stream_core() if settings.embedded else None
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # an IPv6 address in brackets
        if args.demo:
            if core is None:
                _usage_error(args, "--demo seeds through the embedded stream core; unset BK_KAFKA_BOOTSTRAP")
            site = demo.seed(services, core)
            # BK_ADMIN_KEY unless it was revoked (it then opens nothing: a new key works).
            admin = settings.admin_key if settings.admin_key and services.keys.lookup(settings.admin_key) else None
            key = admin or services.keys.create(DEFAULT_ACCOUNT)
            print(f"\nDemo site {site.site_id!r} is ready. API key (user level): {key}\n")
            for path in (f"popular/products?site_id={site.site_id}&days=7&limit=5",
                         f"trending/products?site_id={site.site_id}",
                         f"stats/overview?site_id={site.site_id}&period=30d",
                         "sites"):
                print(f'curl -H "Authorization: Bearer {key}" "{base}/api/v1/{path}"')
            event = f'{{"site_id": "{site.site_id}", "name": "pageview", "url": "https://{site.domain}/"}}'
            print(f"curl -X POST -H 'Content-Type: application/json' -H 'User-Agent: {_BROWSER}' -d '{event}' {base}/api/event")
            print()
        elif not settings.admin_key and not services.keys.any_exist():
            # While `up` runs, the engine locks the data folder, so `keys create` cannot run beside
            # it: the first start hands out a key instead.
            key = services.keys.create(DEFAULT_ACCOUNT)
            print(f"\nFirst start: created a user-level API key (shown only now): {key}\n")
    if core is not None:
        sys.setswitchinterval(UP_SWITCH_INTERVAL_S)
    _serve(server_app(services, make_handoff(services, core, spool)), sock)


def cmd_ingest(args: argparse.Namespace) -> None:
    from besokskollen import health
    from besokskollen.app import ingest_server_app, make_handoff, open_services

    settings = _settings(args)
    if settings.embedded:
        _usage_error(args, "`ingest` hands events to Kafka: set BK_KAFKA_BOOTSTRAP (or run `besokskollen up`)")
    spool = _claim_spool("ingest", settings)
    sock = _listen("ingest", *_address(args, settings))
    with health.answering_while_starting(sock):
        services = open_services(settings, wait=True)
    _serve(ingest_server_app(services, make_handoff(services, spool=spool)), sock)


def cmd_api(args: argparse.Namespace) -> None:
    from besokskollen import health
    from besokskollen.app import api_server_app, open_services

    settings = _settings(args)
    sock = _listen("api", *_address(args, settings))
    with health.answering_while_starting(sock):
        services = open_services(settings, wait=True)
    _serve(api_server_app(services), sock)


def cmd_worker(args: argparse.Namespace) -> None:
    from streams import worker

    settings = _settings(args)
    if settings.kafka_bootstrap is None:
        _usage_error(args, "the worker reads Kafka: set BK_KAFKA_BOOTSTRAP (without Kafka, `besokskollen up` runs the"
                           " stream core)")
    host, port = _address(args, settings)
    worker.run(settings, _listen("worker", host, port), host, port, args.loglevel)


def cmd_migrate(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from streams import replay, storage

    settings = _settings(args)
    if args.rebuild and not settings.embedded and not args.force:
        _no_workers_writing(args, settings)
    client = storage.connect(settings.clickhouse_url)
    applied = replay.upgrade(client, settings.session_timeout_s, settings.raw_events_ttl_days,
                             settings.clickhouse_cluster)
    print(f"applied migrations: {applied}" if applied else "schema is up to date")
    if args.rebuild:
        columns = (TextColumn("rebuilding from the raw events"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("rebuild", total=None)
            done = replay.replay(client, settings.session_timeout_s,
                                 progress=lambda n, about: progress.update(task, completed=n, total=about))
        print(f"rebuilt sessions, activity and rollups from {done.events} stored events")
        if done.kept:
            print(f"kept the stored sessions and activity of {done.kept} visitors: some of their raw events are past"
                  " the raw-event TTL")


def _no_workers_writing(args: argparse.Namespace, settings: Settings) -> None:
    """A rebuild writes every visitor's derived rows again: beside a worker's batch of the same
    visitor, each derives it without the other's events and the visitor can stay counted wrong
    (as when partitions are added, docs/operations.md)."""
    import asyncio

    from aiokafka.errors import KafkaError

    from streams import monitor

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        members = asyncio.run(monitor.group_members(settings.kafka_bootstrap, settings.kafka_group))
    except (KafkaError, OSError) as exc:
        _usage_error(args, f"cannot ask Kafka at {settings.kafka_bootstrap} whether workers run ({type(exc).__name__});"
                           " scale them to 0, then rebuild with --force")
    if members:
        _usage_error(args, f"{members} worker{'s are' if members > 1 else ' is'} in group {settings.kafka_group}: scale"
                           " the workers to 0 first (a rebuild beside a worker's batch of the same visitor can count"
                           " it wrong); --force rebuilds anyway")


def cmd_status(args: argparse.Namespace) -> None:
    import asyncio

    from streams import monitor, storage

    settings = _settings(args)
    if settings.embedded:
        _usage_error(args, "`status` reports on the distributed topology: set BK_KAFKA_BOOTSTRAP")
    from aiokafka.errors import KafkaError

    # Its connection lines (an "Unable connect" ERROR per failed attempt) are not the report, and
    # a Kafka that does not answer is said below in one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        exists = asyncio.run(monitor.topic_exists(settings.kafka_bootstrap, settings.kafka_topic))
        lags = asyncio.run(monitor.partition_lags(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_group)) if exists else []
    except (KafkaError, OSError, ValueError) as exc:
        print(f"besokskollen status: Kafka does not answer at {settings.kafka_bootstrap}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not exists:  # the topic is left to ingest and the workers, which create it as configured
        print(f"besokskollen status: Kafka at {settings.kafka_bootstrap} has no topic {settings.kafka_topic!r}:"
              " no ingest or worker has created it yet (they do at start; one the broker refused it to says why in"
              " its log)", file=sys.stderr)
        raise SystemExit(2)
    print(f"topic {settings.kafka_topic}, group {settings.kafka_group}: {monitor.describe(lags)}")
    reports = storage.connect(settings.clickhouse_url, read_timeout_s=monitor.STATUS_READ_TIMEOUT_S)
    for line in monitor.describe_reports(monitor.recent_reports(reports)):
        print(line)


def cmd_partitions(args: argparse.Namespace) -> None:
    """Steps 2-3 of adding partitions (docs/operations.md, "Adding partitions"): with one worker in
    the group, grow the topic, then wait until every ingest sends by the new count and what was
    sent before is written; only then may more workers run."""
    import asyncio
    import time

    from aiokafka.errors import KafkaError

    from streams import monitor, topic

    settings = _settings(args)
    if settings.embedded:
        _usage_error(args, "`partitions` grows the distributed topology's topic: set BK_KAFKA_BOOTSTRAP")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    bootstrap, name, group = settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_group
    try:
        current = asyncio.run(topic.partition_count(bootstrap, name))
        if not current:
            _usage_error(args, f"Kafka at {bootstrap} has no topic {name!r} yet (ingest and the workers create it)")
        if args.count < current:
            _usage_error(args, f"topic {name} has {current} partitions; Kafka cannot take partitions away")
        if args.count > current:
            members = asyncio.run(monitor.group_members(bootstrap, group))
            if members > 1 and not args.force:
                _usage_error(args, f"{members} workers are in group {group}: scale them to one first (two workers"
                                   " writing one visitor at once can count it wrong while visitors move partition);"
                                   " --force adds the partitions anyway")
            asyncio.run(topic.add_partitions(bootstrap, name, args.count))
    except (KafkaError, OSError) as exc:
        print(f"besokskollen partitions: Kafka at {bootstrap}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # The same count again (a run interrupted while it waited) waits again from now.
    print(f"topic {name}: {current} → {args.count} partitions" if args.count > current
          else f"topic {name} has {current} partitions already")
    if args.no_wait:
        return
    # Every producer (and consumer) asks for the partitions at least this often: past it, every
    # ingest sends by the new count, and once what was taken before is written no visitor is on
    # two partitions with events waiting. An outage stops those asks, so the wait starts over
    # when Kafka answers again (what ingest spooled meanwhile is sent with what it knew then).
    settle_s = topic.METADATA_MAX_AGE_MS / 1000 + 5
    switched = time.time() + settle_s
    print(f"waiting until every ingest sends by {args.count} partitions and the events taken before are written"
          f" (at least {settle_s:.0f} s); keep one worker running meanwhile", flush=True)
    outage, said_members = False, False
    while True:
        time.sleep(2)
        try:
            lags = asyncio.run(monitor.partition_lags(bootstrap, name, group))
            members = asyncio.run(monitor.group_members(bootstrap, group))
        except (KafkaError, OSError) as exc:
            print(f"Kafka does not answer ({type(exc).__name__}); asking again", flush=True)
            outage = True
            continue
        now = time.time()
        if outage:
            outage, switched = False, now + settle_s
            print(f"Kafka answers again; waiting {settle_s:.0f} s more, as the ingests ask again", flush=True)
        if members > 1 and not said_members:
            print(f"warning: {members} workers are in group {group}; one is safe until this ends", flush=True)
            said_members = True
        if now < switched:
            continue
        if monitor.written_since(lags, switched, now):
            break
        print(monitor.describe(lags), flush=True)
    print(f"done: every ingest sends by {args.count} partitions; scale the workers out (up to {args.count})")


def cmd_keys_create(args: argparse.Namespace) -> None:
    from besokskollen.app import open_services

    settings = _settings(args)
    new = settings.data_folder is not None and not settings.data_folder.exists()
    services = open_services(settings)
    if new:  # a new deployment's first key, or a mistyped --data: said either way
        print(f"besokskollen keys: there was no data folder at {settings.data_folder}; made a new, empty one",
              file=sys.stderr)
    if args.site:
        site = services.sites.get(args.site)
        if site is None:
            _usage_error(args, f"no site with id {args.site!r}")
        if site.account_id != args.account:
            _usage_error(args, f"site {args.site!r} belongs to account {site.account_id!r}, not {args.account!r}")
    print(services.keys.create(args.account, args.site or ""))


def cmd_import(args: argparse.Namespace) -> None:
    from besokskollen import importing

    settings = _settings(args)
    path = Path(args.file)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per chunk would break the progress bar
    try:
        if args.file != "-" and not path.exists():
            raise importing.ImportFailed(f"no such file: {path}")
        # A folder, /dev/null ("no such file" misled); a pipe (`<(zcat …)`) is read as standard input is.
        if args.file != "-" and not (path.is_file() or path.is_fifo()):
            raise importing.ImportFailed(f"not a regular file: {path}")
        if args.url:
            key = args.key or settings.admin_key
            if not key:
                raise importing.ImportFailed("--url needs --key bk_… (or BK_ADMIN_KEY)")
            send = importing.remote(args.url, key, args.site)
        else:
            send = importing.local(settings, args.site)
        totals = importing.run(args.file, send)
    except importing.ImportFailed as exc:
        done = getattr(exc, "totals", None)
        if done is not None and (done.accepted or done.rejected or done.dropped):  # what the chunks before did
            importing.report(done)
        print(f"besokskollen import: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(importing.report(totals))


def cmd_copy(args: argparse.Namespace) -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    from besokskollen import copying
    from streams import storage

    settings = _settings(args)
    folder = settings.data_folder
    if folder is not None:
        if not folder.is_dir():  # the engine would make an empty one, and copy nothing
            _usage_error(args, f"no data folder at {folder}")
        _journal_written("copy", settings)
    source = storage.connect(settings.clickhouse_url)
    say = lambda line: print(f"besokskollen copy: {line}", file=sys.stderr)  # noqa: E731
    try:
        target = storage.connect(args.to)
    except OperationalError as exc:
        _unreachable("copy", args.to, exc)
    except DatabaseError as exc:  # a database that does not exist, a wrong password, no ClickHouse at all
        say(f"the target at {storage.server(args.to)} answered: {_clickhouse_message(exc)}")
        raise SystemExit(2) from None
    try:
        copied = copying.copy(source, target, settings.session_timeout_s, settings.raw_events_ttl_days, args.cluster,
                              say=say)
    except copying.CopyRefused as exc:
        _usage_error(args, str(exc))
    except (OperationalError, DatabaseError, copying.CopyStopped) as stopped:
        # One line, not clickhouse-connect's traceback: which server, what it said, what next.
        exc = stopped.__cause__ if isinstance(stopped, copying.CopyStopped) else stopped
        at_target = storage.server(args.to) in str(exc) or (isinstance(exc, OperationalError)
                                                              and settings.clickhouse_url.startswith("chdb://"))
        where = f"the target at {storage.server(args.to)}" if at_target else "the source"
        what = storage.reason(exc) if isinstance(exc, OperationalError) else _clickhouse_message(exc)
        say(f"stopped: {where} {'does not answer' if isinstance(exc, OperationalError) else 'answered'}: {what}"
            + ("; the target holds part of the rows: once that is fixed, run the same command again (it empties"
               " what this run copied and starts over)" if isinstance(stopped, copying.CopyStopped) else ""))
        raise SystemExit(2) from None
    print(", ".join(f"{table}: {rows:,}" for table, rows in copied.items()))


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from besokskollen.app import open_services

    settings = _settings(args)
    if settings.data_folder is not None and not settings.data_folder.is_dir():  # it would make an empty one
        _usage_error(args, f"no data folder at {settings.data_folder}")
    if not open_services(settings).keys.revoke(args.key):
        _usage_error(args, "no such API key (or it is revoked already)")
    print("revoked")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="besokskollen", description="Privacy-friendly web and affiliate analytics")
    commands = root.add_subparsers(dest="command", required=True)

    def with_data(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data", help="data folder of the embedded ClickHouse (overrides BK_CLICKHOUSE_URL)")
        return p

    up = with_data(commands.add_parser("up", help="embedded topology in one process"))
    up.add_argument("--host", help="listen address (BK_HOST; default 127.0.0.1)")
    up.add_argument("--port", type=_port, help="listen port (BK_PORT; default 8080)")
    up.set_defaults(default_port=8080)
    up.add_argument("--demo", action="store_true", help="seed a demo site with 90 days of traffic")
    up.set_defaults(func=cmd_up)

    ingest = with_data(commands.add_parser("ingest", help="tracking endpoint → Kafka"))
    ingest.add_argument("--host", help="listen address (BK_HOST; default 127.0.0.1)")
    ingest.add_argument("--port", type=_port, help="listen port (BK_PORT; default 8081)")
    ingest.set_defaults(default_port=8081)
    ingest.set_defaults(func=cmd_ingest)

    api = with_data(commands.add_parser("api", help="query API"))
    api.add_argument("--host", help="listen address (BK_HOST; default 127.0.0.1)")
    api.add_argument("--port", type=_port, help="listen port (BK_PORT; default 8082)")
    api.set_defaults(default_port=8082)
    api.set_defaults(func=cmd_api)

    worker = with_data(commands.add_parser("worker", help="Faust stream worker"))
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--host", help="address of /healthz, /readyz and /metrics (BK_HOST; default 127.0.0.1)")
    worker.add_argument("--port", type=_port, help="port of /healthz, /readyz and /metrics (BK_PORT; default 8083)")
    worker.set_defaults(default_port=8083)
    worker.add_argument("--instance-id", help="the worker's name in status reports (BK_WORKER_INSTANCE_ID)")
    worker.set_defaults(func=cmd_worker)

    migrate = with_data(commands.add_parser("migrate", help="create or upgrade the schema"))
    migrate.add_argument("--rebuild", action="store_true",
                         help="also rebuild sessions, activity and rollups from the stored raw events")
    migrate.add_argument("--force", action="store_true",
                         help="rebuild even while workers are in the group (BK_KAFKA_BOOTSTRAP set)")
    migrate.set_defaults(func=cmd_migrate)
    commands.add_parser("status", help="consumer lag, oldest unprocessed event, worker throughput"
                        ).set_defaults(func=cmd_status)
    partitions = commands.add_parser(
        "partitions", help="add partitions to the events topic, safely (run one worker meanwhile)",
        description="Grows the events topic to COUNT partitions, then waits until every ingest sends by the "
                    "new count and the events taken before are written (about a minute): visitors move "
                    "partition, and two workers writing one visitor at once can count it wrong. Refuses while "
                    "more than one worker is in the group (--force). Exit 0 when done, 2 on a usage or Kafka error.")
    partitions.add_argument("count", type=_partition_count, help="the topic's new number of partitions")
    partitions.add_argument("--force", action="store_true", help="add them with more than one worker running")
    partitions.add_argument("--no-wait", action="store_true", help="add them and return at once")
    partitions.set_defaults(func=cmd_partitions)

    import_ = with_data(commands.add_parser(
        "import", help="bulk-load historic events from an NDJSON file",
        description="Exit code 0 when every line was accepted or dropped as a bot, 1 when a line was "
                    "rejected, 2 on a usage or connection error, 130 when interrupted (Ctrl-C or SIGTERM; "
                    "importing the whole file again is safe)."))
    import_.add_argument("file", help="NDJSON (gzip or not; - for standard input): one event per line, with timestamp, ip and user_agent")
    import_.add_argument("--site", required=True, help="site id the events belong to")
    import_.add_argument("--url", help="a running server (http://host:port); without it the data folder "
                                       "or BK_CLICKHOUSE_URL is opened directly")
    import_.add_argument("--key", help="API key for --url (default: BK_ADMIN_KEY)")
    import_.set_defaults(func=cmd_import)

    copy = with_data(commands.add_parser(
        "copy", help="copy every table into another ClickHouse (moving from `up` to a server or cluster)"))
    copy.add_argument("--to", required=True, type=_clickhouse_url, help="target ClickHouse URL (http(s)://user:pass@host:8123/db)")
    copy.add_argument("--cluster", help="the target's cluster name, if it is one (BK_CLICKHOUSE_CLUSTER there)")
    copy.set_defaults(func=cmd_copy)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = with_data(keys.add_parser("create", help="print a new bk_… key"))
    create.add_argument("--account", required=True, type=_account)
    create.add_argument("--site", type=_site, help="make a site-level key for this site")
    create.set_defaults(func=cmd_keys_create)
    revoke = with_data(keys.add_parser("revoke", help="stop a key from working"))
    revoke.add_argument("key", help="the bk_… key")
    revoke.set_defaults(func=cmd_keys_revoke)
    return root


_SERVERS = frozenset({"up", "ingest", "api", "worker"})


def main(argv: list[str] | None = None) -> None:
    from clickhouse_connect.driver.exceptions import OperationalError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    for line in misspelt(os.environ):
        print(f"besokskollen {args.command}: warning: {line}", file=sys.stderr)
    if args.command in _SERVERS:
        # Until it serves (waiting for ClickHouse or Kafka, migrating), a stop ends the process as
        # a stop of a running server does: exit 0, said in the log. What starting leaves half
        # done is done again at the next start (migrations are idempotent).
        signal.signal(signal.SIGTERM, _stopped_while_starting)
        signal.signal(signal.SIGINT, _stopped_while_starting)
        collapse_client_repeats()  # an outage's connection errors: a line per kind per 30 s
    else:
        # A one-shot command stopped by SIGTERM (a terminal closed, a job runner's timeout) ends as
        # after Ctrl-C: its summary and one line, not a silent death mid-chunk.
        signal.signal(signal.SIGTERM, _interrupted)
        # A one-shot command says in one line of its own that ClickHouse does not answer (below);
        # urllib3's retry and clickhouse-connect's "Unexpected Http Driver Exception" warnings
        # about the same failure came first. Servers keep them: they log while they wait.
        for name in ("urllib3", "clickhouse_connect"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C ends a one-shot command in one line, as 130 (a shell's code for SIGINT). What it
        # leaves is safe to run again: a copy starts over, a rebuild or migration replays.
        print(f"besokskollen {args.command}: interrupted; running the same command again is safe", file=sys.stderr)
        raise SystemExit(130) from None
    except OperationalError as exc:  # servers wait for ClickHouse; a one-shot command says where it failed
        _unreachable(args.command, _settings(args).clickhouse_url, exc)
    except OSError as exc:
        # A data folder that cannot be made (a read-only place, a file on its path) or used.
        folder = _settings(args).data_folder
        at = Path(exc.filename) if isinstance(exc.filename, str) else None
        if folder is None or at is None or not (at.is_relative_to(folder) or folder.is_relative_to(at)):
            raise
        _usage_error(args, f"cannot use the data folder {folder}: {exc.strerror} ({exc.filename})")
    except Exception as exc:
        # A setting ClickHouse refuses (a database or cluster it does not have, a wrong password)
        # is a bad setting, for servers too: waiting would not mend it.
        if (refused := _refused_setting(exc, _settings(args).clickhouse_url)) is not None:
            _usage_error(args, refused)
        # chDB lets one process open a data folder: the engine says so only as "Error initializing
        # EmbeddedServer" (its exception types are its own).
        if "EmbeddedServer" not in str(exc):
            raise
        print(f"besokskollen {args.command}: the data folder {_settings(args).clickhouse_url.removeprefix('chdb://')} is"
              " in use by another process (stop `up` first, or point BK_CLICKHOUSE_URL at a server)", file=sys.stderr)
        raise SystemExit(2) from None


def _claim_spool(command: str, settings: Settings) -> Spool:
    """The server's spool (or journal), opened and locked before anything else starts: a second
    process on one directory stops here with one line, not with a traceback once the server runs."""
    inside_the_data_folder = settings.embedded and settings.spool_dir is None  # `up`'s journal there
    try:
        return _open_spool(settings)
    except SpoolLocked as exc:
        message = str(exc)
        if inside_the_data_folder:
            message = f"the data folder {settings.clickhouse_url.removeprefix('chdb://')} is in use by another `up`"
    except OSError as exc:  # a directory that cannot be made (a read-only place, a file on its path) or used
        if inside_the_data_folder:
            raise  # the data folder's own trouble (main names it)
        message = (f"BK_SPOOL_DIR: cannot use the spool directory {settings.spool_path}: {exc.strerror or exc}"
                   + (f" ({exc.filename})" if exc.filename else ""))
    print(f"besokskollen {command}: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def _journal_written(command: str, settings: Settings) -> None:
    """An embedded data folder is complete only once `up`'s journal is empty (after a kill -9 it
    may hold events answered 202 that the next start writes)."""
    folder = settings.clickhouse_url.removeprefix("chdb://")
    try:
        pending = _spool_pending(settings)
    except SpoolLocked:
        # As the engine's own lock is reported (main): one line naming the folder, exit 2.
        print(f"besokskollen {command}: the data folder {folder} is in use by another process (stop `up` first)",
              file=sys.stderr)
        raise SystemExit(2) from None
    if pending:
        print(f"besokskollen {command}: {settings.spool_path} holds {pending:,} event{'s' * (pending != 1)} not written yet;"
              " start and stop `up` on this data folder once to write them", file=sys.stderr)
        raise SystemExit(2)


def _open_spool(settings: Settings) -> Spool:
    """Raises `SpoolLocked` while another process holds the directory."""
    spool = Spool(settings.spool_path, settings.spool_max_bytes)
    spool.open()
    return spool


def _spool_pending(settings: Settings) -> int:
    """Records in the spool directory not yet sent."""
    spool = _open_spool(settings)
    try:
        return spool.pending_records
    finally:
        spool.close()


def _clickhouse_message(exc: Exception) -> str:
    """What ClickHouse (or whatever answered) said, without clickhouse-connect's wrapping:
    "Database nodb does not exist. (UNKNOWN_DATABASE)"."""
    text = str(exc).strip()
    text = re.sub(r"^Received ClickHouse exception, code: \d+, server response: (Code: \d+\. DB::Exception: )?", "", text)
    text = re.sub(r"^HTTP driver received HTTP status (\d+), server response: ", r"HTTP \1: ", text)
    text = re.sub(r"\s*\((version [^)]*|for url [^)]*)\)", "", text)
    return " ".join(text.split())[:300]


# ClickHouse's error names for settings it refuses: the variable, and what to do about it.
_REFUSED_SETTINGS = {
    "UNKNOWN_DATABASE": ("BK_CLICKHOUSE_URL", "names a database that ClickHouse at {server} does not have (create it,"
                                              " or fix the URL's path)"),
    "CLUSTER_DOESNT_EXIST": ("BK_CLICKHOUSE_CLUSTER", "ClickHouse at {server} has no such cluster (its"
                                                      " system.clusters lists those it has)"),
    "AUTHENTICATION_FAILED": ("BK_CLICKHOUSE_URL", "ClickHouse at {server} refused its user or password"),
    "REQUIRED_PASSWORD": ("BK_CLICKHOUSE_URL", "ClickHouse at {server} refused its user or password"),
}


def _refused_setting(exc: Exception, url: str) -> str | None:
    """One line naming the setting that ClickHouse's error is about, if it is about one."""
    from streams import storage

    text = str(exc)
    for name, (variable, what) in _REFUSED_SETTINGS.items():
        if f"({name})" in text:
            return f"{variable}: {what.format(server=storage.server(url))}: {_clickhouse_message(exc)}"
    return None


def _clickhouse_url(text: str) -> str:
    """`copy --to`: a ClickHouse server's HTTP URL (clickhouse-connect would take "host:8123" as
    localhost, and a chdb:// path cannot open next to the source in one process)."""
    if problem := server_url_problem(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ClickHouse server URL (http(s)://user:pass@host:8123/db): {problem}")
    return text


def _unreachable(command: str, url: str, exc: Exception) -> NoReturn:
    from streams import storage

    print(f"besokskollen {command}: ClickHouse does not answer at {storage.server(url)}: {storage.reason(exc)}",
          file=sys.stderr)
    raise SystemExit(2) from None

