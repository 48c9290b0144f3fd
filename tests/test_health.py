"""Meter health on the real database: flags at the right moments (time injected), open
gaps and tamper events beside them, isolated and site-wide power losses told apart, and
the health metrics."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from helpers import metric
from ingestd.config import DatabaseConfig, FlagsConfig, load_config
from ingestd.errors import ConfigError
from ingestd.events import EVENT_CODES
from ingestd.health import (
    HealthMonitor,
    classify_power_losses,
    fetch_health,
    flag_counts,
    store_thresholds,
)
from ingestd.metrics import Metrics
from ingestd.store import Store

# asyncpg's classes are generic only in its stubs.
if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
FLAGS = FlagsConfig()
H = timedelta(hours=1)
S = timedelta(seconds=1)


async def add_meters(db: Conn, *meters: tuple[str, str | None]) -> None:
    await db.executemany("INSERT INTO meters (meter_id, site) VALUES ($1, $2)", meters)


async def heard(db: Conn, meter: str, at: datetime, epoch: int = 0) -> None:
    """What the batch writer records for every valid message (migration 0002)."""
    await db.execute(
        """INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
           VALUES ($1, $2, 1, $3, $3)
           ON CONFLICT (meter_id, epoch) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at""",
        meter,
        epoch,
        at,
    )


_seq = iter(range(1, 1_000_000))


async def event(
    db: Conn, meter: str, code: str, at: datetime, *, received_at: datetime | None = None
) -> None:
    await db.execute(
        """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
           VALUES ($1, $2, $3, '{}', 0, $4, $5)""",
        meter,
        at,
        code,
        next(_seq),
        received_at or at,
    )


async def flags_at(db: Conn, at: datetime, flags: FlagsConfig = FLAGS) -> dict[str, str]:
    return {m.meter_id: m.flag for m in await fetch_health(db, at, flags)}


async def test_each_flag_appears_at_the_right_time(db: Conn) -> None:
    await add_meters(db, ("A", "S1"), ("B", "S1"), ("NEW", None))
    await heard(db, "A", T0)
    # B was last heard in an older epoch than its latest one: the latest time counts.
    await heard(db, "B", T0 - 10 * 24 * H, epoch=0)
    await heard(db, "B", T0, epoch=1)

    expected = [
        (T0, "ok"),
        (T0 + 48 * H, "ok"),  # silent for exactly gray_after: not yet
        (T0 + 48 * H + S, "gray"),
        (T0 + 7 * 24 * H, "gray"),
        (T0 + 7 * 24 * H + S, "red"),
        (T0 + 400 * 24 * H, "red"),
    ]
    for at, flag in expected:
        assert await flags_at(db, at) == {"A": flag, "B": flag, "NEW": "never"}, at
        counts = await flag_counts(db, at, FLAGS)
        assert counts == {"ok": 0, "gray": 0, "red": 0, "never": 1} | {flag: 2}, at

    # Hearing from A again makes it ok at once.
    await heard(db, "A", T0 + 400 * 24 * H)
    assert (await flags_at(db, T0 + 400 * 24 * H))["A"] == "ok"

    # Thresholds come from the configuration.
    short = FlagsConfig(gray_after_s=3600, red_after_s=7200)
    assert (await flags_at(db, T0 + 90 * 60 * S, short))["B"] == "gray"
    assert (await flags_at(db, T0 + 121 * 60 * S, short))["B"] == "red"


async def test_the_view_uses_now_and_the_daemon_s_thresholds(db: Conn) -> None:
    now = await db.fetchval("SELECT now()")
    await add_meters(db, ("A", "S1"), ("B", "S1"), ("C", "S2"), ("D", None))
    await heard(db, "A", now - 2 * H)
    await heard(db, "B", now - 3 * 24 * H)
    await heard(db, "C", now - 8 * 24 * H)

    async def view() -> dict[str, str]:
        return {r["meter_id"]: r["flag"] for r in await db.fetch("SELECT meter_id, flag FROM meter_health")}

    assert await view() == {"A": "ok", "B": "gray", "C": "red", "D": "never"}
    await store_thresholds(db, FlagsConfig(gray_after_s=3600, red_after_s=10 * 24 * 3600))
    assert await view() == {"A": "gray", "B": "gray", "C": "gray", "D": "never"}
    site = await db.fetch("SELECT meter_id FROM meter_health WHERE site = 'S1' ORDER BY 1")
    assert [r["meter_id"] for r in site] == ["A", "B"]


async def test_open_gaps_and_last_tamper_event_beside_the_flag(db: Conn) -> None:
    await add_meters(db, ("A", "S1"), ("B", "S1"))
    await heard(db, "A", T0)
    await db.executemany(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, closed_at)
           VALUES ($1, 0, $2, $3, $4, $5, $6)""",
        [
            ("A", 10, 14, "open", T0, None),
            ("A", 20, 20, "requested", T0, None),
            ("A", 30, 39, "filled", T0, T0 + H),
            ("A", 40, 49, "lost", T0, T0 + H),
            ("B", 5, 6, "open", T0, None),
        ],
    )
    await event(db, "A", "007", T0 - 3 * H)
    await event(db, "A", "003", T0 - 2 * H)
    await event(db, "A", "004", T0 - 1 * H)  # cover closed: not tampering
    await event(db, "A", "099", T0 - 1 * H)  # unknown code: not tampering
    await event(db, "A", "005", T0 + H)  # after `as_of`: not seen yet
    health = {m.meter_id: m for m in await fetch_health(db, T0, FLAGS)}
    a, b = health["A"], health["B"]
    assert (a.open_gaps, a.missing_seqs) == (2, 6)
    assert (a.last_tamper_code, a.last_tamper_at) == ("003", T0 - 2 * H)
    assert (b.open_gaps, b.missing_seqs, b.last_tamper_code, b.last_tamper_at) == (1, 2, None, None)
    only_b = await fetch_health(db, T0, FLAGS, flag="never")
    assert [m.meter_id for m in only_b] == ["B"]


async def test_tamper_class_in_sql_is_the_table_s(db: Conn) -> None:
    """The view's list of tamper codes (SQL) against ingestd/events.py, code by code."""
    meters = [(f"M{e.code}", "S") for e in EVENT_CODES] + [("M099", "S")]
    await add_meters(db, *meters)
    for meter, _site in meters:
        await event(db, meter, meter[1:], T0)
    health = {m.meter_id: m for m in await fetch_health(db, T0, FLAGS)}
    for e in EVENT_CODES:
        assert health[f"M{e.code}"].last_tamper_code == (e.code if e.tamper else None), e.code
    assert health["M099"].last_tamper_code is None


async def power_losses(db: Conn) -> dict[str, object]:
    rows = await db.fetch("SELECT meter_id, detail FROM events WHERE code = '001' ORDER BY meter_id")
    # The test's plain connection has no jsonb codec: detail arrives as text.
    return {r["meter_id"]: orjson.loads(r["detail"]).get("isolated") for r in rows}


async def test_isolated_and_site_wide_power_losses_told_apart(db: Conn) -> None:
    await add_meters(
        db,
        *[(m, "TOWER") for m in ("T1", "T2", "T3", "T4", "T5")],
        *[(m, "HOUSE") for m in ("H1", "H2", "H3")],
        ("LONE", "FARM"),
        ("NOSITE", None),
    )
    # A building outage: four of five meters of TOWER within two minutes (received
    # together when power came back, an hour later).
    back = T0 + H
    for i, meter in enumerate(("T1", "T2", "T3", "T4")):
        await event(db, meter, "001", T0 + i * 40 * S, received_at=back)
    # One tenant's breaker: T5 alone, later the same day.
    await event(db, "T5", "001", T0 + 5 * H, received_at=T0 + 5 * H)
    # HOUSE: H1 and H2 six minutes apart (outside the 5-minute window), so each is alone.
    await event(db, "H1", "001", T0, received_at=T0)
    await event(db, "H2", "001", T0 + 6 * 60 * S, received_at=T0 + 6 * 60 * S)
    await event(db, "LONE", "001", T0)
    await event(db, "NOSITE", "001", T0)
    # Not a power loss: never classified.
    await event(db, "H3", "002", T0)

    # Within the window of its receipt nothing is decided: peers may still report.
    assert await classify_power_losses(db, T0 + 4 * 60 * S, FLAGS) == []
    early = await classify_power_losses(db, back + 4 * 60 * S, FLAGS)
    assert {c.meter_id for c in early} == {"H1", "H2", "LONE", "NOSITE"}
    done = await classify_power_losses(db, T0 + 6 * H, FLAGS)
    assert {c.meter_id for c in done} == {"T1", "T2", "T3", "T4", "T5"}
    assert await power_losses(db) == {
        "T1": False,
        "T2": False,
        "T3": False,
        "T4": False,
        "T5": True,
        "H1": True,
        "H2": True,
        "LONE": True,
        "NOSITE": True,
    }
    detail = await db.fetchval("SELECT detail FROM events WHERE meter_id = 'T1' AND code = '001'")
    assert orjson.loads(detail) == {"isolated": False, "site_meters": 4, "site_power_losses": 3}
    assert orjson.loads(await db.fetchval("SELECT detail FROM events WHERE code = '002'")) == {}
    # Done once: nothing left to classify, nothing counted again.
    assert await classify_power_losses(db, T0 + 100 * H, FLAGS) == []


async def test_isolation_share_is_a_lower_bound(db: Conn) -> None:
    await add_meters(db, *[(m, "S") for m in ("A", "B", "C", "D", "E")])
    await event(db, "A", "001", T0)
    await event(db, "B", "001", T0 + 60 * S)
    await event(db, "C", "001", T0 + 120 * S)
    # For A: 2 of its 4 peers (B, C) lost power within the window. 2 >= 0.5 * 4: site-wide.
    # With a share of 0.6 (2.4 needed) it would be isolated.
    strict = dataclasses.replace(FLAGS, isolation_share=0.6)
    await classify_power_losses(db, T0 + H, strict, limit=1)
    assert (await power_losses(db))["A"] is True
    await classify_power_losses(db, T0 + H, FLAGS)
    assert await power_losses(db) == {"A": True, "B": False, "C": False}


async def test_two_instances_never_classify_or_count_the_same_event(db: Conn, db_url: str) -> None:
    meters = [(f"M{i}", f"SITE{i}") for i in range(6)]  # each alone: all isolated
    await add_meters(db, *meters)
    for meter, _ in meters:
        await event(db, meter, "001", T0)
    other: Conn = await asyncpg.connect(db_url)
    try:
        async with db.transaction():
            # Instance 1 has classified (and locked) two, not yet committed ...
            first = await classify_power_losses(db, T0 + H, FLAGS, limit=2)
            # ... instance 2 skips those and does the rest without waiting for the locks.
            second = await asyncio.wait_for(classify_power_losses(other, T0 + H, FLAGS), 10)
        third = await classify_power_losses(other, T0 + H, FLAGS)
    finally:
        await other.close()
    assert len(first) == 2
    assert len(second) == 4
    assert {c.meter_id for c in first} | {c.meter_id for c in second} == {m for m, _ in meters}
    assert third == []


async def test_monitor_sets_the_metrics(db_url: str, db: Conn) -> None:
    await add_meters(db, ("A", "S"), ("B", "S"), ("C", "S"), ("D", None))
    await heard(db, "A", T0 - H)
    await heard(db, "B", T0 - 3 * 24 * H)
    await heard(db, "C", T0 - 30 * 24 * H)
    await event(db, "D", "001", T0 - 2 * H)
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at)
           VALUES ('A', 0, 3, 4, 'open', $1)""",
        T0 - 5 * H,
    )
    for per_meter in (False, True):
        metrics = Metrics(CollectorRegistry())
        flags = dataclasses.replace(FLAGS, per_meter_metrics=per_meter)
        async with (
            Store(DatabaseConfig(url=db_url)) as store,
            HealthMonitor(flags, store=store, metrics=metrics, now=lambda: T0) as monitor,
        ):
            await monitor.refresh()
            classified = await monitor.classify()
            r = metrics.registry
            for flag in ("ok", "gray", "red", "never"):
                assert metric(r, "ingestd_meters", flag=flag) == 1, flag
            last_seen = r.get_sample_value("ingestd_meter_last_seen_timestamp_seconds", {"meter": "A"})
            assert last_seen == ((T0 - H).timestamp() if per_meter else None)
            assert r.get_sample_value("ingestd_meter_last_seen_timestamp_seconds", {"meter": "D"}) is None
            # Classified in the first round only, and counted there.
            assert metric(r, "ingestd_isolated_power_loss_total") == (0 if per_meter else 1)
            assert len(classified) == (0 if per_meter else 1)
        # Leaving the monitor unregisters the per-meter series.
        assert r.get_sample_value("ingestd_meter_last_seen_timestamp_seconds", {"meter": "A"}) is None


def test_flags_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"flags\.red_after_s"):
        load_config(env={"INGESTD_FLAGS_RED_AFTER_S": "3600"})
    with pytest.raises(ConfigError, match=r"flags\.isolation_share"):
        load_config(env={"INGESTD_FLAGS_ISOLATION_SHARE": "0"})
    config = load_config(
        env={"INGESTD_FLAGS_PER_METER_METRICS": "true", "INGESTD_FLAGS_GRAY_AFTER_S": "7200"}
    )
    assert config.flags.per_meter_metrics
    assert config.flags.gray_after_s == 7200
