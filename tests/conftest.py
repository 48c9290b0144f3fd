"""Fixtures: a private PostgreSQL+TimescaleDB server for the session, a fresh migrated
database and a private Mosquitto for each test, and a running daemon on demand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest

from ingestd.config import Config, DatabaseConfig, IngestConfig, MetricsConfig, MqttConfig
from ingestd.daemon import Daemon
from ingestd.metrics import Metrics
from ingestd.simulator import KeyFactory
from ingestd.store import Store
from services import MosquittoServer, PostgresServer


@contextlib.contextmanager
def pg_workdir() -> Iterator[Path]:
    """A directory for a PostgreSQL server, not under pytest's basetemp: another pytest
    run resets that to 0700, which would lock the server's own user (postgres, when we
    are root) out of its data directory."""
    workdir = Path(tempfile.mkdtemp(prefix="ingestd-test-pg-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with pg_workdir() as workdir, PostgresServer(workdir) as server:
        yield server


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    with MosquittoServer(tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture
async def db_url(pg_server: PostgresServer) -> str:
    """A new, migrated database of its own for every test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    async with Store(DatabaseConfig(url=url)) as store:
        await store.migrate()
    return url


@pytest.fixture
def config(db_url: str, broker: MosquittoServer) -> Config:
    return Config(
        database=DatabaseConfig(url=db_url),
        mqtt=MqttConfig(
            url=broker.url,
            client_id=f"ingestd-test-{uuid.uuid4().hex[:8]}",
            reconnect_initial_s=0.05,
            reconnect_max_s=0.5,
        ),
        ingest=IngestConfig(batch_wait_ms=20, db_retry_initial_s=0.05, db_retry_max_s=0.5),
        metrics=MetricsConfig(addr="127.0.0.1:0"),
    )


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def store(config: Config) -> AsyncIterator[Store]:
    async with Store(config.database) as s:
        yield s


@contextlib.asynccontextmanager
async def running_daemon(
    config: Config, *, now: Callable[[], datetime] | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Daemon]:
    """A daemon in this event loop, ready (subscribed) on entry, shut down cleanly on exit;
    ``now`` replaces the host's clock, which the daemon only compares with the database's
    (it goes by that one: ingestd.clock); ``metrics``, given, can be watched from before
    the daemon starts."""
    daemon = Daemon(config, metrics=metrics) if now is None else Daemon(config, now=now, metrics=metrics)
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises what stopped it
    assert ready in done, "daemon not ready within 30 s"
    try:
        yield daemon
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(task, timeout=30)


def with_ingest(config: Config, **changes: object) -> Config:
    return dataclasses.replace(config, ingest=dataclasses.replace(config.ingest, **changes))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def key_factory() -> KeyFactory:
    """Shared, so DSA domain parameters are made once per session."""
    return KeyFactory()


@pytest.fixture
def client_id() -> str:
    """A client id of its own for a test's MQTT link (tests/test_mqtt.py, test_mqtt_adapter.py)."""
    return f"test-mqtt-{uuid.uuid4().hex[:8]}"
