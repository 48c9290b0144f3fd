"""`make bench`: ingestd end to end on a real broker and database, on this machine.

Phase 1, throughput: pre-signed ES256 messages are queued at the broker for ingestd's
persistent session while it is stopped; then ingestd starts and drains the backlog with
acknowledge-after-commit. Reported: messages/s, daemon CPU per message, peak RSS. It runs
--repeat times (a fresh backlog each time) and reports the median run and every run's
rate: on a shared host one run says little.
Phase 2, latency: a publisher sends at a fixed rate while ingestd runs; reported: the
sent-to-commit delay, p50 and p99 (from the daemon's own histogram).
Both phases end by checking that every message was stored exactly once.

Results go to bench/results/latest.json (and a dated copy) and a printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import random
import signal
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

from helpers import FastPublisher  # noqa: E402
from ingestd.config import DatabaseConfig  # noqa: E402
from ingestd.envelope import format_time  # noqa: E402
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
    parser.add_argument("--only", choices=("storm",), help="run only this section")
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


def main() -> int:
    args = parse_args()
    if args.only == "storm":
        return storm_main(args)
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
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

    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (args.out / "latest.json").write_text(text + "\n")
    stamp = results["date"].replace(":", "").replace("-", "")[:15]
    (args.out / f"bench-{stamp}.json").write_text(text + "\n")
    print_table(results)
    return 0 if results["throughput"]["exactly_once"] and results["exactly_once_all"] else 1


def print_table(results: dict[str, Any]) -> None:
    t, lat, mem = results["throughput"], results["latency"], results["memory"]
    rows = [
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
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


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
