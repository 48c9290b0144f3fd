"""Quarantine retention: old rejected messages are deleted, recent ones kept, on the real
database and through the daemon."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from conftest import running_daemon, with_ingest
from helpers import metric, wait_until
from ingestd.config import Config, IngestConfig, load_config
from ingestd.errors import ConfigError
from ingestd.metrics import Metrics
from ingestd.retention import QuarantineRetention
from ingestd.store import Reject, Store

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def reject(age: timedelta, n: int, *, now: datetime = NOW) -> Reject:
    return Reject("bad_json", "not JSON", f"meters/M-{n}/up", b"{", now - age, f"M-{n}", None)


async def quarantined(db: asyncpg.Connection[asyncpg.Record]) -> list[str]:
    rows = await db.fetch("SELECT meter_id FROM quarantine ORDER BY received_at, meter_id")
    return [r["meter_id"] for r in rows]


async def test_prune_deletes_only_what_is_older(store: Store, db: asyncpg.Connection[asyncpg.Record]) -> None:
    old = [reject(timedelta(days=400 + i), i) for i in range(7)]
    edge = reject(timedelta(days=365), 100)  # exactly at the limit: kept
    recent = [reject(timedelta(days=i), 200 + i) for i in range(3)]
    await store.write_batch([], [*old, edge, *recent])
    # A chunk smaller than the backlog: several rounds, the same outcome.
    deleted = await store.prune_quarantine(NOW - timedelta(days=365), chunk=3)
    assert deleted == 7
    assert sorted(await quarantined(db)) == sorted(r.meter_id for r in [edge, *recent] if r.meter_id)
    assert await store.prune_quarantine(NOW - timedelta(days=365), chunk=3) == 0


async def test_retention_counts_what_it_deletes(config: Config, store: Store) -> None:
    metrics = Metrics(CollectorRegistry())
    ingest = dataclasses.replace(config.ingest, quarantine_retention_days=30)
    await store.write_batch([], [reject(timedelta(days=31), 1), reject(timedelta(days=29), 2)])
    retention = QuarantineRetention(ingest, store=store, metrics=metrics, now=lambda: NOW)
    assert await retention.prune() == 1
    assert metric(metrics.registry, "ingestd_quarantine_pruned_total") == 1
    # Thirty days later the other one goes too.
    later = QuarantineRetention(ingest, store=store, metrics=metrics, now=lambda: NOW + timedelta(days=2))
    assert await later.prune() == 1
    assert metric(metrics.registry, "ingestd_quarantine_pruned_total") == 2


async def test_zero_keeps_everything(
    config: Config, store: Store, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await store.write_batch([], [reject(timedelta(days=5000), 1)])
    ingest = dataclasses.replace(config.ingest, quarantine_retention_days=0)
    retention = QuarantineRetention(
        ingest, store=store, metrics=Metrics(CollectorRegistry()), now=lambda: NOW
    )
    assert not retention.enabled
    assert await retention.prune() == 0
    await retention.run()  # returns at once: nothing to do, ever
    assert await quarantined(db) == ["M-1"]


async def test_the_daemon_prunes_at_start(
    config: Config, store: Store, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    # The daemon goes by the database's clock, not by one a test could set.
    now = datetime.now(UTC)
    await store.write_batch(
        [], [reject(timedelta(days=10), 1, now=now), reject(timedelta(days=1), 2, now=now)]
    )
    config = with_ingest(config, quarantine_retention_days=7)
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await wait_until(
            lambda: metric(registry, "ingestd_quarantine_pruned_total") == 1,
            within_s=10,
            what="the old quarantine row to be pruned",
        )
    assert await quarantined(db) == ["M-2"]


@pytest.mark.parametrize("value", ["-1", "36501", "nan"])
def test_retention_setting_is_checked(value: str) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.quarantine_retention_days"):
        load_config(env={"INGESTD_INGEST_QUARANTINE_RETENTION_DAYS": value})


def test_default_is_a_year() -> None:
    assert IngestConfig().quarantine_retention_days == 365
