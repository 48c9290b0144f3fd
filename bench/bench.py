"""`make bench`: ingestd end to end on a real broker and database, on this machine.

Phase 1, throughput: pre-signed ES256 messages are queued at the broker for ingestd's
persistent session while it is stopped; then ingestd starts and drains the backlog with
acknowledge-after-commit. Reported: messages/s, daemon CPU per message, peak RSS. It runs
--repeat times (a fresh backlog each time) and reports the median run and every run's
rate: on a shared host one run says little.
Phase 2, latency: a publisher sends at a fixed rate while ingestd runs; reported: the
sent-to-commit delay, p50 and p99 (from the daemon's own histogram).
Both phases end by checking that every message was stored exactly once.

Billing: a fleet (10,000 meters by default) with a month of 15-minute readings is
generated in the database, with a few holes, gaps, replays, outages and tamper events;
reported: the rows generated and the time to compute every meter's billing statement
(`ingestd billing report`'s work), the median of --billing-runs. `--only billing` runs it
alone.

Results go to bench/results/latest.json (and a dated copy) and a printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import FastPublisher  # noqa: E402
from ingestd.config import DatabaseConfig  # noqa: E402
from ingestd.envelope import format_time  # noqa: E402
from ingestd.signature import Signer, generate_private_key, public_key_pem  # noqa: E402
from ingestd.store import Store  # noqa: E402
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="run the daemon under py-spy, collapsed stacks to FILE"
    )
    parser.add_argument(
        "--only", choices=("all", "ingest", "billing"), default="all", help="run only one part (default all)"
    )
    parser.add_argument(
        "--billing-meters", type=int, default=10_000, help="billing: meters with a month of readings"
    )
    parser.add_argument("--billing-interval", type=int, default=900, help="billing: metering interval, s")
    parser.add_argument(
        "--billing-runs", type=int, default=1, help="billing: reports timed (each is a full pass; default 1)"
    )
    return parser.parse_args()


def presign(
    signers: list[Signer], start_seq: int, count: int, *, sent: datetime | None
) -> list[tuple[str, bytes]]:
    """``count`` messages round-robin over the meters; one reading each."""
    messages = []
    protected = {s.kid: s.protected() for s in signers}
    per_meter_seq = dict.fromkeys((s.kid for s in signers), start_seq - 1)
    base = datetime(2026, 1, 1, tzinfo=UTC)
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
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
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


async def setup_db(dsn: str, signers: list[Signer]) -> None:
    async with Store(DatabaseConfig(url=dsn)) as store:
        await store.migrate()
        for s in signers:
            await store.add_meter(
                s.kid.removesuffix("-k1"),
                alg=s.alg,
                kid=s.kid,
                public_key_pem=public_key_pem(s.key.public_key()).decode(),
                site="BENCH",
                interval_s=900,
            )


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
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    if args.only == "billing":
        return write_results(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "billing": bench_billing(work, args.billing_meters, args.billing_interval, args.billing_runs),
            },
            args.out,
            name="billing",
        )
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
        },
    }
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

        runs: list[dict[str, Any]] = []
        published = 0
        for run in range(args.repeat):
            daemon.terminate()
            daemon.wait(60)
            backlog = presign(signers, 1 + run * per_meter, args.messages, sent=None)
            print(f"phase 1, run {run + 1}: queueing {len(backlog)} messages at the broker ...", flush=True)
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
        publisher.close()

    if args.only == "all":
        results["billing"] = bench_billing(
            work, args.billing_meters, args.billing_interval, args.billing_runs
        )
    write_results(results, args.out)
    return 0 if results["throughput"]["exactly_once"] and results["exactly_once_all"] else 1


def write_results(results: dict[str, Any], out: Path, name: str = "bench") -> int:
    """latest.json (or billing-latest.json for a billing-only run) and a dated copy."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (out / ("latest.json" if name == "bench" else f"{name}-latest.json")).write_text(text + "\n")
    stamp = results["date"].replace(":", "").replace("-", "")[:15]
    (out / f"{name}-{stamp}.json").write_text(text + "\n")
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if "throughput" in results:
        rows += ingest_rows(results)
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


def ingest_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
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
    ]


if __name__ == "__main__":
    sys.exit(main())
