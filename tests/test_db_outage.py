"""The database stops answering (a partition, a frozen server) while the daemon runs:
shutdown must stay within systemd's stop timeout, and the health metrics must say so
even when no uplink traffic flows. The server is frozen with SIGSTOP, so connections stay
open and silent, as across a partition; it is thawed before the test ends."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

import asyncpg

from conftest import running_daemon
from helpers import metric, publish, wait_settled, wait_until
from ingestd.config import Config
from ingestd.daemon import Daemon
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from services import PostgresServer, _children_of


@contextlib.contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """SIGSTOP the postmaster and every backend; SIGCONT them on the way out."""
    pid = server._postmaster_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # first, so that it forks nothing new meanwhile
    children = _children_of(pid)
    for child in children:
        os.kill(child, signal.SIGSTOP)
    try:
        yield
    finally:
        for victim in (*children, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)


def with_database(config: Config, **changes: object) -> Config:
    return dataclasses.replace(config, database=dataclasses.replace(config.database, **changes))  # type: ignore[arg-type]


async def test_shutdown_is_bounded_when_the_database_is_frozen(
    config: Config,
    store: Store,
    pg_server: PostgresServer,
    db: asyncpg.Connection[asyncpg.Record],
    key_factory: KeyFactory,
) -> None:
    """Stop with a write hanging on a silent connection: the daemon exits within its drain
    time plus database.close_timeout_s, not the minute of command_timeout_s; what it had
    not committed is redelivered by the broker and stored once, after the database is back."""
    config = dataclasses.replace(config, ingest=dataclasses.replace(config.ingest, shutdown_timeout_s=1.0))
    config = with_database(config, close_timeout_s=2.0, probe_s=60.0)
    assert config.database.command_timeout_s == 60.0
    fleet = build_fleet(4, prefix="FRZ-", interval_s=60, algs=("EdDSA",), keys=key_factory)
    await register_fleet(store, fleet)
    rng = random.Random(3)
    topic = config.mqtt.topic_prefix + "/{}/up"

    def messages(per_meter: int) -> list[tuple[str, bytes]]:
        return [
            (topic.format(m.meter_id), m.sign(m.next_body(datetime.now(UTC), rng)))
            for _ in range(per_meter)
            for m in fleet
        ]

    host, port = config.mqtt.host, config.mqtt.port
    loop = asyncio.get_running_loop()
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(daemon.ready.is_set, what="daemon ready")
        await publish(host, port, messages(3))
        await wait_settled(daemon.metrics.registry, 12)
        with frozen(pg_server):
            await publish(host, port, messages(2))  # received, never committed
            await wait_until(
                lambda: metric(daemon.metrics.registry, "ingestd_messages_received_total") == 20,
                what="the messages sent during the freeze received",
            )
            started = loop.time()
            daemon.should_exit.set()
            done, _ = await asyncio.wait({task}, timeout=30)
            took = loop.time() - started
            assert task in done, "shutdown still hanging after 30 s"
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(task, 90)
    # Drain (1 s), the offline state (at once: the broker is fine), the close bound (2 s).
    assert took < 1.0 + 2.0 + 3.0, f"shutdown took {took:.1f} s"

    assert await db.fetchval("SELECT count(*) FROM message_seqs") == 12
    async with running_daemon(config) as again:
        await wait_settled(again.metrics.registry, 8)
        assert metric(again.metrics.registry, "ingestd_messages_accepted_total") == 8
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == 20
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == 20


async def test_store_close_is_bounded_when_the_database_is_frozen(
    config: Config, pg_server: PostgresServer, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A query cancelled while the server is silent: its connection is released only when
    the server confirms, and pool.close() waits for that. Closing must stay within
    database.close_timeout_s (the CLI's commands and the daemon's last step)."""
    store = Store(dataclasses.replace(config.database, close_timeout_s=1.0))
    await store.__aenter__()
    query = asyncio.create_task(store.pool.fetchval("SELECT pg_sleep(60)"))
    await wait_until_async(
        lambda: db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"),
        what="the query running",
    )
    loop = asyncio.get_running_loop()
    with frozen(pg_server):
        query.cancel()
        started = loop.time()
        await asyncio.wait_for(store.__aexit__(None, None, None), 30)
        took = loop.time() - started
    assert took < 1.0 + 2.0, f"closing took {took:.1f} s"
    # Its connection was cut, so the cancelled query ends too instead of hanging on.
    done, _ = await asyncio.wait({query}, timeout=5)
    assert query in done


async def wait_until_async(probe: Callable[[], Awaitable[object]], *, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await probe():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def quiet_config(config: Config) -> Config:
    """Probe and refresh often, so the test takes seconds, not minutes."""
    config = with_database(config, probe_s=0.2)
    return dataclasses.replace(config, flags=dataclasses.replace(config.flags, refresh_s=1.0))


async def test_db_up_follows_the_database_without_traffic(config: Config, pg_server: PostgresServer) -> None:
    """No uplink at all: the probe alone takes ingestd_db_up to 0 while the server is
    frozen (a write would have to fail first otherwise), and back to 1 after."""
    async with running_daemon(quiet_config(config)) as daemon:
        registry = daemon.metrics.registry
        assert metric(registry, "ingestd_db_up") == 1
        with frozen(pg_server):
            await wait_until(
                lambda: metric(registry, "ingestd_db_up") == 0, within_s=5, what="db_up 0 from the probe"
            )
        await wait_until(lambda: metric(registry, "ingestd_db_up") == 1, within_s=10, what="db_up 1 again")
        assert metric(registry, "ingestd_messages_received_total") == 0


async def test_health_refresh_time_stops_while_the_database_is_frozen(
    config: Config, pg_server: PostgresServer
) -> None:
    """ingestd_health_refreshed_timestamp_seconds is the daemon's clock at the last refresh
    that succeeded: frozen health gauges show as a time that no longer moves."""
    ticks = iter(range(1_000_000))
    base = datetime.now(UTC).timestamp()

    def now() -> datetime:
        return datetime.fromtimestamp(base + next(ticks), UTC)

    async with running_daemon(quiet_config(config), now=now) as daemon:
        registry = daemon.metrics.registry

        def refreshed() -> float:
            return metric(registry, "ingestd_health_refreshed_timestamp_seconds")

        await wait_until(lambda: refreshed() >= base, what="a first health refresh")
        with frozen(pg_server):
            await wait_until(lambda: metric(registry, "ingestd_db_up") == 0, within_s=5, what="db_up 0")
            stale = refreshed()
            # Longer than refresh_s (1 s): a refresh would have moved it.
            await asyncio.sleep(1.5)
            assert refreshed() == stale
        await wait_until(lambda: refreshed() > stale, within_s=10, what="health refreshed again")
