"""A long soak of the distributed topology: a real Kafka broker, the ClickHouse HTTP front over
chDB (tests/chfront.py), `besokskollen ingest`, two `besokskollen worker`s and `besokskollen api`,
all on 127.0.0.1 as separate processes — looking for what a short test never shows: memory,
descriptors, threads, ClickHouse parts, spool or latency that keep growing, a lag that does not
come back to zero, a worker slow to rejoin, numbers that drift, a stop that is not clean.

1. starts the broker (deploy/kafka/start.sh, fresh data folder, free ports), the front, ingest
   (its own BK_SPOOL_DIR), the API and two named workers (a unique topic and BK_KAFKA_GROUP);
   creates 20 load sites and one marker site through the API;
2. for `--minutes` sends ~`--rate` events/s to ingest's `/api/event` with the embedded soak's
   traffic (`soak_embedded.Load`: pageviews, custom events, clicks, client event ids some sent
   again, invalid bodies, an unknown site, bots) and queries the API every few seconds;
3. every `--sample` seconds prints per process (ingest, w1, w2, api, chfront, kafka): RSS, fds,
   threads, CPU seconds; p50/p99 of `/api/event` and of the API; consumer lag (streams.monitor,
   what `besokskollen status` reads); the spool's size and backlog; ClickHouse parts (active and
   all, from `system.parts` through the front); the freshness lag (a marker pageview posted to
   ingest, time until the API counts it);
4. at 40 % of the run restarts w1 with SIGTERM, at 65 % SIGKILLs w2 and restarts it; after each,
   follows the consumer lag second by second until it is back near zero, then a marker;
5. at the end waits for lag 0, checks pageviews per site and clicks per product against its own
   count of 202 answers (once per client event id), stops everything by pid (SIGTERM: exit code
   and time), and greps every log for tracebacks, errors and warnings.

    PYTHONPATH=. python3 tests/bench/soak_distributed.py [--minutes 10] [--rate 200] [--sample 30] [--session-timeout S] [--keep]

Not run by CI: it prints numbers (2 cores shared by every process and the load; expect noise)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.soak_embedded import (  # noqa: E402
    AUTH, N_SITES, Load, Proc, compare, dir_size, marker_lag, metric, percentile, proc_stats, totals,
)
from tests.conftest import ADMIN_KEY, Broker, free_port  # noqa: E402

CLI = [sys.executable, "-m", "besokskollen"]


async def lags(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(total lag, largest partition lag) of the group, as `besokskollen status` reads it."""
    from streams.monitor import partition_lags

    try:
        found = await asyncio.wait_for(partition_lags(bootstrap, topic, group, ages=False), 30)
    except Exception:  # noqa: BLE001 - a sample without a lag says so
        return -1, -1
    return sum(p.lag for p in found), max((p.lag for p in found), default=0)


async def group_members(bootstrap: str, group: str) -> tuple[str, int]:
    """(state, members) of the consumer group."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        (response,) = await admin.describe_consumer_groups([group])
        _error, _group, state, _ptype, _protocol, members, *_ = response.groups[0]
        return state, len(members)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, -1
    finally:
        await admin.close()


def parts(clickhouse: str) -> dict[str, tuple[int, int]]:
    """(active, all) parts per table, through the front."""
    from streams import storage

    rows = storage.connect(clickhouse).query(
        "SELECT table, countIf(active), count() FROM system.parts WHERE database = currentDatabase()"
        " GROUP BY table ORDER BY table").result_rows
    return {t: (a, n) for t, a, n in rows}


LOG_TROUBLE = re.compile(r"Traceback|\bERROR\b|\bWARNING\b|\bCRITICAL\b|Exception|\[E\]|\[W\]", re.IGNORECASE)


def log_report(logs: dict[str, Path]) -> list[str]:
    """Per log: counts of trouble lines and the distinct ones (numbers blanked)."""
    out = []
    for name, path in logs.items():
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        bad = [line for line in lines if LOG_TROUBLE.search(line)]
        shapes = Counter(re.sub(r"\d+", "N", line.strip())[:220] for line in bad)
        out.append(f"{name}: {len(lines)} lines, {len(bad)} trouble lines")
        out.extend(f"    {n}× {shape}" for shape, n in shapes.most_common(12))
    return out


async def main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="bk-dsoak-"))
    print(f"work folder {work}", flush=True)
    broker = Broker(work / "kafka")
    procs: dict[str, Proc] = {}
    logs: dict[str, Path] = {"kafka": work / "kafka" / "server.log"}
    failures: list[str] = []
    events_log: list[str] = []
    rows: list[dict] = []
    chfront: subprocess.Popen | None = None
    try:
        started_setup = time.monotonic()
        broker.start()
        kafka_pid = int((broker.data / "kafka.pid").read_text())
        ready = work / "chfront.port"
        logs["chfront"] = work / "chfront.log"
        with open(logs["chfront"], "wb") as out:
            chfront = subprocess.Popen([sys.executable, "-m", "tests.chfront", "--path", str(work / "ch"), "--port", "0",
                                        "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while not (ready.exists() and ready.read_text().strip()):
            time.sleep(0.1)
        clickhouse = f"http://127.0.0.1:{ready.read_text().strip()}/?compress=false"
        run_id = uuid.uuid4().hex[:8]
        env = {"PYTHONPATH": str(ROOT), "BK_KAFKA_BOOTSTRAP": broker.bootstrap, "BK_CLICKHOUSE_URL": clickhouse,
               "BK_ADMIN_KEY": ADMIN_KEY, "BK_KAFKA_TOPIC": f"events-{run_id}", "BK_KAFKA_GROUP": f"soak-{run_id}",
               "BK_SPOOL_DIR": str(work / "spool"), "BK_RATE_LIMIT_PER_MINUTE": "1000000"}
        if args.session_timeout:  # short: what is kept per session timeout fills within the run
            env["BK_SESSION_TIMEOUT_S"] = str(args.session_timeout)
        ports = {name: free_port() for name in ("ingest", "api", "w1", "w2")}
        base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        procs["ingest"] = Proc("ingest", [*CLI, "ingest", "--port", str(ports["ingest"])], work / "ingest.log", env,
                               f"{base['ingest']}/readyz")
        procs["api"] = Proc("api", [*CLI, "api", "--port", str(ports["api"])], work / "api.log", env,
                            f"{base['api']}/readyz")
        for w in ("w1", "w2"):
            procs[w] = Proc(w, [*CLI, "worker", "--port", str(ports[w]), "--instance-id", f"{w}-{run_id}"],
                            work / f"{w}.log", env, f"{base[w]}/readyz")
        logs.update({name: p.log for name, p in procs.items()})
        for p in procs.values():
            p.start()
        topic, group = env["BK_KAFKA_TOPIC"], env["BK_KAFKA_GROUP"]

        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=128)) as http:
            for p in procs.values():
                await p.ready(http)
            while await group_members(broker.bootstrap, group) != ("Stable", 2):
                await asyncio.sleep(0.5)
            print(f"deployment ready in {time.monotonic() - started_setup:.1f} s: kafka {kafka_pid}, chfront "
                  f"{chfront.pid}, " + ", ".join(f"{n} {p.pid}" for n, p in procs.items()), flush=True)
            sites = []
            for i in range(N_SITES + 1):
                domain = f"dsoak{i}.example" if i < N_SITES else "marker.example"
                async with http.post(f"{base['api']}/api/v1/sites", json={"domain": domain}, headers=AUTH) as r:
                    assert r.status == 201, (r.status, await r.text())
                    sites.append(((await r.json())["data"]["id"], domain))
            marker, sites = sites[-1], sites[:-1]
            load = Load(base["ingest"], sites, args.rate, api_url=base["api"])
            markers = [0]
            started = time.monotonic()
            watched = {**{n: p for n, p in procs.items()}}
            last = {"t": started, "sent": 0, "cpu": {}}

            def pstats() -> dict[str, dict]:
                out = {n: p.stats() for n, p in watched.items()}
                out["chfront"] = proc_stats(chfront.pid)
                out["kafka"] = proc_stats(kafka_pid)
                return out

            last["cpu"] = {n: s["cpu_s"] for n, s in pstats().items()}

            async def sample(label: str = "") -> dict:
                now = time.monotonic()
                st = pstats()
                ev, api = load.event_latency, load.api_latency
                load.event_latency, load.api_latency = [], []
                total_lag, max_lag = await lags(broker.bootstrap, topic, group)
                fresh = await marker_lag(base["ingest"], http, marker, markers, timeout=180, api=base["api"])
                try:
                    p = await asyncio.to_thread(parts, clickhouse)
                except Exception as exc:  # noqa: BLE001
                    p = {"error": (0, 0)}
                    print(f"parts: {exc}", flush=True)
                dt = now - last["t"]
                row = {"t": now - started, "label": label, "procs": st,
                       "cpu%": {n: 100 * (s["cpu_s"] - last["cpu"].get(n, 0)) / dt for n, s in st.items()},
                       "ev/s": (load.tally.sent - last["sent"]) / dt,
                       "spool_mb": dir_size(work / "spool") / 2**20,
                       "backlog": await metric(http, base["ingest"], "bk_spool_records"),
                       "parts_active": sum(a for a, _ in p.values()), "parts_all": sum(n for _, n in p.values()),
                       "parts": p, "lag": total_lag, "max_lag": max_lag,
                       "ev_p50": percentile(ev, .5) * 1000, "ev_p99": percentile(ev, .99) * 1000,
                       "api_p50": percentile(api, .5) * 1000, "api_p99": percentile(api, .99) * 1000,
                       "n_ev": len(ev), "n_api": len(api), "fresh_s": fresh}
                last.update(t=now, sent=load.tally.sent, cpu={n: s["cpu_s"] for n, s in st.items()})
                rows.append(row)
                procs_line = "  ".join(
                    f"{n} {s['rss_mb']:.0f}MB/{s['fds']}fd/{s['threads']}thr/{s['cpu_s']:.0f}s({row['cpu%'][n]:.0f}%)"
                    for n, s in st.items())
                print(f"{row['t']:6.0f}s {label} ev/s {row['ev/s']:4.0f} event p50/p99 {row['ev_p50']:.1f}/"
                      f"{row['ev_p99']:.1f} ms (n={row['n_ev']}) api p50/p99 {row['api_p50']:.1f}/{row['api_p99']:.1f}"
                      f" ms (n={row['n_api']}) lag {total_lag} (max {max_lag}) fresh {fresh:.2f} s spool "
                      f"{row['spool_mb']:.2f} MB backlog {row['backlog']:.0f} parts {row['parts_active']}/"
                      f"{row['parts_all']}\n        {procs_line}", flush=True)
                return row

            async def follow(what: str, since: float, limit: float = 90) -> None:
                """The lag second by second after a disturbance, until it is back below a second of load."""
                trail = []
                while time.monotonic() - since < limit:
                    total_lag, _ = await lags(broker.bootstrap, topic, group)
                    state, members = await group_members(broker.bootstrap, group)
                    trail.append(f"{time.monotonic() - since:.0f}s:{total_lag}/{state[:3]}{members}")
                    if 0 <= total_lag <= args.rate and time.monotonic() - since > 3 and state == "Stable":
                        break
                    await asyncio.sleep(1)
                fresh = await marker_lag(base["ingest"], http, marker, markers, timeout=180, api=base["api"])
                line = (f"{what}: lag back to <= {args.rate:.0f} after {time.monotonic() - since:.1f} s; "
                        f"marker fresh {fresh:.2f} s; trail (t:lag/state members) {' '.join(trail)}")
                events_log.append(line)
                print(line, flush=True)

            async def disturb() -> None:
                total = args.minutes * 60
                await asyncio.sleep(0.4 * total)
                w1 = procs["w1"]
                t0 = time.monotonic()
                rc, took = w1.term()
                line = f"w1 SIGTERM at {t0 - started:.0f}s: exit code {rc} after {took:.2f} s"
                if rc != 0:
                    failures.append(line)
                w1.start()
                took_ready = await w1.ready(http)
                line += f"; restarted, ready after {took_ready:.1f} s"
                events_log.append(line)
                print(line, flush=True)
                await follow("after w1's SIGTERM restart", t0)
                await asyncio.sleep(max(0.0, 0.65 * total - (time.monotonic() - started)))
                w2 = procs["w2"]
                t0 = time.monotonic()
                w2.kill()
                w2.start()
                took_ready = await w2.ready(http)
                line = f"w2 SIGKILL at {t0 - started:.0f}s, restarted at once: ready after {took_ready:.1f} s"
                events_log.append(line)
                print(line, flush=True)
                await follow("after w2's SIGKILL restart", t0)

            async def sampler() -> None:
                while not load.stopping:
                    await asyncio.sleep(args.sample)
                    if not load.stopping:
                        await sample()

            await sample("start")
            query_task = asyncio.create_task(load.queries(http, args.query_every))
            sample_task = asyncio.create_task(sampler())
            disturb_task = asyncio.create_task(disturb())
            await load.run(http, args.minutes * 60)
            load.stopping = True
            await query_task
            await disturb_task
            sample_task.cancel()
            await asyncio.gather(sample_task, return_exceptions=True)
            ended = time.monotonic()
            while (lag := await lags(broker.bootstrap, topic, group))[0] != 0 and time.monotonic() - ended < 180:
                await asyncio.sleep(0.5)
            print(f"lag {lag[0]} {time.monotonic() - ended:.1f} s after the last event", flush=True)
            await sample("end")
            accepted = await metric(http, base["ingest"], "bk_events_accepted_total")
            acked = await metric(http, base["ingest"], "bk_producer_ack_seconds_count")
            ack_sum = await metric(http, base["ingest"], "bk_producer_ack_seconds_sum")
            switches = procs["ingest"].log.read_text().count("; spooling to ")
            print(f"ingest: {accepted:.0f} accepted, {acked:.0f} acknowledged by Kafka directly (mean "
                  f"{1000 * ack_sum / max(acked, 1):.1f} ms), {accepted - acked:.0f} through the spool; "
                  f"{switches} switches to the spool", flush=True)
            print(f"sent {load.tally.sent} events + {load.tally.retries_sent} retries; statuses "
                  f"{dict(sorted(load.tally.statuses.items()))}; API statuses {dict(load.api_statuses)}", flush=True)
            print(f"expected: pageviews {sum(load.tally.pageviews.values())}, clicks "
                  f"{sum(load.tally.clicks.values())}, custom {sum(load.tally.custom.values())}, distinct ids "
                  f"{len(load.tally.ids)}", flush=True)
            pv, clicks = await totals(load, http)
            found = compare(load, pv, clicks)
            print(f"totals: {len(found)} mismatches", *found[:10], sep="\n  ", flush=True)
            failures.extend(f"totals: {p}" for p in found)
            status = subprocess.run([*CLI, "status"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
                                    env={**os.environ, **env})
            print(f"besokskollen status (exit {status.returncode}):\n{status.stdout}{status.stderr[-1500:]}", flush=True)
            print("parts at the end:", await asyncio.to_thread(parts, clickhouse), flush=True)
    finally:
        for name in ("api", "ingest", "w1", "w2"):
            if name in procs and procs[name].proc is not None:
                rc, took = procs[name].term()
                line = f"{name} SIGTERM: exit code {rc} after {took:.2f} s"
                events_log.append(line)
                print(line, flush=True)
                if rc != 0:
                    failures.append(line)
        if chfront is not None and chfront.poll() is None:
            t0 = time.monotonic()
            chfront.send_signal(signal.SIGTERM)
            try:
                rc = chfront.wait(60)
            except subprocess.TimeoutExpired:
                chfront.kill()
                rc = chfront.wait()
            print(f"chfront SIGTERM: exit code {rc} after {time.monotonic() - t0:.2f} s", flush=True)
        t0 = time.monotonic()
        broker.stop()
        print(f"kafka stop.sh: {time.monotonic() - t0:.2f} s", flush=True)
        print("\nlogs:", *log_report(logs), sep="\n", flush=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    names = ["ingest", "w1", "w2", "api", "chfront", "kafka"]
    print("\n| t s | ev p50/p99 ms | API p50/p99 ms | lag | fresh s | spool MB | parts act/all | "
          + " | ".join(f"{n} RSS MB/fd/thr/CPU s" for n in names) + " |")
    print("|" + "---:|" * (7 + len(names)))
    for r in rows:
        cells = " | ".join(f"{r['procs'][n]['rss_mb']:.0f}/{r['procs'][n]['fds']}/{r['procs'][n]['threads']}/"
                           f"{r['procs'][n]['cpu_s']:.0f}" for n in names)
        print(f"| {r['t']:.0f}{' ' + r['label'] if r['label'] else ''} | {r['ev_p50']:.1f}/{r['ev_p99']:.1f} | "
              f"{r['api_p50']:.1f}/{r['api_p99']:.1f} | {r['lag']} | {r['fresh_s']:.2f} | {r['spool_mb']:.2f} | "
              f"{r['parts_active']}/{r['parts_all']} | {cells} |")
    print("\nevents:", *events_log, sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "events": events_log}, indent=1, default=str))
    print("FAILED:" if failures else "totals exact, clean exits", *failures[:20], sep="\n  ")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200, help="events per second")
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    parser.add_argument("--query-every", type=float, default=3, help="seconds between rounds of API queries")
    parser.add_argument("--session-timeout", type=int, help="BK_SESSION_TIMEOUT_S (at least 60): memory kept per"
                        " session timeout then reaches its size within the run")
    parser.add_argument("--keep", action="store_true", help="keep the data folders and logs")
    parser.add_argument("--json", help="write the samples here")
    sys.exit(asyncio.run(main(parser.parse_args())))
