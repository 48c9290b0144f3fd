"""The daemon goes by the database's clock: a head-end clock that jumps a year either way
stamps nothing, and health, gaps and the stored evidence stay true (issue 9, defect 9).

Unit tests of ingestd.clock with injected clocks; the write path and migration 0006 on the
real database; and the whole daemon, through the real broker, with its host clock jumped.
"""

from __future__ import annotations

import importlib
import random
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from conftest import running_daemon
from helpers import metric, publish, wait_settled
from ingestd.clock import OFFSET_WARN_S, DbClock
from ingestd.config import Config
from ingestd.envelope import Message, format_time, parse_body
from ingestd.metrics import Metrics
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Accept, Store, migrations

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

YEAR = timedelta(days=365)
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class HostClock:
    """The host's system clock: the real time plus an offset the test sets (a jump)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


# Every module of the daemon that could read the host's clock.
DAEMON_MODULES = ("clock", "daemon", "gaps", "health", "mqtt", "pipeline", "retention", "store")


@pytest.fixture
def host_clock(monkeypatch: pytest.MonkeyPatch) -> HostClock:
    """The host's clock, jumped wherever the daemon could read it. (Stepping the real
    system clock would take root, and every other process on the machine with it.)"""
    clock = HostClock()

    class JumpingDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> JumpingDatetime:
            return super().now(tz) + clock.offset

    for name in DAEMON_MODULES:
        module = importlib.import_module(f"ingestd.{name}")
        if hasattr(module, "datetime"):
            monkeypatch.setattr(module, "datetime", JumpingDatetime)
    return clock


class Monotonic:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


# -- ingestd.clock, with injected clocks ----------------------------------------------------


def test_now_follows_the_database_and_ignores_host_jumps() -> None:
    host = [T0]
    mono = Monotonic()
    clock = DbClock(host=lambda: host[0], monotonic=mono)
    assert clock.now() == T0  # before the first sync: the host's clock
    db_time = T0 + timedelta(seconds=3)
    clock.set(db_time, mono.value)
    mono.value += 7.5
    assert clock.now() == db_time + timedelta(seconds=7.5)
    host[0] = T0 + YEAR  # the host's clock jumps a year ahead, then a year back
    assert clock.now() == db_time + timedelta(seconds=7.5)
    host[0] = T0 - YEAR
    mono.value += 1
    assert clock.now() == db_time + timedelta(seconds=8.5)


def test_the_offset_is_exported_and_warned_about_once() -> None:
    metrics = Metrics(CollectorRegistry())
    host = [T0]
    mono = Monotonic()
    clock = DbClock(host=lambda: host[0], monotonic=mono, metrics=metrics)
    with capture_logs() as logs:
        clock.set(T0, mono.value)
        assert metric(metrics.registry, "ingestd_clock_offset_seconds") == 0
        host[0] = T0 + YEAR
        clock.set(T0, mono.value)
        clock.set(T0, mono.value)  # still off: not warned again
        assert metric(metrics.registry, "ingestd_clock_offset_seconds") == YEAR.total_seconds()
        host[0] = T0 - timedelta(seconds=OFFSET_WARN_S / 2)
        clock.set(T0, mono.value)
        assert metric(metrics.registry, "ingestd_clock_offset_seconds") == -OFFSET_WARN_S / 2
    assert [e["event"] for e in logs] == ["clock_offset", "clock_offset_resolved"]
    assert logs[0]["offset_s"] == YEAR.total_seconds()
    assert logs[0]["log_level"] == "warning"


async def test_sync_reads_the_database_clock(store: Store, db: Conn) -> None:
    host = HostClock()
    host.offset = YEAR
    metrics = Metrics(CollectorRegistry())
    clock = DbClock(host=host.now, metrics=metrics)
    await clock.sync(store)
    db_now = await db.fetchval("SELECT clock_timestamp()")
    assert abs(clock.now() - db_now) < timedelta(seconds=1)
    offset = metric(metrics.registry, "ingestd_clock_offset_seconds")
    assert abs(offset - YEAR.total_seconds()) < 1


# -- the write path: last_seen_at is never ahead of the database (migration 0006) --------------


def accept(meter: str, seq: int, at: datetime) -> Accept:
    body = {
        "v": 1,
        "meter": meter,
        "epoch": 0,
        "seq": seq,
        "sent": format_time(at),
        "readings": [{"t": format_time(T0 + timedelta(minutes=15 * seq)), "import_wh": seq}],
    }
    b = parse_body(orjson.dumps(body))
    message = Message(b.meter_id, b.epoch, b.seq, b.sent, b.replay, b.readings, b.events, b.digest, kid="k")
    return Accept(message, f"meters/{meter}/up", orjson.dumps(body), at)


async def test_last_seen_is_never_ahead_of_the_database(store: Store, db: Conn) -> None:
    await db.execute("INSERT INTO meters (meter_id) VALUES ('M1')")
    # Whatever a caller's clock says (here a year fast), the database's bounds it.
    future = datetime.now(UTC) + YEAR
    await store.write_batch([accept("M1", 1, future)], [], now=future)
    row = await db.fetchrow("SELECT first_seen_at, last_seen_at, now() AS db_now FROM meter_epochs")
    assert row is not None
    assert row["last_seen_at"] <= row["db_now"]
    assert row["first_seen_at"] <= row["db_now"]
    # The clock put right, the meter is heard again: last_seen_at moves on (never back).
    later = datetime.now(UTC)
    await store.write_batch([accept("M1", 2, later)], [], now=later)
    assert await db.fetchval("SELECT last_seen_at FROM meter_epochs") == later
    await store.write_batch([accept("M1", 3, later - timedelta(hours=1))], [])
    assert await db.fetchval("SELECT last_seen_at FROM meter_epochs") == later
    # Then silent: gray after 48 h, red after 7 days, on time.
    assert await flag_in(db, "M1", timedelta(0)) == "ok"
    assert await flag_in(db, "M1", timedelta(hours=49)) == "gray"
    assert await flag_in(db, "M1", timedelta(days=8)) == "red"


async def flag_in(db: Conn, meter: str, ahead: timedelta) -> str:
    flag: str = await db.fetchval(
        "SELECT flag FROM meter_health_at(now() + $2::interval) WHERE meter_id = $1", meter, ahead
    )
    return flag


async def test_the_migration_repairs_times_left_in_the_future(db: Conn) -> None:
    # What a year-fast head-end left behind before 0006: run 0006 again over it.
    await db.execute(
        """INSERT INTO meters (meter_id) VALUES ('M1');
           INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
           VALUES ('M1', 0, 5, now() + interval '1 year', now() + interval '1 year');
           INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, next_request_at)
           VALUES ('M1', 0, 2, 3, 'open', now() + interval '1 year',
                   now() + interval '1 year 1 minute'),
                  ('M1', 0, 4, 4, 'open', now() - interval '1 hour', now() + interval '5 minutes')"""
    )
    (clock_migration,) = [m for m in migrations() if m.version == 6]
    await db.execute(clock_migration.sql)
    row = await db.fetchrow("SELECT first_seen_at, last_seen_at, now() AS db_now FROM meter_epochs")
    assert row is not None
    assert row["last_seen_at"] <= row["db_now"]
    assert row["first_seen_at"] <= row["db_now"]
    gaps = await db.fetch(
        "SELECT detected_at, next_request_at, last_request_at, closed_at, now() AS db_now"
        " FROM gaps ORDER BY from_seq"
    )
    assert gaps[0]["last_request_at"] is None  # times never set stay unset
    assert gaps[0]["closed_at"] is None
    # The gap stamped from the future is due now; the honest one keeps its schedule.
    assert gaps[0]["detected_at"] <= gaps[0]["db_now"]
    assert gaps[0]["next_request_at"] <= gaps[0]["db_now"]
    assert gaps[1]["next_request_at"] > gaps[1]["db_now"]


# -- the daemon, through the real broker, its host clock jumping ---------------------------


def uplink(meter: VirtualMeter, rng: random.Random, *, skip: int = 0) -> tuple[str, bytes]:
    meter.seq += skip
    # The meter's own clock is right: only the head-end's jumps.
    return f"meters/{meter.meter_id}/up", meter.sign(meter.next_body(datetime.now(UTC), rng))


async def test_a_host_clock_jump_either_way_stamps_nothing(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory, host_clock: HostClock
) -> None:
    fleet = build_fleet(2, prefix="CLK-", algs=("ES256",), keys=key_factory, per_site=2)
    await register_fleet(store, fleet)
    a, b = fleet
    rng = random.Random(9)
    host = host_clock
    host.offset = YEAR  # a year fast from the start
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        offset = metric(registry, "ingestd_clock_offset_seconds")
        assert abs(offset - YEAR.total_seconds()) < 60
        await publish(config.mqtt.host, config.mqtt.port, [uplink(a, rng), uplink(b, rng)])
        await wait_settled(registry, 2)
        # A year slow: keys are not "not yet valid", `sent` is not "in the future".
        host.offset = -YEAR
        await daemon.clock.sync(store)
        assert abs(metric(registry, "ingestd_clock_offset_seconds") + YEAR.total_seconds()) < 60
        # a skips a seq: a gap opens, stamped by the database's clock.
        await publish(config.mqtt.host, config.mqtt.port, [uplink(a, rng, skip=1), uplink(b, rng)])
        await wait_settled(registry, 4)
        host.offset = timedelta(0)
        assert metric(registry, "ingestd_messages_accepted_total") == 4
    near = "BETWEEN now() - interval '5 minutes' AND now()"
    for table, column in (
        ("meter_epochs", "last_seen_at"),
        ("meter_epochs", "first_seen_at"),
        ("message_seqs", "received_at"),
        ("readings", "received_at"),
        ("raw_messages", "received_at"),
        ("gaps", "detected_at"),
    ):
        stamps: list[Any] = [r[0] for r in await db.fetch(f"SELECT {column} {near} FROM {table}")]
        assert stamps, table
        assert all(stamps), f"{table}.{column} not within the last minutes by the database's clock"
    due = await db.fetchval("SELECT next_request_at - now() FROM gaps")
    assert timedelta(0) < due <= timedelta(seconds=config.gaps.grace_s)
    # Then both meters fall silent: they turn gray after 48 h and red after 7 days.
    for meter in fleet:
        assert await flag_in(db, meter.meter_id, timedelta(0)) == "ok"
        assert await flag_in(db, meter.meter_id, timedelta(hours=49)) == "gray"
        assert await flag_in(db, meter.meter_id, timedelta(days=8)) == "red"
