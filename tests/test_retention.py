"""Quarantine retention: old rejected messages are deleted, recent ones kept, on the real
database and through the daemon."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry
from test_cli import aingestd, cli_env

from conftest import running_daemon, with_ingest
from helpers import metric, wait_until
from ingestd.config import Config, IngestConfig, load_config
from ingestd.errors import ConfigError
from ingestd.metrics import Metrics
from ingestd.retention import ClosedGapRetention, QuarantineRetention
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


# -- closed gaps ----------------------------------------------------------------------------


async def add_gaps(db: asyncpg.Connection[asyncpg.Record]) -> None:
    """Filled and lost gaps closed long ago and recently, and an open one detected long ago."""
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, closed_at)
           VALUES ('OLD-FILLED', 0, 1, 1, 'filled', $1, $1),
                  ('OLD-LOST',   0, 1, 1, 'lost',   $1, $1),
                  ('NEW-LOST',   0, 1, 1, 'lost',   $2, $2),
                  ('OLD-OPEN',   0, 1, 1, 'open',   $1, NULL)""",
        NOW - timedelta(days=500),
        NOW - timedelta(days=10),
    )


async def test_closed_gaps_are_pruned_after_their_retention(
    config: Config, store: Store, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await add_gaps(db)
    metrics = Metrics(CollectorRegistry())
    retention = ClosedGapRetention(config.gaps, store=store, metrics=metrics, now=lambda: NOW)
    assert config.gaps.closed_retention_days == 400
    assert await retention.prune() == 2
    assert metric(metrics.registry, "ingestd_gaps_pruned_total") == 2
    left = await db.fetch("SELECT meter_id FROM gaps ORDER BY meter_id")
    # An open gap is never pruned, however old: it is still chased or will be lost.
    assert [r["meter_id"] for r in left] == ["NEW-LOST", "OLD-OPEN"]
    assert await store.prune_closed_gaps(NOW - timedelta(days=400), chunk=1) == 0


async def test_closed_gap_retention_zero_keeps_them(
    config: Config, store: Store, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await add_gaps(db)
    gaps = dataclasses.replace(config.gaps, closed_retention_days=0)
    retention = ClosedGapRetention(gaps, store=store, metrics=Metrics(CollectorRegistry()), now=lambda: NOW)
    assert await retention.prune() == 0
    await retention.run()  # returns at once
    assert await db.fetchval("SELECT count(*) FROM gaps") == 4


async def test_gaps_lists_active_ones_unless_all_is_asked(
    db_url: str, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await add_gaps(db)
    env = cli_env(db_url)
    listed = await aingestd("gaps", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [g["meter_id"] for g in orjson.loads(listed.stdout)] == ["OLD-OPEN"]
    every = await aingestd("gaps", "--all", "--json", env=env)
    assert every.returncode == 0, every.stderr
    assert sorted(g["meter_id"] for g in orjson.loads(every.stdout)) == [
        "NEW-LOST",
        "OLD-FILLED",
        "OLD-LOST",
        "OLD-OPEN",
    ]
    lost = await aingestd("gaps", "--status", "lost", "--json", env=env)
    assert sorted(g["meter_id"] for g in orjson.loads(lost.stdout)) == ["NEW-LOST", "OLD-LOST"]
    both = await aingestd("gaps", "--all", "--status", "lost", env=env)
    assert both.returncode == 2
    assert len(both.stderr.strip().splitlines()) == 1, both.stderr
