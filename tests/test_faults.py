"""Fault injection on real services, with a fleet publishing at QoS 1 throughout: the broker
restarted, the database stopped for 30 s, slowed by a lock, or killed mid-batch. Each test
ends with every reading the meters created stored exactly once and no gap left open.

The fleet publishes nothing it could lose on purpose (no simulator faults): whatever went
missing would be the fault's doing, would leave a gap that nothing can fill (there is no
head-end key, so nothing is ever asked for again), and fails the completeness check.

The daemon runs in this event loop (``running_daemon``), so its gauges are read from its
registry as they change; the services are stopped, killed and started from a worker
thread, so that the daemon and the fleet keep running (and retrying) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiomqtt
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from test_backfill import poll

from conftest import running_daemon
from helpers import finished, metric, wait_until
from ingestd.config import Config, DatabaseConfig
from ingestd.daemon import Daemon
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Store
from services import MosquittoServer, PostgresServer

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

pytestmark = pytest.mark.slow

Key = tuple[str, int, int]  # (meter_id, epoch, seq)

METERS = 10
# The fleet's pace: one message from every meter, then this pause (some 500 messages/s).
ROUND_PAUSE_S = 0.01
# Committed before a fault is injected, and again after it healed, before the fleet stops.
BEFORE = 300
AFTER = 300
# Intake pauses at this many messages in hand (small, so that every fault reaches it).
MAX_PENDING = 500
BATCH_MAX = 100
# paho reads one packet per socket read and the pipeline pauses intake in the same call,
# so at most a few messages beyond max_pending can be in hand.
SOCKET_SLACK = 10
PUBACK_TIMEOUT_S = 1.0
WITHIN_S = 60.0
DB_DOWN_S = 30.0
LOCK_HELD_S = 5.0
RESTARTS = 5


# -- the fleet's side of the broker --------------------------------------------------------


class Uplink:
    """The fleet's MQTT connection as meter firmware keeps one: QoS 1, and a message whose
    PUBACK does not come (the broker went away) is sent again, the same bytes, on a new
    connection, until the broker acknowledges it. A copy may then reach the head-end twice;
    storing it once is the daemon's business."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: aiomqtt.Client | None = None
        self.connections = 0
        self.resent = 0

    async def __aenter__(self) -> Self:
        await self._connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def publish(self, topic: str, payload: bytes) -> None:
        while True:
            if self._client is None:
                await self._connect()
            assert self._client is not None
            try:
                await self._client.publish(topic, payload, qos=1, timeout=PUBACK_TIMEOUT_S)
            except aiomqtt.MqttError:
                self.resent += 1
                await self._close()
            else:
                return

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHIN_S
        while True:
            stack = contextlib.AsyncExitStack()
            client = aiomqtt.Client(
                self._host,
                self._port,
                identifier=f"fleet-{uuid.uuid4().hex[:8]}",
                protocol=aiomqtt.ProtocolVersion.V5,
                timeout=PUBACK_TIMEOUT_S,
            )
            try:
                await stack.enter_async_context(client)
            except aiomqtt.MqttError:
                assert loop.time() < deadline, f"the fleet could not reconnect within {WITHIN_S} s"
                await asyncio.sleep(0.05)  # a meter's reconnect back-off
                continue
            self._stack, self._client = stack, client
            self.connections += 1
            return

    async def _close(self) -> None:
        stack, client, self._stack, self._client = self._stack, self._client, None, None
        if client is not None:
            # How the connection broke is known (a publish failed): retrieve it, so that
            # asyncio does not report the future's exception as never retrieved.
            gone: asyncio.Future[None] = client._disconnected
            if gone.done() and not gone.cancelled():
                gone.exception()
        if stack is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await stack.aclose()


@dataclasses.dataclass(slots=True)
class Fleet:
    """Meters that each create one signed reading per round and publish it, round after
    round, until stopped; what they created is kept by key, with the bytes published."""

    meters: list[VirtualMeter]
    uplink: Uplink
    topic_prefix: str
    rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(7))
    created: dict[Key, bytes] = dataclasses.field(default_factory=dict)
    published: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        # A round is finished even when stop is set meanwhile: everything created is published.
        while not stop.is_set():
            for meter in self.meters:
                body = meter.next_body(datetime.now(UTC), self.rng)
                payload = meter.sign(body)
                self.created[(meter.meter_id, body["epoch"], body["seq"])] = payload
                await self.uplink.publish(f"{self.topic_prefix}/{meter.meter_id}/up", payload)
                self.published += 1
            await asyncio.sleep(ROUND_PAUSE_S)  # pacing, not waiting for a condition


@contextlib.asynccontextmanager
async def publishing(config: Config, key_factory: KeyFactory) -> AsyncIterator[Fleet]:
    """A registered fleet publishing from entry to exit; every message it created has been
    acknowledged by the broker when the block ends."""
    meters = build_fleet(METERS, prefix="FLT-", interval_s=60, algs=("ES256", "EdDSA"), keys=key_factory)
    async with Store(config.database) as store:
        assert await register_fleet(store, meters) == METERS
    async with Uplink(config.mqtt.host, config.mqtt.port) as uplink:
        fleet = Fleet(meters, uplink, config.mqtt.topic_prefix)
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop), name="fleet")
        try:
            yield fleet
        except BaseException:
            # Stop as well as cancel: Python 3.11's wait_for (inside aiomqtt's publish) can
            # swallow a cancellation, and the fleet would then publish for ever.
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        stop.set()
        async with asyncio.timeout(WITHIN_S):
            await task


# -- watching the daemon -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Gauges:
    """The extremes of the daemon's gauges, sampled every few milliseconds."""

    registry: CollectorRegistry
    max_pending: float = 0.0
    paused: bool = False
    db_went_down: bool = False
    mqtt_went_down: bool = False

    def sample(self) -> None:
        r = self.registry
        self.max_pending = max(self.max_pending, metric(r, "ingestd_pending_messages"))
        self.paused |= metric(r, "ingestd_intake_paused") == 1
        self.db_went_down |= metric(r, "ingestd_db_up") == 0
        self.mqtt_went_down |= metric(r, "ingestd_mqtt_connected") == 0

    def reset(self) -> None:
        self.max_pending, self.paused, self.db_went_down, self.mqtt_went_down = 0.0, False, False, False


@contextlib.asynccontextmanager
async def watching(daemon: Daemon) -> AsyncIterator[Gauges]:
    gauges = Gauges(daemon.metrics.registry)

    async def sample() -> None:
        while True:
            gauges.sample()
            await asyncio.sleep(0.005)  # the sampling period

    task = asyncio.create_task(sample(), name="gauges")
    try:
        yield gauges
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def accepted(daemon: Daemon) -> float:
    return metric(daemon.metrics.registry, "ingestd_messages_accepted_total")


async def committed_at_least(daemon: Daemon, count: float) -> None:
    await wait_until(lambda: accepted(daemon) >= count, within_s=WITHIN_S, what=f"{count:.0f} accepted")


# -- the end state -------------------------------------------------------------------------


async def assert_stored_exactly_once(db: Conn, daemon: Daemon, fleet: Fleet) -> None:
    """Every message the fleet created is stored once, with the bytes it published, and
    nothing is missing, lost or quarantined; the daemon committed all it received."""
    expected = set(fleet.created)
    assert len(expected) == fleet.published
    # As in test_backfill: no gap open or requested, everything stored or in a lost range.
    await poll(db, expected, within_s=WITHIN_S)
    assert await db.fetch("SELECT * FROM gaps WHERE status = 'lost'") == []
    seqs = [(r[0], r[1], r[2]) for r in await db.fetch("SELECT meter_id, epoch, seq FROM message_seqs")]
    assert len(seqs) == len(expected)
    assert set(seqs) == expected
    readings = [(r[0], r[1], r[2]) for r in await db.fetch("SELECT meter_id, epoch, seq FROM readings")]
    assert len(readings) == len(expected), "a reading stored twice, or missing"
    assert set(readings) == expected
    assert await db.fetch("SELECT meter_id, time FROM readings GROUP BY 1, 2 HAVING count(*) > 1") == []
    raw = {
        (r[0], r[1], r[2]): r[3]
        for r in await db.fetch("SELECT meter_id, epoch, seq, payload FROM raw_messages")
    }
    assert raw == fleet.created
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0, await db.fetch(
        "SELECT reason, detail FROM quarantine LIMIT 5"
    )

    registry = daemon.metrics.registry
    await wait_until(
        lambda: finished(registry) == metric(registry, "ingestd_messages_received_total"),
        within_s=WITHIN_S,
        what="everything received committed",
    )
    assert metric(registry, "ingestd_messages_accepted_total") == len(expected)
    assert metric(registry, "ingestd_pending_messages") == 0


# -- a database of the test's own, to stop and kill ----------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """Not the session's server: stopping that one would break every other test."""
    workdir = Path(tempfile.mkdtemp(prefix="ingestd-test-faults-pg-"))
    try:
        with PostgresServer(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def own_config(config: Config, own_pg: PostgresServer) -> Config:
    url = own_pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    async with Store(DatabaseConfig(url=url)) as store:
        await store.migrate()
    return dataclasses.replace(config, database=DatabaseConfig(url=url))


def fault_config(config: Config) -> Config:
    """Short back-offs (as the conftest config has) and a small memory bound."""
    return dataclasses.replace(
        config,
        ingest=dataclasses.replace(
            config.ingest,
            batch_max=BATCH_MAX,
            max_pending=MAX_PENDING,
            db_retry_initial_s=0.05,
            db_retry_max_s=1.0,
        ),
    )


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Conn]:
    conn: Conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def assert_holding(registry: CollectorRegistry) -> None:
    """Paused: the pending gauge must say how much is held, as the database is stalled."""
    pending = metric(registry, "ingestd_pending_messages")
    assert MAX_PENDING <= pending <= MAX_PENDING + SOCKET_SLACK, (
        f"ingestd_pending_messages is {pending:.0f} while intake is paused at max_pending {MAX_PENDING}"
    )


def assert_bounded(gauges: Gauges) -> None:
    assert gauges.paused, "intake never paused"
    assert MAX_PENDING <= gauges.max_pending <= MAX_PENDING + SOCKET_SLACK, (
        f"{gauges.max_pending:.0f} messages in hand, max_pending {MAX_PENDING}"
    )


# -- the scenarios -------------------------------------------------------------------------


async def test_broker_restart_mid_stream(
    config: Config, broker: MosquittoServer, db: Conn, key_factory: KeyFactory
) -> None:
    cfg = fault_config(config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            gauges.reset()
            received_before = metric(daemon.metrics.registry, "ingestd_messages_received_total")
            # Persistence kept: the daemon's session, its subscription and its queue survive.
            await asyncio.to_thread(broker.restart)
            await wait_until(lambda: gauges.mqtt_went_down, within_s=WITHIN_S, what="the daemon to notice")
            await wait_until(
                lambda: metric(daemon.metrics.registry, "ingestd_mqtt_connected") == 1,
                within_s=WITHIN_S,
                what="the daemon to resubscribe",
            )
            resumed_at = accepted(daemon)
            await committed_at_least(daemon, resumed_at + AFTER)
        await assert_stored_exactly_once(db, daemon, fleet)
        registry = daemon.metrics.registry
        assert metric(registry, "ingestd_messages_received_total") > received_before
        duplicates = metric(registry, "ingestd_messages_duplicate_total")
    assert fleet.uplink.connections >= 2, "the fleet's connection did not break"
    print(
        f"broker restart: {fleet.published} published, {fleet.uplink.resent} resent by the fleet, "
        f"{duplicates:.0f} duplicates"
    )


async def test_database_down_for_30_s_mid_stream(
    own_config: Config, own_pg: PostgresServer, key_factory: KeyFactory
) -> None:
    cfg = fault_config(own_config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            assert metric(registry, "ingestd_db_up") == 1
            gauges.reset()
            loop = asyncio.get_running_loop()
            down_at = loop.time()
            await asyncio.to_thread(own_pg.stop)
            await wait_until(lambda: gauges.db_went_down, within_s=WITHIN_S, what="ingestd_db_up 0")
            await wait_until(lambda: gauges.paused, within_s=WITHIN_S, what="intake to pause")
            assert_holding(registry)
            # Paused: nothing is committed, so nothing is acknowledged and nothing more taken.
            acked = finished(registry)
            received = metric(registry, "ingestd_messages_received_total")
            published = fleet.published
            errors = metric(registry, "ingestd_db_write_errors_total")
            await asyncio.sleep(max(0.0, DB_DOWN_S - (loop.time() - down_at)))  # the outage
            assert finished(registry) == acked, "acknowledged while the database was down"
            assert metric(registry, "ingestd_messages_received_total") == received
            assert fleet.published > published + MAX_PENDING, "the fleet must keep publishing"
            assert metric(registry, "ingestd_db_up") == 0
            retries = metric(registry, "ingestd_db_write_errors_total") - errors
            await asyncio.to_thread(own_pg.start)
            await wait_until(lambda: metric(registry, "ingestd_db_up") == 1, within_s=WITHIN_S, what="db up")
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        assert_bounded(gauges)
        # Backed off: attempts doubled up to db_retry_max_s (1 s), not a busy loop.
        assert 5 <= retries <= DB_DOWN_S / cfg.ingest.db_retry_max_s + 10, retries
        async with connect(cfg.database.url) as db:
            await assert_stored_exactly_once(db, daemon, fleet)
    print(
        f"database down {DB_DOWN_S:.0f} s: {fleet.published} published, at most "
        f"{gauges.max_pending:.0f} in hand, {retries:.0f} retries while down"
    )


async def test_slow_database_lock_held_while_meters_publish(
    config: Config, db: Conn, key_factory: KeyFactory
) -> None:
    cfg = fault_config(config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            gauges.reset()
            async with db.transaction():
                await db.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
                await wait_until(lambda: gauges.paused, within_s=WITHIN_S, what="intake to pause")
                assert_holding(registry)
                acked = finished(registry)
                await asyncio.sleep(LOCK_HELD_S)  # the stall
                assert finished(registry) == acked, "acknowledged before its commit"
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        assert_bounded(gauges)
        # Slow is not down: nothing failed, nothing was retried.
        assert not gauges.db_went_down
        assert metric(registry, "ingestd_db_write_errors_total") == 0
        await assert_stored_exactly_once(db, daemon, fleet)


async def test_database_killed_mid_batch_then_restarted(
    own_config: Config, own_pg: PostgresServer, key_factory: KeyFactory
) -> None:
    cfg = fault_config(own_config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            gauges.reset()
            # Make sure a batch is mid-transaction when the server dies: stall it on a lock
            # and wait until the daemon's session is seen waiting for it.
            locker: Conn = await asyncpg.connect(cfg.database.url)
            try:
                await locker.execute("BEGIN; LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")

                async def batch_waiting() -> bool:
                    # Statistics are a snapshot per transaction: take a new one each time.
                    await locker.execute("SELECT pg_stat_clear_snapshot()")
                    return bool(
                        await locker.fetchval(
                            """SELECT count(*) FROM pg_stat_activity
                               WHERE datname = current_database() AND pid <> pg_backend_pid()
                                 AND state = 'active' AND wait_event_type = 'Lock'"""
                        )
                    )

                loop = asyncio.get_running_loop()
                deadline = loop.time() + WITHIN_S
                while not await batch_waiting():
                    assert loop.time() < deadline, "no batch transaction waiting on the lock"
                    await asyncio.sleep(0.01)
                acked = finished(registry)
                in_flight = accepted(daemon)
                await asyncio.to_thread(own_pg.kill)
            finally:
                locker.terminate()
            await wait_until(lambda: gauges.db_went_down, within_s=WITHIN_S, what="ingestd_db_up 0")
            assert finished(registry) == acked
            assert accepted(daemon) == in_flight
            await asyncio.to_thread(own_pg.start)
            await wait_until(lambda: metric(registry, "ingestd_db_up") == 1, within_s=WITHIN_S, what="db up")
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        async with connect(cfg.database.url) as db:
            # The killed transaction left nothing behind, and everything acknowledged survived.
            await assert_stored_exactly_once(db, daemon, fleet)


async def test_database_restarted_repeatedly_mid_stream(
    own_config: Config, own_pg: PostgresServer, key_factory: KeyFactory
) -> None:
    """Short outages in a row: each stop ends the pool's idle connections under the writer,
    whichever way asyncpg reports it, and the daemon must ride through every one."""
    cfg = fault_config(own_config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            for _ in range(RESTARTS):
                await committed_at_least(daemon, accepted(daemon) + BEFORE)
                gauges.reset()
                await asyncio.to_thread(own_pg.stop)
                await wait_until(lambda: gauges.db_went_down, within_s=WITHIN_S, what="ingestd_db_up 0")
                await asyncio.to_thread(own_pg.start)
                await wait_until(
                    lambda: metric(registry, "ingestd_db_up") == 1, within_s=WITHIN_S, what="db up"
                )
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        async with connect(cfg.database.url) as db:
            await assert_stored_exactly_once(db, daemon, fleet)
