"""`make bench`: ingestd end to end on a real broker and database, on this machine.

Phase 1, throughput: pre-signed ES256 messages are queued at the broker for ingestd's
persistent session while it is stopped; then ingestd starts and drains the backlog with
acknowledge-after-commit. Reported: messages/s, daemon CPU per message, peak RSS. It runs
--repeat times (a fresh backlog each time) and reports the median run and every run's
rate: on a shared host one run says little.
Phase 2, latency: a publisher sends at a fixed rate while ingestd runs; reported: the
sent-to-commit delay, p50 and p99 (from the daemon's own histogram).
Phase 3, memory: a backlog of maximum-size messages (1,000 readings and 64 KiB each, the
protocol's limits) is queued while ingestd is stopped, then drained; reported: the peak
RSS of the daemon and of its verification workers, messages/s and readings/s, and the
most bytes it held pending (so that the byte bound, ``ingest.max_pending_bytes``, is seen
to work). ``--large-only`` runs this phase alone.
Every phase ends by checking that every message was stored exactly once.
Fleet (``--only fleet`` runs it alone): ``meter import`` of 1,000 and ``--fleet-meters``
(100,000) meters, each given a week of history; at both sizes the daemon's start-up time and
RSS, ``ingestd status`` and the flag refresh; then a backlog several times
``ingest.max_pending`` drained with the default settings (disconnects and duplicates
received are reported). Ratios of the two sizes in one run.
Audit: ``ingestd audit verify`` over everything phases 1 and 2 stored (every signature
checked again, every row compared); reported: messages/s. ``--only audit`` runs it alone,
on --messages messages stored directly (no broker, no daemon).

Billing: a fleet (10,000 meters by default) with a month of 15-minute readings is
generated in the database, with a few holes, gaps, replays, outages and tamper events;
reported: the rows generated and the time to compute every meter's billing statement
(`ingestd billing report`'s work), the median of --billing-runs. ``--only billing`` runs
it alone, ``--no-billing`` skips it.

Results go to bench/results/latest.json (and a dated copy) and a printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import multiprocessing
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import FastPublisher, max_size_messages  # noqa: E402
from ingestd import health  # noqa: E402
from ingestd.config import DatabaseConfig, FlagsConfig  # noqa: E402
from ingestd.envelope import MAX_READINGS, check_message, format_time  # noqa: E402
from ingestd.signature import Signer, generate_private_key, private_key_pem, public_key_pem  # noqa: E402
from ingestd.simulator import (  # noqa: E402
    Fleet,
    FleetStats,
    HeadendKey,
    KeyFactory,
    VirtualMeter,
    build_fleet,
    check_request,
    register_fleet,
)
from ingestd.store import Accept, Store  # noqa: E402
from services import MosquittoServer, PostgresServer, free_port  # noqa: E402

PREFIX = "meters"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100_000, help="phase 1 backlog size")
    parser.add_argument(
        "--repeat", type=int, default=3, help="phase 1 runs (this host varies: the median is reported)"
    )
    parser.add_argument("--rate", type=int, default=4000, help="phase 2 publish rate, messages/s")
    parser.add_argument("--seconds", type=int, default=15, help="phase 2 duration")
    parser.add_argument(
        "--large", type=int, default=3000, help="phase 3 backlog of maximum-size messages (0: skip)"
    )
    parser.add_argument("--large-meters", type=int, default=100, help="phase 3 meters")
    parser.add_argument("--large-only", action="store_true", help="run phase 3 alone")
    parser.add_argument(
        "--only",
        choices=("fleet", "audit", "storm", "billing"),
        help="run only this section (audit stores --messages itself, no broker or daemon)",
    )
    parser.add_argument("--no-fleet", action="store_true", help="skip the fleet section")
    parser.add_argument("--no-billing", action="store_true", help="skip the billing section (the longest)")
    parser.add_argument(
        "--billing-meters", type=int, default=10_000, help="billing: meters with a month of readings"
    )
    parser.add_argument("--billing-interval", type=int, default=900, help="billing: metering interval, s")
    parser.add_argument(
        "--billing-runs", type=int, default=1, help="billing: reports timed (each is a full pass; default 1)"
    )
    parser.add_argument(
        "--fleet-meters", type=int, default=100_000, help="the large fleet (the small: 1,000)"
    )
    parser.add_argument(
        "--fleet-backlog", type=int, default=60_000, help="fleet drain backlog (3x ingest.max_pending)"
    )
    parser.add_argument(
        "--fleet-readings-per-day", type=int, default=1, help="history readings a meter a day"
    )
    parser.add_argument(
        "--fleet-settle-s", type=float, default=10.0, help="wait after start-up before the settled RSS"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="run the daemon under py-spy, collapsed stacks to FILE"
    )
    add_storm_arguments(parser)
    return parser.parse_args()


def presign(
    signers: list[Signer], start_seq: int, count: int, *, sent: datetime | None
) -> list[tuple[str, bytes]]:
    """``count`` messages round-robin over the meters; one reading each."""
    messages = []
    protected = {s.kid: s.protected() for s in signers}
    per_meter_seq = dict.fromkeys((s.kid for s in signers), start_seq - 1)
    # Within the data window of `sent` (ingest.max_data_age_days), whenever the bench runs.
    base = (sent or datetime.now(UTC)) - timedelta(days=30)
    for i in range(count):
        signer = signers[i % len(signers)]
        meter = signer.kid.removesuffix("-k1")
        per_meter_seq[signer.kid] += 1
        seq = per_meter_seq[signer.kid]
        body = {
            "v": 1,
            "meter": meter,
            "epoch": 0,
            "seq": seq,
            "sent": format_time(sent or datetime.now(UTC)),
            "replay": False,
            "readings": [{"t": format_time(base + timedelta(minutes=15 * seq)), "import_wh": 1000 + seq}],
        }
        messages.append((f"{PREFIX}/{meter}/up", signer.sign_body(orjson.dumps(body), protected[signer.kid])))
    return messages


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name; None once it is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_s(fields: list[str] | None) -> float:
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    return _cpu_s(_stat_fields(Path(f"/proc/{pid}/stat")))


def children_of(pid: int) -> list[int]:
    return [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if (fields := _stat_fields(stat)) is not None and int(fields[1]) == pid
    ]


def daemon_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of the daemon: its main thread (the event loop), its other threads, and
    its child processes (the verification workers, still running)."""
    split = {"event_loop": 0.0, "other_threads": 0.0, "verify_workers": 0.0}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        split["event_loop" if stat.parent.name == str(pid) else "other_threads"] += _cpu_s(_stat_fields(stat))
    split["verify_workers"] = sum(proc_cpu_s(child) for child in children_of(pid))
    return split


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (the postmaster and its backends)."""
    return proc_cpu_s(pid) + sum(proc_cpu_s(child) for child in children_of(pid))


def proc_peak_rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmHWM")


def _status_mib(pid: int, field: str) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def histogram_quantile(q: float, metrics: dict[str, float], name: str) -> float:
    """Prometheus' histogram_quantile over cumulative buckets (linear within a bucket)."""
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v)
        for k, v in metrics.items()
        if k.startswith(f"{name}_bucket")
    )
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return float("nan")


def start_daemon(env: dict[str, str], log_path: Path, profile: Path | None = None) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    command = [sys.executable, "-m", "ingestd.cli", "run"]
    if profile is not None:
        spy = Path(sys.executable).parent / "py-spy"
        # BENCH_PYSPY_ARGS adds py-spy options, e.g. "--gil -r 200" for GIL holders only.
        extra = os.environ.get("BENCH_PYSPY_ARGS", "").split()
        command = [
            str(spy),
            "record",
            *extra,
            "--threads",
            "--format",
            "raw",
            "-o",
            str(profile),
            "--",
            *command,
        ]
    return subprocess.Popen(command, env=env, stdout=log, stderr=log)


def wait_metric(port: int, name: str, target: float, timeout: float = 600) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            metrics = scrape(port)
            if metrics.get(name, 0) >= target:
                return metrics
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not reach {target}")
        # Not faster: rendering /metrics costs the daemon CPU and the GIL.
        time.sleep(0.25)


async def count_rows(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}")
            for t in ("readings", "raw_messages", "message_seqs", "quarantine")
        }
    finally:
        await conn.close()


async def count_meter_rows(dsn: str, pattern: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE meter_id LIKE $1", pattern)
            for t in ("readings", "raw_messages", "message_seqs", "quarantine")
        }
    finally:
        await conn.close()


async def setup_db(dsn: str, signers: list[Signer], *, interval_s: int = 900) -> None:
    async with Store(DatabaseConfig(url=dsn)) as store:
        await store.migrate()
        for s in signers:
            await store.add_meter(
                s.kid.removesuffix("-k1"),
                alg=s.alg,
                kid=s.kid,
                public_key_pem=public_key_pem(s.key.public_key()).decode(),
                site="BENCH",
                interval_s=interval_s,
            )


def bench_audit(dsn: str, expected: int) -> dict[str, Any]:
    """``ingestd audit verify`` over the whole database, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")} | {
        "INGESTD_DATABASE_URL": dsn,
        "INGESTD_LOG_LEVEL": "warning",
    }
    print(f"phase 3: ingestd audit verify over {expected} messages ...", flush=True)
    before = os.times()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd.cli", "audit", "verify", "--json"],
        env=env,
        capture_output=True,
        check=False,
    )
    elapsed = time.monotonic() - t0
    after = os.times()
    cpu_s = after.children_user + after.children_system - before.children_user - before.children_system
    summary = orjson.loads(proc.stdout)["summary"] if proc.stdout else {}
    checked = summary.get("messages_checked", 0)
    return {
        "messages": checked,
        "seconds": round(elapsed, 2),
        "messages_per_s": round(checked / elapsed),
        "target_messages_per_s": 5000,
        # The command and its verification workers (children of this process).
        "cpu_us_per_message": round(cpu_s / max(checked, 1) * 1e6, 1),
        "clean": proc.returncode == 0 and summary.get("clean") is True and checked == expected,
        # On a shared host the rate says as much about the neighbours as about the code.
        "load_average_1min_after": round(os.getloadavg()[0], 1),
    }


async def store_directly(dsn: str, signers: list[Signer], count: int) -> None:
    """``count`` signed messages stored as the daemon stores them, without the broker."""
    received = datetime.now(UTC)
    async with Store(DatabaseConfig(url=dsn)) as store:
        keys = {k.kid: k for k in await store.load_keys()}
        messages = presign(signers, 1, count, sent=received)
        for i in range(0, count, 1000):
            accepts = [
                Accept(
                    check_message(
                        t,
                        p,
                        received,
                        keys,
                        topic_prefix=PREFIX,
                        max_clock_skew=timedelta(0),
                        max_data_age=timedelta(days=100),
                    ),
                    t,
                    p,
                    received,
                )
                for t, p in messages[i : i + 1000]
            ]
            await store.write_batch(accepts, [], now=received)


def main_audit_only(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> int:
    durable = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    with PostgresServer(work / "pg", settings=durable) as pg:
        dsn = pg.create_database("bench")
        print(f"making {args.meters} ES256 meters, storing {args.messages} messages ...", flush=True)
        signers = [
            Signer("ES256", f"B-{i:06d}-k1", generate_private_key("ES256")) for i in range(args.meters)
        ]
        asyncio.run(setup_db(dsn, signers))
        asyncio.run(store_directly(dsn, signers, args.messages))
        results["audit"] = bench_audit(dsn, args.messages)
    print(json.dumps(results["audit"]))
    write_results(args.out, results, "bench-audit")
    print(f"audit verify: {results['audit']['messages_per_s']:,} msg/s (target 5,000)")
    return 0 if results["audit"]["clean"] else 1


def drain_large(
    args: argparse.Namespace,
    dsn: str,
    env: dict[str, str],
    log_path: Path,
    metrics_port: int,
    publisher: FastPublisher,
    pg_pid: int,
    published_before: int,
) -> dict[str, Any]:
    """Phase 3: a backlog of maximum-size messages, queued while ingestd is stopped, drained;
    the daemon and its workers sampled for memory meanwhile. ingestd must not be running."""
    print(f"making {args.large_meters} ES256 meters for maximum-size messages ...", flush=True)
    signers = [
        Signer("ES256", f"L-{i:06d}-k1", generate_private_key("ES256")) for i in range(args.large_meters)
    ]
    asyncio.run(setup_db(dsn, signers, interval_s=60))
    backlog = max_size_messages(signers, args.large, end=datetime.now(UTC))
    sizes = [len(payload) for _, payload in backlog]
    print(
        f"phase 3: queueing {len(backlog)} messages of {min(sizes):,}-{max(sizes):,} bytes "
        f"({sum(sizes) / 2**20:,.0f} MiB) at the broker ...",
        flush=True,
    )
    publisher.publish(backlog)
    publisher.wait_acked(published_before + len(backlog), timeout=600)
    pg_cpu0 = tree_cpu_s(pg_pid)
    t0 = time.monotonic()
    # With --large-only, --profile profiles this phase (its memory figures are then py-spy's).
    profile = args.profile if args.large_only else None
    daemon = start_daemon(env, log_path, profile)
    peak_pending_bytes = 0.0
    peak_rss_together = 0.0
    paused = False
    try:
        while True:
            rss = _status_mib(daemon.pid, "VmRSS") + sum(
                _status_mib(child, "VmRSS") for child in children_of(daemon.pid)
            )
            peak_rss_together = max(peak_rss_together, rss)
            try:
                metrics = scrape(metrics_port)
            except OSError:
                metrics = {}
            peak_pending_bytes = max(peak_pending_bytes, metrics.get("ingestd_pending_bytes", 0.0))
            paused |= metrics.get("ingestd_intake_paused", 0.0) == 1
            if metrics.get("ingestd_messages_accepted_total", 0.0) >= len(backlog):
                break
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("phase 3 did not finish within 30 minutes")
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        split = daemon_cpu_s(daemon.pid)
        pg_cpu = tree_cpu_s(pg_pid) - pg_cpu0
        daemon_peak = proc_peak_rss_mib(daemon.pid)
        workers_peak = sum(proc_peak_rss_mib(child) for child in children_of(daemon.pid))
    finally:
        daemon.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        daemon.wait(60)
    rows = asyncio.run(count_meter_rows(dsn, "L-%"))
    readings = len(backlog) * MAX_READINGS
    return {
        "messages": len(backlog),
        "payload_bytes": {"min": min(sizes), "max": max(sizes), "total": sum(sizes)},
        "readings_per_message": MAX_READINGS,
        "seconds_from_spawn": round(elapsed, 2),
        "messages_per_s": round(len(backlog) / elapsed, 1),
        "readings_per_s": round(readings / elapsed),
        "daemon_cpu_us_per_message_by_part": {
            name: round(seconds / len(backlog) * 1e6) for name, seconds in split.items()
        },
        "cores_used": {
            "ingestd": round(sum(split.values()) / elapsed, 2),
            "postgresql": round(pg_cpu / elapsed, 2),
        },
        "batch_messages_mean": round(
            metrics["ingestd_batch_size_sum"] / metrics["ingestd_batch_size_count"], 1
        ),
        "db_write_seconds_total": round(metrics["ingestd_db_write_seconds_sum"], 1),
        "daemon_peak_rss_mib": round(daemon_peak, 1),
        "verify_workers_peak_rss_mib": round(workers_peak, 1),
        "peak_rss_together_sampled_mib": round(peak_rss_together, 1),
        "peak_pending_bytes_sampled_mib": round(peak_pending_bytes / 2**20, 1),
        "intake_paused": paused,
        "settings": {k: v for k, v in env.items() if k.startswith("INGESTD_INGEST_")},
        "exactly_once": rows["readings"] == readings
        and rows["message_seqs"] == len(backlog)
        and rows["raw_messages"] == len(backlog)
        and rows["quarantine"] == 0,
        "rows": rows,
    }


# -- billing ------------------------------------------------------------------------------

BILLING_PERIOD = "2026-10"


async def generate_billing_fleet(dsn: str, meters: int, interval_s: int) -> dict[str, int]:
    """A month of readings for ``meters`` meters, with what a real month has: about one
    reading in 500 missing (half of them chased by a gap, some in a power outage), one in
    200 replayed from flash, a tamper event at one meter in 100. Generated by the database
    itself, one day at a time."""
    from ingestd.billing import parse_period  # noqa: PLC0415
    from ingestd.config import BillingConfig  # noqa: PLC0415

    period = parse_period(BILLING_PERIOD, BillingConfig())
    async with Store(DatabaseConfig(url=dsn, command_timeout_s=3600)) as store:
        await store.migrate()
        async with store.connection() as conn:
            await conn.execute(
                """INSERT INTO meters (meter_id, site, interval_s, registered_at, max_power_w)
                   SELECT format('BM-%s', lpad(i::text, 6, '0')),
                          format('BS-%s', lpad((i / 20)::text, 4, '0')), $2, $3, 23000
                   FROM generate_series(1, $1) AS i""",
                meters,
                interval_s,
                period.start - timedelta(days=60),
            )
            day = timedelta(days=1)
            t = period.start
            while t <= period.end:
                # seq = the interval's number since the period start (+1), so a hole is a
                # gap in seq too; registers grow by a meter-specific load.
                await conn.execute(
                    """INSERT INTO readings (meter_id, time, import_wh, export_wh, epoch, seq, received_at)
                       SELECT m.meter_id, ts,
                              1000000 + n * (50 + (hashtext(m.meter_id) & 255)), NULL, 0, n + 1,
                              ts + interval '5 seconds'
                       FROM meters m,
                            generate_series($1::timestamptz, LEAST($2::timestamptz, $4::timestamptz),
                                            make_interval(secs => $5)) AS ts,
                            LATERAL (SELECT (extract(epoch FROM ts - $3::timestamptz) / $5)::bigint AS n) x
                       WHERE hashtext(m.meter_id || ts::text) % 500 <> 0""",
                    t,
                    t + day - timedelta(seconds=1),
                    period.start,
                    period.end,
                    interval_s,
                )
                t += day
            # Half the holes are being chased (a requested gap over the missing seq).
            await conn.execute(
                """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, next_request_at)
                   SELECT m.meter_id, 0, x.n + 1, x.n + 1, 'requested', ts, ts + interval '1 hour'
                   FROM meters m,
                        generate_series($1::timestamptz, $2::timestamptz, make_interval(secs => $3)) AS ts,
                        LATERAL (SELECT (extract(epoch FROM ts - $1::timestamptz) / $3)::bigint AS n) x
                   WHERE hashtext(m.meter_id || ts::text) % 1000 = 0""",
                period.start,
                period.end,
                interval_s,
            )
            # Raw messages for the replayed readings only: the statement reads raw_messages
            # through its partial index on replayed messages, whatever else the table holds.
            await conn.execute(
                """INSERT INTO raw_messages
                       (meter_id, epoch, seq, received_at, sent, replay, kid, topic, payload)
                   SELECT meter_id, epoch, seq, received_at + interval '2 hours', received_at, true,
                          meter_id || '-k1', 'meters/' || meter_id || '/up', decode('00', 'hex')
                   FROM readings WHERE hashtext(meter_id || seq::text) % 200 = 0"""
            )
            await conn.execute(
                """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
                   SELECT meter_id, $1::timestamptz + (hashtext(meter_id) & 1023) * interval '30 minutes',
                          c.code, '{}', 0, 0, $1::timestamptz
                   FROM meters, (VALUES ('001'), ('003')) AS c(code)
                   WHERE hashtext(meter_id || c.code) % 100 = 0""",
                period.start,
            )
            await conn.execute(
                """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
                   SELECT meter_id, time + interval '40 minutes', '002', '{}', 0, 0, received_at
                   FROM events WHERE code = '001'"""
            )
            await conn.execute("VACUUM ANALYZE")
            counts = {
                t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                for t in ("meters", "readings", "raw_messages", "gaps", "events")
            }
    return counts


async def time_billing_report(dsn: str, runs: int) -> dict[str, Any]:
    from ingestd import billing  # noqa: PLC0415
    from ingestd.config import BillingConfig  # noqa: PLC0415

    period = billing.parse_period(BILLING_PERIOD, BillingConfig())
    as_of = period.end + timedelta(days=2)
    times: list[float] = []
    async with Store(DatabaseConfig(url=dsn, command_timeout_s=3600)) as store, store.connection() as conn:
        for _ in range(runs):
            t0 = time.monotonic()
            statements = await billing.compute_statements(
                conn, period, as_of=as_of, retention=timedelta(days=90)
            )
            csv = billing.csv_rows(billing.by_urgency(statements))
            times.append(time.monotonic() - t0)
        site = statements[0].site
        assert site is not None
        t0 = time.monotonic()
        await billing.compute_statements(conn, period, as_of=as_of, retention=timedelta(days=90), site=site)
        one_site = time.monotonic() - t0
    totals = billing.totals(statements)
    return {
        "statements": len(statements),
        "by_status": totals.by_status,
        "completeness_pct": round(totals.completeness, 3),
        "csv_bytes": len(csv),
        "report_seconds": round(sorted(times)[len(times) // 2], 2),
        "report_seconds_runs": [round(t, 2) for t in times],
        "one_site_seconds": round(one_site, 3),
    }


def bench_billing(work: Path, meters: int, interval_s: int, runs: int) -> dict[str, Any]:
    # A server of its own, sized as a small production database would be; the query is
    # read-only, so the generation may skip fsync (the test servers' default).
    settings = {"shared_buffers": "'1GB'", "work_mem": "'64MB'", "max_wal_size": "'4GB'"}
    with PostgresServer(work / "pg-billing", settings=settings) as pg:
        dsn = pg.create_database("billing")
        print(f"billing: generating {meters} meters with a month of {interval_s}-s readings ...", flush=True)
        t0 = time.monotonic()
        rows = asyncio.run(generate_billing_fleet(dsn, meters, interval_s))
        generated = time.monotonic() - t0
        print(f"billing: {rows} in {generated:.0f} s; timing the report ...", flush=True)
        timing = asyncio.run(time_billing_report(dsn, runs))
    result = {
        "meters": meters,
        "interval_s": interval_s,
        "rows": rows,
        "generate_seconds": round(generated),
        **timing,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    args = parse_args()
    if args.only == "storm":
        return storm_main(args)
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    if args.only == "billing":
        billing_only = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "billing": bench_billing(work, args.billing_meters, args.billing_interval, args.billing_runs),
        }
        write_results(args.out, billing_only, "billing")
        print_table(billing_only)
        return 0
    if args.only == "fleet":
        fleet = run_fleet(args, work)
        write_results(
            args.out, {"date": datetime.now(UTC).isoformat(timespec="seconds"), "fleet": fleet}, "fleet"
        )
        print_fleet(fleet)
        return 0 if fleet["drain"]["disconnects"] == 0 else 1
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "params": {
            "meters": args.meters,
            "messages": args.messages,
            "repeat": args.repeat,
            "rate": args.rate,
            "seconds": args.seconds,
            "large": args.large,
            "large_meters": args.large_meters,
            "large_only": args.large_only,
        },
    }
    if args.only == "audit":
        return main_audit_only(args, work, results)
    # Durable as in production: every commit is flushed to disk (the test fixtures turn
    # fsync off, which would flatter the figures).
    durable = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    with PostgresServer(work / "pg", settings=durable) as pg, MosquittoServer(work / "mqtt") as broker:
        dsn = pg.create_database("bench")
        print(f"making {args.meters} ES256 meters ...", flush=True)
        signers = [
            Signer("ES256", f"B-{i:06d}-k1", generate_private_key("ES256")) for i in range(args.meters)
        ]
        asyncio.run(setup_db(dsn, signers))
        per_meter = -(-args.messages // args.meters)
        metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")} | {
            "INGESTD_DATABASE_URL": dsn,
            "INGESTD_MQTT_URL": broker.url,
            "INGESTD_MQTT_CLIENT_ID": "ingestd-bench",
            "INGESTD_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "INGESTD_LOG_FORMAT": "json",
            "INGESTD_LOG_LEVEL": "warning",
            # BENCH_INGESTD_X=v sets INGESTD_X=v for the daemon (to compare settings).
            **{k.removeprefix("BENCH_"): v for k, v in os.environ.items() if k.startswith("BENCH_INGESTD_")},
        }
        log_path = work / "ingestd.log"
        # Create ingestd's persistent session, then stop it: the backlog queues for it.
        spawned = time.monotonic()
        daemon = start_daemon(env, log_path)
        wait_metric(metrics_port, "ingestd_mqtt_connected", 1, timeout=60)
        startup = time.monotonic() - spawned
        publisher = FastPublisher("127.0.0.1", broker.port, "bench-publisher")
        assert broker._proc is not None  # noqa: SLF001 - the bench measures the broker's CPU
        broker_pid, pg_pid = broker._proc.pid, pg._postmaster_pid()  # noqa: SLF001
        assert pg_pid is not None

        published = 0
        if not args.large_only:
            runs: list[dict[str, Any]] = []
            for run in range(args.repeat):
                daemon.terminate()
                daemon.wait(60)
                backlog = presign(signers, 1 + run * per_meter, args.messages, sent=None)
                print(
                    f"phase 1, run {run + 1}: queueing {len(backlog)} messages at the broker ...", flush=True
                )
                publisher.publish(backlog)
                published += len(backlog)
                publisher.wait_acked(published, timeout=600)
                others0 = (proc_cpu_s(broker_pid), tree_cpu_s(pg_pid))
                # The broker pushes the backlog the moment ingestd connects: time from spawn.
                t0 = time.monotonic()
                last = run == args.repeat - 1
                daemon = start_daemon(env, log_path, args.profile if last else None)
                metrics = wait_metric(metrics_port, "ingestd_messages_accepted_total", len(backlog))
                elapsed = time.monotonic() - t0
                disconnects = metrics.get("ingestd_mqtt_disconnects_total", 0.0)
                received = metrics.get("ingestd_messages_received_total", 0.0)
                split = daemon_cpu_s(daemon.pid)
                cpu = sum(split.values())
                broker_cpu = proc_cpu_s(broker_pid) - others0[0]
                pg_cpu = tree_cpu_s(pg_pid) - others0[1]
                runs.append(
                    {
                        "messages": len(backlog),
                        "seconds_from_spawn": round(elapsed, 2),
                        "messages_per_s": round(len(backlog) / max(elapsed - startup, 1e-9)),
                        "messages_per_s_including_startup": round(len(backlog) / elapsed),
                        "daemon_cpu_us_per_message": round(cpu / len(backlog) * 1e6, 1),
                        "daemon_cpu_us_per_message_by_part": {
                            name: round(seconds / len(backlog) * 1e6, 1) for name, seconds in split.items()
                        },
                        "cores_used": {
                            "ingestd": round(cpu / elapsed, 2),
                            "mosquitto": round(broker_cpu / elapsed, 2),
                            "postgresql": round(pg_cpu / elapsed, 2),
                        },
                        "db_write_p50_ms": round(
                            histogram_quantile(0.5, metrics, "ingestd_db_write_seconds") * 1000, 1
                        ),
                        "db_write_p99_ms": round(
                            histogram_quantile(0.99, metrics, "ingestd_db_write_seconds") * 1000, 1
                        ),
                        # A busy host can fall behind the broker: say so, with what it cost.
                        "disconnects": int(disconnects),
                        "duplicates_received": int(received) - len(backlog),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
            rows = asyncio.run(count_rows(dsn))
            rates = sorted(r["messages_per_s"] for r in runs)
            median = runs[[r["messages_per_s"] for r in runs].index(rates[len(rates) // 2])]
            results["throughput"] = {
                **median,
                "startup_seconds": round(startup, 2),
                "messages_per_s_runs": [r["messages_per_s"] for r in runs],
                "runs": runs,
                "exactly_once": rows["readings"] == published
                and rows["message_seqs"] == published
                and rows["raw_messages"] == published
                and rows["quarantine"] == 0,
                "rows": rows,
            }
            backlog_total = published

            print(f"phase 2: {args.rate} messages/s for {args.seconds} s ...", flush=True)
            before = scrape(metrics_port)
            total = args.rate * args.seconds
            step = 0.01
            per_step = max(1, round(args.rate * step))
            next_seq = args.repeat * per_meter + 2
            t_start = time.monotonic()
            published = 0
            seq_block = 0
            while published < total:
                chunk = min(per_step, total - published)
                # Signed just in time, so `sent` is the publish time (ES256 signing is ~50 us).
                batch = presign(signers, next_seq + seq_block, chunk, sent=None)
                seq_block += -(-chunk // len(signers))
                publisher.publish(batch)
                published += chunk
                ahead = t_start + published / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            publisher.wait_acked(backlog_total + total, timeout=600)
            achieved = total / (time.monotonic() - t_start)
            metrics = wait_metric(metrics_port, "ingestd_messages_received_total", len(backlog) + total)
            metrics = wait_metric(metrics_port, "ingestd_messages_accepted_total", len(backlog) + total)
            peak_rss = proc_peak_rss_mib(daemon.pid)
            workers_rss = sum(proc_peak_rss_mib(child) for child in children_of(daemon.pid))
            rows = asyncio.run(count_rows(dsn))
            # Phase 1's messages waited in the backlog: count only what phase 2 added.
            delta = {k: v - before.get(k, 0.0) for k, v in metrics.items()}
            name = "ingestd_sent_to_commit_seconds"
            results["latency"] = {
                "target_rate": args.rate,
                "achieved_publish_rate": round(achieved),
                "sent_to_commit_p50_ms": round(histogram_quantile(0.5, delta, name) * 1000, 1),
                "sent_to_commit_p99_ms": round(histogram_quantile(0.99, delta, name) * 1000, 1),
            }
            results["memory"] = {
                "daemon_peak_rss_mib": round(peak_rss, 1),
                "verify_workers_peak_rss_mib": round(workers_rss, 1),
            }
            results["exactly_once_all"] = (
                rows["readings"] == backlog_total + total and rows["message_seqs"] == backlog_total + total
            )
            # py-spy writes its profile on SIGINT; the daemon shuts down cleanly on either.
            daemon.send_signal(signal.SIGINT if args.profile else signal.SIGTERM)
            daemon.wait(60)
            results["audit"] = bench_audit(dsn, backlog_total + total)
        else:
            daemon.terminate()
            daemon.wait(60)
        if args.large:
            results["large_messages"] = drain_large(
                args, dsn, env, log_path, metrics_port, publisher, pg_pid, published_before=publisher.acked
            )
            print(json.dumps(results["large_messages"]), flush=True)
        publisher.close()

    if not args.no_billing and not args.large_only:
        results["billing"] = bench_billing(
            work, args.billing_meters, args.billing_interval, args.billing_runs
        )
    if not args.no_fleet and not args.large_only:
        results["fleet"] = run_fleet(args, work)
    # A partial run is kept beside the full ones, never as latest.json.
    write_results(args.out, results, "bench-large-only" if args.large_only else "bench")
    print_table(results)
    if "fleet" in results:
        print_fleet(results["fleet"])
    ok = [results["large_messages"]["exactly_once"]] if args.large else []
    if not args.large_only:
        ok += [results["throughput"]["exactly_once"], results["exactly_once_all"], results["audit"]["clean"]]
    return 0 if all(ok) else 1


def write_results(out: Path, results: dict[str, Any], name: str) -> None:
    """``{name}-{date}.json``, and ``latest.json`` for a full run (a section alone is no
    replacement for it)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    if name == "bench":
        (out / "latest.json").write_text(text + "\n")
    stamp = results["date"].replace(":", "").replace("-", "")[:15]
    (out / f"{name}-{stamp}.json").write_text(text + "\n")


# -- fleet scale: provisioning, start-up, health reads and a backlog at 100,000 meters ------

FLEET_SMALL = 1000
# Meters that talk in the drain (their keys are the ones the daemon loads, on demand).
FLEET_TALKING = 1000


def fleet_csv(path: Path, meters: int, pems: list[str]) -> None:
    """A `meter import` file: ``meters`` ES256 meters over sites of 100, one key each
    (the public keys are reused round-robin: a key may serve several kids)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("meter_id", "site", "interval_s", "alg", "kid", "public_key"))
        for i in range(meters):
            writer.writerow(
                (f"F-{i:06d}", f"S-{i // 100:04d}", 900, "ES256", f"F-{i:06d}-k1", pems[i % len(pems)])
            )


def timed_cli(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    return time.monotonic() - t0, proc


# A week of history, set-based: meter_epochs for every meter heard from (94% within the hour,
# 3% gray, 1% red, 2% never heard), `readings_per_day` readings a meter a day, one event a
# meter a day (clock adjusted), a tamper event for 1% of the meters and an open gap for 2%.
_FLEET_HISTORY: tuple[str, ...] = (
    """INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
       SELECT meter_id, 0, 672, now() - interval '7 days',
              now() - CASE WHEN n % 100 < 94 THEN interval '10 minutes'
                           WHEN n % 100 < 97 THEN interval '3 days' ELSE interval '9 days' END
       FROM (SELECT meter_id, row_number() OVER (ORDER BY meter_id) AS n FROM meters) m
       WHERE n % 100 < 98""",
    """INSERT INTO readings (meter_id, time, import_wh, export_wh, epoch, seq, received_at)
       SELECT m.meter_id, t, 1000 + k, NULL, 0, k, t
       FROM meters m, generate_series(1, 7 * $1::integer) AS k,
            LATERAL (SELECT now() - interval '7 days' + k * interval '1 day' / $1::integer AS t) s""",
    """INSERT INTO events (meter_id, time, code, epoch, seq, idx, received_at)
       SELECT m.meter_id, now() - d * interval '1 day', '009', 0, d, 0, now() - d * interval '1 day'
       FROM meters m, generate_series(1, 7) AS d""",
    """INSERT INTO events (meter_id, time, code, epoch, seq, idx, received_at)
       SELECT meter_id, now() - interval '2 days', '003', 0, 100, 0, now() - interval '2 days'
       FROM (SELECT meter_id, row_number() OVER (ORDER BY meter_id) AS n FROM meters) m WHERE n % 100 = 50""",
    """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, next_request_at)
       SELECT meter_id, 0, 10, 12, 'open', now() - interval '1 day', now() + interval '1 hour'
       FROM (SELECT meter_id, row_number() OVER (ORDER BY meter_id) AS n FROM meters) m WHERE n % 50 = 25""",
    "ANALYZE",
)


async def fleet_history(dsn: str, readings_per_day: int) -> float:
    t0 = time.monotonic()
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    try:
        for statement in _FLEET_HISTORY:
            await (
                conn.execute(statement, readings_per_day) if "$1" in statement else conn.execute(statement)
            )
    finally:
        await conn.close()
    return time.monotonic() - t0


async def fleet_health_reads(dsn: str, repeat: int = 5) -> dict[str, Any]:
    """The flag refresh (the counts per flag, then the meters that need attention, as
    `ingestd status` reads them), in process: medians of ``repeat`` rounds after a warm-up."""
    flags = FlagsConfig()
    conn = await asyncpg.connect(dsn)
    try:
        counts_s, attention_s, listed = [], [], 0
        for _ in range(repeat + 1):
            as_of = await conn.fetchval("SELECT now()")
            t0 = time.perf_counter()
            counts = await health.flag_counts(conn, as_of, flags)
            t1 = time.perf_counter()
            listed = len(await health.fetch_health(conn, as_of, flags, attention=True))
            counts_s.append(t1 - t0)
            attention_s.append(time.perf_counter() - t1)
    finally:
        await conn.close()
    return {
        "flag_counts_ms": round(statistics.median(counts_s[1:]) * 1000, 1),
        "attention_ms": round(statistics.median(attention_s[1:]) * 1000, 1),
        "flag_refresh_ms": round(
            statistics.median(a + b for a, b in zip(counts_s[1:], attention_s[1:], strict=True)) * 1000, 1
        ),
        "meters_needing_attention": listed,
        "flag_counts": counts,
    }


def fleet_daemon_start(
    env: dict[str, str], port: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], float]:
    spawned = time.monotonic()
    daemon = start_daemon(env, log_path)
    wait_metric(port, "ingestd_mqtt_connected", 1, timeout=600)
    return daemon, time.monotonic() - spawned


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fleet_size(
    label: str, meters: int, pg: PostgresServer, broker: MosquittoServer, work: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, str], int]:
    """Import, history, start-up and RSS, status and the flag refresh, at one fleet size;
    returns the figures, the daemon's environment and its metrics port."""
    dsn = pg.create_database(f"fleet_{label}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")} | {
        "INGESTD_DATABASE_URL": dsn,
        "INGESTD_MQTT_URL": broker.url,
        "INGESTD_MQTT_CLIENT_ID": f"ingestd-fleet-{label}",
        "INGESTD_METRICS_ADDR": f"127.0.0.1:{port}",
        "INGESTD_LOG_FORMAT": "json",
        "INGESTD_LOG_LEVEL": "warning",
    }
    out: dict[str, Any] = {"meters": meters}
    _, proc = timed_cli(env, "migrate")
    assert proc.returncode == 0, proc.stderr
    path = work / f"fleet-{label}.csv"
    fleet_csv(path, meters, args.fleet_pems)
    seconds, proc = timed_cli(env, "meter", "import", str(path))
    assert proc.returncode == 0, proc.stderr
    out["import_seconds"] = round(seconds, 2)
    out["import_meters_per_s"] = round(meters / seconds)
    print(f"fleet {label}: imported {meters:,} meters in {seconds:.1f} s", flush=True)
    out["history_seconds"] = round(asyncio.run(fleet_history(dsn, args.fleet_readings_per_day)), 1)
    out |= asyncio.run(fleet_health_reads(dsn))
    times = []
    for _ in range(3):
        seconds, proc = timed_cli(env, "status")
        # Exit 1: some meters are red, as the history made them.
        assert proc.returncode in {0, 1}, proc.stderr
        times.append(seconds)
    out["status_cli_seconds"] = round(statistics.median(times), 2)
    daemon, startup = fleet_daemon_start(env, port, work / f"fleet-{label}.log")
    out["startup_seconds"] = round(startup, 2)
    out["rss_at_ready_mib"] = round(proc_rss_mib(daemon.pid), 1)
    # After the first flag refresh and key look-ups have run.
    time.sleep(args.fleet_settle_s)
    out["rss_settled_mib"] = round(proc_rss_mib(daemon.pid), 1)
    out["verify_workers_rss_mib"] = round(sum(proc_rss_mib(c) for c in children_of(daemon.pid)), 1)
    daemon.terminate()
    daemon.wait(60)
    print(f"fleet {label}: {json.dumps(out)}", flush=True)
    return out, env, port


def fleet_drain(
    env: dict[str, str],
    port: int,
    broker: MosquittoServer,
    signers: list[Signer],
    backlog: int,
    log_path: Path,
) -> dict[str, Any]:
    """A backlog several times ingest.max_pending, queued for the (stopped) daemon's session
    and drained with the default settings: the rate, the disconnects, the duplicates."""
    messages = presign(signers, 1, backlog, sent=None)
    publisher = FastPublisher("127.0.0.1", broker.port, "bench-fleet-publisher")
    try:
        publisher.publish(messages)
        publisher.wait_acked(len(messages), timeout=600)
    finally:
        publisher.close()
    t0 = time.monotonic()
    daemon = start_daemon(env, log_path)
    try:
        metrics = wait_metric(port, "ingestd_messages_accepted_total", len(messages), timeout=1800)
        elapsed = time.monotonic() - t0
        # Anything redelivered after a disconnect arrives late: give it a moment to show.
        time.sleep(2)
        metrics = scrape(port)
        # Against the settled RSS at start-up (no key loaded): what the talking meters cost.
        rss = proc_rss_mib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
    received = metrics.get("ingestd_messages_received_total", 0.0)
    return {
        "backlog": len(messages),
        "meters_talking": len(signers),
        "seconds_from_spawn": round(elapsed, 1),
        "messages_per_s_including_startup": round(len(messages) / elapsed),
        "disconnects": int(metrics.get("ingestd_mqtt_disconnects_total", 0.0)),
        "received": int(received),
        "duplicates_received": int(received) - len(messages),
        "rss_after_drain_mib": round(rss, 1),
    }


def run_fleet(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    print(f"fleet: making {FLEET_TALKING} ES256 keys ...", flush=True)
    privates = [generate_private_key("ES256") for _ in range(FLEET_TALKING)]
    args.fleet_pems = [public_key_pem(k.public_key()).decode() for k in privates]
    durable = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0]}
    with (
        PostgresServer(work / "fleet-pg", settings=durable) as pg,
        MosquittoServer(work / "fleet-mqtt") as broker,
    ):
        small, _, _ = fleet_size("small", FLEET_SMALL, pg, broker, work, args)
        large, env, port = fleet_size("large", args.fleet_meters, pg, broker, work, args)
        results["sizes"] = {str(FLEET_SMALL): small, str(args.fleet_meters): large}
        results["ratios_large_to_small"] = {
            name: round(large[name] / max(small[name], 1e-9), 2)
            for name in (
                "import_seconds",
                "startup_seconds",
                "rss_settled_mib",
                "flag_counts_ms",
                "attention_ms",
                "flag_refresh_ms",
                "status_cli_seconds",
            )
        }
        results["meters_ratio"] = args.fleet_meters / FLEET_SMALL
        # The large fleet's daemon made its persistent session at start-up: the backlog
        # queues for it. The talking meters are F-000000.., whose keys are `privates`.
        signers = [Signer("ES256", f"F-{i:06d}-k1", key) for i, key in enumerate(privates)]
        print(f"fleet: draining a backlog of {args.fleet_backlog:,} ...", flush=True)
        results["drain"] = fleet_drain(
            env, port, broker, signers, args.fleet_backlog, work / "fleet-drain.log"
        )
    print(json.dumps(results["drain"]), flush=True)
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = []
    if "throughput" in results:
        rows += small_rows(results)
    large = results.get("large_messages")
    if large is not None:
        rows += [
            (
                "max-size backlog drain (1,000 readings, 64 KiB each)",
                f"{large['messages_per_s']:,} msg/s, {large['readings_per_s']:,} readings/s",
            ),
            (
                "  peak RSS: daemon, workers added up",
                f"{large['daemon_peak_rss_mib']} MiB, {large['verify_workers_peak_rss_mib']} MiB",
            ),
            (
                "  peak pending bytes (sampled), paused",
                f"{large['peak_pending_bytes_sampled_mib']} MiB, {large['intake_paused']}",
            ),
            ("  every message stored exactly once", str(large["exactly_once"])),
        ]
    if "billing" in results:
        b = results["billing"]
        rows += [
            (
                "billing report, whole fleet",
                f"{b['report_seconds']} s (median; runs {', '.join(map(str, b['report_seconds_runs']))})",
            ),
            ("  meters, readings", f"{b['rows']['meters']:,}, {b['rows']['readings']:,}"),
            ("  one site", f"{b['one_site_seconds']} s"),
        ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if "throughput" in results and any(r["disconnects"] for r in results["throughput"]["runs"]):
        print("WARNING: ingestd was disconnected from the broker while draining: these rates are not its own")


def small_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    t, lat, mem = results["throughput"], results["latency"], results["memory"]
    return [
        ("throughput (backlog drain, ack after commit)", f"{t['messages_per_s']:,} msg/s (median)"),
        ("  each run", ", ".join(f"{rate:,}" for rate in t["messages_per_s_runs"]) + " msg/s"),
        ("  including start-up (median run)", f"{t['messages_per_s_including_startup']:,} msg/s"),
        ("daemon CPU per message (median run)", f"{t['daemon_cpu_us_per_message']} us"),
        (
            "sent-to-commit p50 at live rate",
            f"{lat['sent_to_commit_p50_ms']} ms @ {lat['achieved_publish_rate']:,} msg/s",
        ),
        ("sent-to-commit p99 at live rate", f"{lat['sent_to_commit_p99_ms']} ms"),
        ("daemon peak RSS", f"{mem['daemon_peak_rss_mib']} MiB"),
        ("verification workers' peak RSS, added up", f"{mem['verify_workers_peak_rss_mib']} MiB"),
        ("every message stored exactly once", str(t["exactly_once"] and results["exactly_once_all"])),
        (
            "audit verify (every signature and row checked again)",
            f"{results['audit']['messages_per_s']:,} msg/s over {results['audit']['messages']:,} messages",
        ),
        ("broker disconnects while draining, each run", ", ".join(str(r["disconnects"]) for r in t["runs"])),
        ("duplicates received, each run", ", ".join(str(r["duplicates_received"]) for r in t["runs"])),
    ]


def print_fleet(fleet: dict[str, Any]) -> None:
    sizes = list(fleet["sizes"])
    small, large = fleet["sizes"][sizes[0]], fleet["sizes"][sizes[1]]
    ratio = fleet["ratios_large_to_small"]
    rows = [
        ("fleet", f"{int(sizes[0]):,} meters", f"{int(sizes[1]):,} meters", "ratio"),
        ("meter import, s", small["import_seconds"], large["import_seconds"], ratio["import_seconds"]),
        ("meter import, meters/s", small["import_meters_per_s"], large["import_meters_per_s"], ""),
        ("daemon start-up, s", small["startup_seconds"], large["startup_seconds"], ratio["startup_seconds"]),
        (
            "daemon RSS settled, MiB",
            small["rss_settled_mib"],
            large["rss_settled_mib"],
            ratio["rss_settled_mib"],
        ),
        ("  flag counts, ms", small["flag_counts_ms"], large["flag_counts_ms"], ratio["flag_counts_ms"]),
        (
            "  meters needing attention, ms",
            small["attention_ms"],
            large["attention_ms"],
            ratio["attention_ms"],
        ),
        ("flag refresh, ms", small["flag_refresh_ms"], large["flag_refresh_ms"], ratio["flag_refresh_ms"]),
        (
            "ingestd status, s",
            small["status_cli_seconds"],
            large["status_cli_seconds"],
            ratio["status_cli_seconds"],
        ),
    ]
    for row in rows:
        print(f"{row[0]:<32}{row[1]!s:>14}{row[2]!s:>18}{row[3]!s:>8}")
    d = fleet["drain"]
    print(
        f"backlog drain at {int(sizes[1]):,} meters: {d['backlog']:,} messages, "
        f"{d['messages_per_s_including_startup']:,} msg/s from spawn, {d['disconnects']} disconnects, "
        f"{d['duplicates_received']} duplicates received"
    )
    if d["disconnects"]:
        print("WARNING: disconnects while draining the fleet backlog")


# -- the storm section (`--only storm`): live data during a backfill storm -----------------

STORM_PREFIX = "STORM-"
LIVE_PREFIX = "LIVE-"
# What admission control is compared with: no cap, and no pause however full the pipeline.
NO_ADMISSION = {"INGESTD_GAPS_MAX_OUTSTANDING_SEQS": "100000000", "INGESTD_GAPS_PAUSE_AT_PENDING_SHARE": "1"}

# The bench's own instrument, in the bench's database only: a NOTIFY per stored live
# message, delivered when its transaction commits, so sent-to-commit is measured for live
# messages alone (the daemon's histogram mixes in the replayed ones).
LIVE_COMMIT_TRIGGER = f"""
CREATE FUNCTION bench_live_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_live', NEW.meter_id || ' ' || NEW.epoch || ' ' || NEW.seq);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_live_commit AFTER INSERT ON message_seqs FOR EACH ROW
    WHEN (NEW.meter_id LIKE '{LIVE_PREFIX}%') EXECUTE FUNCTION bench_live_commit();
"""


# The storm's gaps (one epoch of the replaying meters): how many were chased, how many are
# not filled yet.
STORM_GAPS = """
SELECT count(*) AS chased, count(*) FILTER (WHERE status IN ('open', 'requested')) AS active
FROM gaps WHERE meter_id LIKE $1 AND epoch = $2
"""


def add_storm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storm section (--only storm)")
    group.add_argument("--storm-live", type=int, default=500, help="live meters (default 500)")
    group.add_argument(
        "--storm-live-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between a live meter's messages (default 2: enough samples for a p99)",
    )
    group.add_argument("--storm-meters", type=int, default=2000, help="meters replaying (default 2000)")
    group.add_argument("--storm-messages", type=int, default=100, help="messages each replays (default 100)")
    group.add_argument("--storm-quiet-s", type=float, default=30.0, help="quiet phase, seconds (default 30)")
    group.add_argument(
        "--storm-caps",
        type=lambda text: [int(v) for v in text.split(",") if v],
        default=[500],
        metavar="N,N",
        help="also run with these gaps.max_outstanding_seqs (default 500)",
    )
    group.add_argument(
        "--storm-max-s", type=float, default=600.0, help="give up on a storm after this long (default 600)"
    )


def _quiet_mqtt_logger() -> logging.Logger:
    """aiomqtt warns of every publish past its tenth in flight: here, hundreds are the point."""
    logger = logging.getLogger("bench.mqtt")
    logger.setLevel(logging.ERROR)
    return logger


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _storm_meters_process(
    pipe: Connection, fleet: list[VirtualMeter], broker: tuple[str, int], headend: HeadendKey
) -> None:
    """The replaying meters, in a process of their own (as they are on their own devices):
    on "storm" each publishes its newest message of a new batch of ``count`` (the rest are
    in flash: a gap), and every replay request is answered from flash, each meter on its own."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with aiomqtt.Client(
            broker[0],
            broker[1],
            identifier="bench-storm-meters",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=1000,
            logger=_quiet_mqtt_logger(),
        ) as client:
            meters = Fleet(client, fleet, topic_prefix=PREFIX, headend=headend)
            answering: set[asyncio.Task[None]] = set()

            async def answer(meter: VirtualMeter, request: dict[str, Any]) -> None:
                for body in meter.answer_replay(request, datetime.now(UTC)):
                    await meters.send(meter, body)

            async def serve() -> None:
                await client.subscribe(f"{PREFIX}/+/down/replay", qos=1)
                async for message in client.messages:
                    meter = meters.meters.get(str(message.topic).split("/")[1])
                    if meter is None or not isinstance(message.payload, bytes):
                        continue
                    request = check_request(meters.headend, meter, message.payload, datetime.now(UTC))
                    if not isinstance(request, dict):
                        meters.stats.stale_requests += 1
                        continue
                    meters.stats.requests += 1
                    task = asyncio.create_task(answer(meter, request))
                    answering.add(task)
                    task.add_done_callback(answering.discard)

            serving = asyncio.create_task(serve())
            while True:
                command, arg = await loop.run_in_executor(None, pipe.recv)
                if command == "storm":
                    rng = random.Random(1)
                    newest = []
                    for meter in fleet:
                        if meter.seq:
                            meter.reset_epoch()
                        now = datetime.now(UTC)
                        for _ in range(arg):
                            body = meter.next_body(now, rng)
                        newest.append((meter, body))
                    for meter, body in newest:
                        await meters.send(meter, body)
                    pipe.send(len(newest))
                elif command == "stats":
                    s = meters.stats
                    pipe.send({"requests": s.requests, "replayed": s.replayed, "refused": s.stale_requests})
                    meters.stats = FleetStats()  # each storm counted on its own
                else:
                    serving.cancel()
                    pipe.send(None)
                    return

    asyncio.run(main())


async def _storm_run(
    *,
    args: argparse.Namespace,
    dsn: str,
    env: dict[str, str],
    log_path: Path,
    metrics_port: int,
    live: Fleet,
    pipe: Connection,
    label: str,
    epoch: int,
) -> dict[str, Any]:
    """One quiet phase and one storm with the daemon started on ``env``: live sent-to-commit
    in each, and how the storm went."""
    samples: list[tuple[datetime, float]] = []

    def committed(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        at = datetime.now(UTC)
        meter_id, meter_epoch, seq = str(payload).split()
        created = live.meters[meter_id].flash.get((int(meter_epoch), int(seq)))
        if created is not None:
            samples.append((created[0], (at - created[0]).total_seconds()))

    listener = await asyncpg.connect(dsn)
    await listener.add_listener("bench_live", committed)
    daemon = start_daemon(env, log_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Once the daemon's session exists: a live message sent before would be lost, a gap.
    await loop.run_in_executor(None, wait_metric, metrics_port, "ingestd_mqtt_connected", 1, 60)
    ticking = asyncio.create_task(
        live.run(count=0, interval_s=args.storm_live_interval, event_rate=0.0, stop=stop)
    )
    try:
        # Settle: what was queued while the daemon was down, and its first rounds.
        await asyncio.sleep(5)
        quiet_from = datetime.now(UTC)
        await asyncio.sleep(args.storm_quiet_s)
        storm_from = datetime.now(UTC)
        before = await loop.run_in_executor(None, scrape, metrics_port)
        conn = await asyncpg.connect(dsn)
        try:
            pipe.send(("storm", args.storm_messages + 1))
            await loop.run_in_executor(None, pipe.recv)
            started = time.monotonic()
            while True:
                await asyncio.sleep(1)
                row = await conn.fetchrow(STORM_GAPS, STORM_PREFIX + "%", epoch)
                assert row is not None
                chased, active = row["chased"], row["active"]
                if (chased >= args.storm_meters and active == 0) or (
                    time.monotonic() - started > args.storm_max_s
                ):
                    break
            storm_s = time.monotonic() - started
            storm_to = datetime.now(UTC)
        finally:
            await conn.close()
        # The live messages sent until the end of the storm have time to be committed.
        await asyncio.sleep(5)
        after = await loop.run_in_executor(None, scrape, metrics_port)
    finally:
        stop.set()
        await ticking
        daemon.terminate()
        await loop.run_in_executor(None, daemon.wait, 60)
        await listener.close()
    pipe.send(("stats", None))
    meters_side = await loop.run_in_executor(None, pipe.recv)
    quiet = [lat for sent, lat in samples if quiet_from <= sent < storm_from]
    storm = [lat for sent, lat in samples if storm_from <= sent < storm_to]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    result = {
        "admission_control": label,
        "quiet_live_messages": len(quiet),
        "quiet_p50_ms": round(_percentile(quiet, 0.5) * 1000, 1),
        "quiet_p99_ms": round(_percentile(quiet, 0.99) * 1000, 1),
        "storm_live_messages": len(storm),
        "storm_p50_ms": round(_percentile(storm, 0.5) * 1000, 1),
        "storm_p99_ms": round(_percentile(storm, 0.99) * 1000, 1),
        "storm_seconds": round(storm_s, 1),
        "storm_gaps_left": active,
        "replay_requests": int(delta("ingestd_replay_requests_total")),
        "requests_answered": meters_side["requests"],
        "requests_refused_by_meters": meters_side["refused"],
        "replayed_messages": meters_side["replayed"],
        "duplicates_received": int(delta("ingestd_messages_duplicate_total")),
        "held_back_rounds": {
            reason: int(delta(f'ingestd_replay_held_back_total{{reason="{reason}"}}'))
            for reason in ("pending", "outstanding")
        },
        "mqtt_disconnects": int(delta("ingestd_mqtt_disconnects_total")),
    }
    result["storm_p99_over_quiet"] = round(result["storm_p99_ms"] / max(result["quiet_p99_ms"], 1e-9), 2)
    print(json.dumps(result), flush=True)
    return result


def storm_main(args: argparse.Namespace) -> int:
    """Live sent-to-commit with and without admission control during a backfill storm."""
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-storm-"))
    load = os.getloadavg()[0]
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_at_start": round(load, 2)},
        "params": {
            "live_meters": args.storm_live,
            "live_interval_s": args.storm_live_interval,
            "storm_meters": args.storm_meters,
            "storm_messages_each": args.storm_messages,
            "quiet_s": args.storm_quiet_s,
            "caps": args.storm_caps,
        },
    }
    print(f"making {args.storm_live} live and {args.storm_meters} replaying ES256 meters ...", flush=True)
    keys = KeyFactory()
    live_fleet = build_fleet(args.storm_live, prefix=LIVE_PREFIX, algs=("ES256",), keys=keys)
    storm_fleet = build_fleet(args.storm_meters, prefix=STORM_PREFIX, algs=("ES256",), keys=keys)
    headend = Signer("ES256", "bench-headend", generate_private_key("ES256"))
    key_file = work / "headend.pem"
    key_file.write_bytes(private_key_pem(headend.key))
    durable = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    with PostgresServer(work / "pg", settings=durable) as pg, MosquittoServer(work / "mqtt") as broker:
        dsn = pg.create_database("bench")
        metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")} | {
            "INGESTD_DATABASE_URL": dsn,
            "INGESTD_MQTT_URL": broker.url,
            "INGESTD_MQTT_CLIENT_ID": "ingestd-bench",
            "INGESTD_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "INGESTD_LOG_FORMAT": "json",
            "INGESTD_LOG_LEVEL": "warning",
            "INGESTD_HEADEND_KEY_FILE": str(key_file),
            "INGESTD_HEADEND_KID": headend.kid,
            # Gaps acted on at once: the storm starts when the meters reappear.
            "INGESTD_GAPS_GRACE_S": "2",
            **{k.removeprefix("BENCH_"): v for k, v in os.environ.items() if k.startswith("BENCH_INGESTD_")},
        }
        # Forked before this process runs an event loop, with the fleet in hand.
        pipe, child_pipe = multiprocessing.get_context("fork").Pipe()
        meters_process = multiprocessing.get_context("fork").Process(
            target=_storm_meters_process,
            args=(
                child_pipe,
                storm_fleet,
                (broker.host, broker.port),
                HeadendKey(headend.kid, "ES256", headend.key.public_key()),
            ),
            daemon=True,
        )
        meters_process.start()

        async def run_all() -> None:
            async with Store(DatabaseConfig(url=dsn)) as store:
                await store.migrate()
                print("registering the meters ...", flush=True)
                await register_fleet(store, [*live_fleet, *storm_fleet])
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(LIVE_COMMIT_TRIGGER)
            finally:
                await conn.close()
            async with aiomqtt.Client(
                broker.host,
                broker.port,
                identifier="bench-live-meters",
                protocol=aiomqtt.ProtocolVersion.V5,
                max_inflight_messages=1000,
                logger=_quiet_mqtt_logger(),
            ) as client:
                live = Fleet(client, live_fleet, topic_prefix=PREFIX, headend=None)
                runs = []
                variants: list[tuple[str, dict[str, str]]] = [
                    ("on (defaults)", {}),
                    *(
                        (f"on, cap {cap}", {"INGESTD_GAPS_MAX_OUTSTANDING_SEQS": str(cap)})
                        for cap in args.storm_caps
                    ),
                    ("off", NO_ADMISSION),
                ]
                for epoch, (label, extra) in enumerate(variants):
                    print(f"storm with admission control {label} ...", flush=True)
                    runs.append(
                        await _storm_run(
                            args=args,
                            dsn=dsn,
                            env=env | extra,
                            log_path=work / "ingestd.log",
                            metrics_port=metrics_port,
                            live=live,
                            pipe=pipe,
                            label=label,
                            epoch=epoch,
                        )
                    )
                results["storm"] = runs

        try:
            asyncio.run(run_all())
        finally:
            pipe.send(("stop", None))
            meters_process.join(30)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    stamp = results["date"].replace(":", "").replace("-", "")[:15]
    (args.out / f"storm-{stamp}.json").write_text(text + "\n")
    print_storm_table(results)
    return 0


def print_storm_table(results: dict[str, Any]) -> None:
    p = results["params"]
    print(
        f"{p['live_meters']} live meters (a message every {p['live_interval_s']} s each) while "
        f"{p['storm_meters']} meters replay {p['storm_messages_each']} messages each; "
        f"load average at start {results['machine']['load_at_start']}"
    )
    print(
        "admission control   quiet p50/p99 ms   storm p50/p99 ms   p99 ratio  storm s  requests  disconnects"
    )
    for r in results["storm"]:
        print(
            f"{r['admission_control']:<18}  {r['quiet_p50_ms']:>7} / {r['quiet_p99_ms']:<7}"
            f"  {r['storm_p50_ms']:>7} / {r['storm_p99_ms']:<7}  {r['storm_p99_over_quiet']:>9}"
            f"  {r['storm_seconds']:>7}  {r['replay_requests']:>8}  {r['mqtt_disconnects']:>11}"
        )


if __name__ == "__main__":
    sys.exit(main())
