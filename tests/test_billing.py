"""Billing statements on the real database, with an injected clock: complete months,
interior gaps, missing boundaries, every flag, DST, mid-period registration, closing a
period and the adjustments that later data causes."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from helpers import metric
from ingestd.billing import (
    Statement,
    close_period,
    compute_statements,
    interpolate,
    list_adjustments,
    parse_period,
    record_adjustments,
)
from ingestd.config import BillingConfig, DatabaseConfig, FlagsConfig
from ingestd.health import HealthMonitor
from ingestd.metrics import Metrics
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

CFG = BillingConfig()
OCT = parse_period("2026-10", CFG)
AS_OF = datetime(2026, 11, 10, tzinfo=UTC)
RETENTION = timedelta(days=90)
Q = timedelta(minutes=15)
# Registered long before October, unless a test says otherwise.
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
_seqs = itertools.count(1)


async def meter(
    db: Conn,
    meter_id: str,
    *,
    site: str = "S1",
    interval_s: int = 900,
    registered_at: datetime = LONG_AGO,
    max_power_w: int | None = None,
) -> None:
    await db.execute(
        """INSERT INTO meters (meter_id, site, interval_s, registered_at, max_power_w)
           VALUES ($1, $2, $3, $4, $5)""",
        meter_id,
        site,
        interval_s,
        registered_at,
        max_power_w,
    )


async def store_readings(
    db: Conn,
    meter_id: str,
    rows: Iterable[tuple[datetime, int]],
    *,
    epoch: int = 0,
    seqs: Iterable[int] | None = None,
    replay: bool = False,
    export: bool = False,
) -> list[tuple[datetime, int, int]]:
    """Readings as the batch writer stores them (one per message), with their raw
    message's replay flag; returns (time, import, seq)."""
    rows = list(rows)
    seq_list = list(seqs) if seqs is not None else [next(_seqs) for _ in rows]
    records = [
        (meter_id, t, wh, wh // 10 if export else None, epoch, s, t + timedelta(seconds=5))
        for (t, wh), s in zip(rows, seq_list, strict=True)
    ]
    await db.copy_records_to_table(
        "readings",
        records=records,
        columns=("meter_id", "time", "import_wh", "export_wh", "epoch", "seq", "received_at"),
    )
    await db.copy_records_to_table(
        "raw_messages",
        records=[
            (meter_id, epoch, s, t + timedelta(seconds=5), t, replay, "k", "t", b"x")
            for (t, _), s in zip(rows, seq_list, strict=True)
        ],
        columns=("meter_id", "epoch", "seq", "received_at", "sent", "replay", "kid", "topic", "payload"),
    )
    return [(t, wh, s) for (t, wh), s in zip(rows, seq_list, strict=True)]


def series(
    start: datetime, end: datetime, *, step: timedelta = Q, base: int = 1_000_000, per: int = 100
) -> list[tuple[datetime, int]]:
    """Readings every ``step`` from ``start`` to ``end`` inclusive, ``per`` Wh each."""
    out = []
    t, wh = start, base
    while t <= end:
        out.append((t, wh))
        t += step
        wh += per
    return out


async def event(db: Conn, meter_id: str, code: str, at: datetime, detail: str = "{}") -> None:
    await db.execute(
        """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
           VALUES ($1, $2, $3, $4::jsonb, 0, $5, $2)""",
        meter_id,
        at,
        code,
        detail,
        next(_seqs),
    )


async def gap(db: Conn, meter_id: str, from_seq: int, to_seq: int, status: str, epoch: int = 0) -> None:
    closed = AS_OF if status in {"filled", "lost"} else None
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, closed_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        meter_id,
        epoch,
        from_seq,
        to_seq,
        status,
        OCT.start,
        closed,
    )


async def statements(
    db: Conn, *, as_of: datetime = AS_OF, retention: timedelta = RETENTION, period: object = OCT
) -> dict[str, Statement]:
    p = OCT if period is OCT else period
    assert hasattr(p, "name")
    found = await compute_statements(db, p, as_of=as_of, retention=retention)  # type: ignore[arg-type]
    return {s.meter_id: s for s in found}


async def test_a_complete_month(db: Conn) -> None:
    await meter(db, "A")
    stored = await store_readings(db, "A", series(OCT.start, OCT.end), export=True)
    s = (await statements(db))["A"]
    assert s.status == "ready"
    assert (s.open.kind, s.close.kind) == ("read", "read")
    assert s.open.import_wh == 1_000_000
    assert s.close.import_wh == 1_000_000 + 2976 * 100
    assert s.consumption_import_wh == 297_600
    assert s.consumption_export_wh == s.close.export_wh - s.open.export_wh == 29_760  # type: ignore[operator]
    assert (s.expected, s.actual, s.replayed, s.missing_recoverable, s.missing_lost, s.power_off) == (
        2976, 2976, 0, 0, 0, 0,
    )  # fmt: skip
    assert s.flags == {}
    assert s.completeness == 100.0
    # The messages that carried the boundary readings.
    assert [r["seq"] for r in s.open.readings] == [stored[0][2]]
    assert [r["seq"] for r in s.close.readings] == [stored[-1][2]]
    assert len(s.digest()) == 32


async def test_interior_gaps_leave_consumption_and_count_what_is_missing(db: Conn) -> None:
    await meter(db, "G")
    rows = series(OCT.start, OCT.end)
    seqs = list(range(1, len(rows) + 1))
    # Three holes: one being chased (a requested gap), one the meter said is gone (lost),
    # and one early in the month that is being chased but older than a short retention.
    requested = set(range(1000, 1010))
    lost = set(range(2000, 2004))
    early = set(range(100, 103))
    keep = [i for i in range(len(rows)) if i not in requested | lost | early]
    await store_readings(db, "G", [rows[i] for i in keep], seqs=[seqs[i] for i in keep])
    await gap(db, "G", 1001, 1010, "requested")  # seqs are index + 1
    await gap(db, "G", 2001, 2004, "lost")
    await gap(db, "G", 101, 103, "open")
    s = (await statements(db))["G"]
    assert s.consumption_import_wh == 297_600  # unchanged: the boundaries are read
    assert s.status == "ready"
    assert (s.actual, s.missing_recoverable, s.missing_lost, s.power_off) == (2976 - 17, 13, 4, 0)
    assert s.completeness == pytest.approx(100 * (2976 - 17) / 2976)
    # With a flash retention of 30 days as of 10 November, the early hole (1-2 October) can
    # no longer be replayed: it is lost although its gap is still open.
    short = (await statements(db, retention=timedelta(days=30)))["G"]
    assert (short.missing_recoverable, short.missing_lost) == (10, 7)
    # A hole with no gap at all: the seqs are all there, the intervals were never metered.
    await meter(db, "H")
    await store_readings(db, "H", [r for r in rows if r[0] != OCT.start + 5 * Q])
    h = (await statements(db))["H"]
    assert (h.missing_recoverable, h.missing_lost, h.consumption_import_wh) == (0, 1, 297_600)


async def test_missing_close_with_both_neighbours_is_interpolated(db: Conn) -> None:
    await meter(db, "E")
    rows = series(OCT.start, OCT.end + 2 * Q)
    # The close reading is missing; the ones around it are uneven, so the line matters.
    before = (OCT.end - Q, 5_000_001)
    after = (OCT.end + Q, 5_000_250)
    rows = [r for r in rows if r[0] < OCT.end - Q] + [before, after]
    # Rebase so that the registers keep growing up to the bracketing ones.
    rows = [(t, wh if t >= OCT.end - Q else 4_000_000 + i) for i, (t, wh) in enumerate(rows)]
    await store_readings(db, "E", rows)
    s = (await statements(db))["E"]
    assert s.close.kind == "estimated"
    expected = interpolate(OCT.end, before, after)
    assert expected == 5_000_126  # 5,000,001 + 249 / 2 = 5,000,125.5, rounded half up
    assert s.close.import_wh == expected
    assert [(r["time"], r["import_wh"]) for r in s.close.readings] == [
        (before[0].isoformat(), before[1]),
        (after[0].isoformat(), after[1]),
    ]
    assert s.status == "estimated"
    assert s.consumption_import_wh == expected - 4_000_000


async def test_missing_close_with_one_neighbour_is_pending(db: Conn) -> None:
    await meter(db, "P")
    await store_readings(db, "P", series(OCT.start, OCT.end - Q))
    s = (await statements(db))["P"]
    assert (s.close.kind, s.status, s.consumption_import_wh) == ("missing", "pending", None)
    assert len(s.close.readings) == 1  # the one side there is
    # Nothing was heard after it: the meter may still send the last interval.
    assert (s.missing_recoverable, s.missing_lost) == (1, 0)
    # A meter with no readings at all in or around the period.
    await meter(db, "SILENT")
    silent = (await statements(db))["SILENT"]
    assert (silent.open.kind, silent.close.kind, silent.status) == ("missing", "missing", "pending")
    assert silent.missing_recoverable == 2976


async def test_replayed_readings_are_counted_apart(db: Conn) -> None:
    await meter(db, "R")
    rows = series(OCT.start, OCT.end)
    await store_readings(db, "R", rows[:100] + rows[110:])
    await store_readings(db, "R", rows[100:110], replay=True)
    s = (await statements(db))["R"]
    assert (s.actual, s.replayed, s.status) == (2966, 10, "ready")


async def test_a_gap_filled_after_the_close_is_an_adjustment(db: Conn) -> None:
    await meter(db, "F")
    rows = series(OCT.start, OCT.end + Q)
    close_row = next(r for r in rows if r[0] == OCT.end)
    await store_readings(db, "F", [r for r in rows if r is not close_row])
    await meter(db, "OK")
    await store_readings(db, "OK", series(OCT.start, OCT.end))
    live = await compute_statements(db, OCT, as_of=AS_OF, retention=RETENTION)
    assert await close_period(db, OCT, live) == 2
    frozen = await db.fetchrow("SELECT * FROM billing_statements WHERE meter_id = 'F'")
    assert frozen is not None
    assert frozen["status"] == "estimated"
    # Closing twice is refused, and nothing changes.
    with pytest.raises(Exception, match="already closed"):
        await close_period(db, OCT, live)
    # Nothing changed yet: no adjustment.
    assert (
        await record_adjustments(db, OCT, await compute_statements(db, OCT, as_of=AS_OF, retention=RETENTION))
        == 0
    )
    # The replay brings the real close reading, 7 Wh off the interpolated line.
    late = (close_row[0], close_row[1] + 7)
    [(_, _, seq)] = await store_readings(db, "F", [late], replay=True)
    after = await compute_statements(db, OCT, as_of=AS_OF, retention=RETENTION)
    assert await record_adjustments(db, OCT, after) == 3
    assert await record_adjustments(db, OCT, after) == 0  # recorded once
    adjustments = {a.field: a for a in await list_adjustments(db, OCT)}
    assert set(adjustments) == {"close_import_wh", "consumption_import_wh", "status"}
    close_adj = adjustments["close_import_wh"]
    assert (close_adj.old_value, close_adj.new_value) == (str(frozen["close_import_wh"]), str(late[1]))
    assert close_adj.caused_by == [{"meter": "F", "epoch": 0, "seq": seq, "time": late[0].isoformat()}]
    assert (adjustments["status"].old_value, adjustments["status"].new_value) == ("estimated", "ready")
    # The closed statement is untouched, and cannot be touched.
    again = await db.fetchrow("SELECT * FROM billing_statements WHERE meter_id = 'F'")
    assert dict(again) == dict(frozen)  # type: ignore[arg-type]
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("UPDATE billing_statements SET close_import_wh = 0 WHERE meter_id = 'F'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("DELETE FROM billing_statements")


async def test_rollback_spike_tamper_clock_and_profile(db: Conn) -> None:
    rows = series(OCT.start, OCT.end)
    # Rollback: one register lower than the one before it.
    await meter(db, "ROLL")
    await store_readings(db, "ROLL", [(t, wh - 500 if i == 50 else wh) for i, (t, wh) in enumerate(rows)])
    # Spike: 4 kW service, 15 minutes = 1,000 Wh at most; one interval uses 1,500.
    await meter(db, "SPIKE", max_power_w=4000)
    await store_readings(db, "SPIKE", [(t, wh + (1400 if i >= 70 else 0)) for i, (t, wh) in enumerate(rows)])
    # Tamper: a cover opened in the period (and one before it, not listed).
    await meter(db, "TAMP")
    await store_readings(db, "TAMP", rows)
    await event(db, "TAMP", "003", OCT.start + 40 * Q)
    await event(db, "TAMP", "004", OCT.start + 41 * Q)
    await event(db, "TAMP", "003", OCT.start - Q)
    # Clock: an adjustment event, and one reading off the grid (which the profile check sees).
    await meter(db, "CLK")
    await store_readings(db, "CLK", rows)
    await event(db, "CLK", "009", OCT.start + 3 * Q)
    await meter(db, "GRID")
    await store_readings(db, "GRID", rows)
    await store_readings(db, "GRID", [(OCT.start + 10 * Q + timedelta(minutes=7), rows[10][1] + 40)])
    found = await statements(db)

    roll = found["ROLL"]
    assert roll.status == "review"
    assert roll.flags["rollback"]["count"] == 1
    assert roll.flags["rollback"]["first"] == rows[50][0].isoformat()
    spike = found["SPIKE"]
    assert spike.status == "review"
    assert spike.flags["spike"] == {
        "count": 1, "first": rows[70][0].isoformat(), "largest_wh": 1500, "max_power_w": 4000,
    }  # fmt: skip
    tamper = found["TAMP"]
    assert tamper.status == "review"
    assert tamper.flags["tamper"] == [
        {"code": "003", "time": (OCT.start + 40 * Q).isoformat()},
    ]
    clock = found["CLK"]
    assert clock.status == "ready"  # the clock flag informs; the register readings stand
    assert clock.flags["clock"] == {"adjusted": [(OCT.start + 3 * Q).isoformat()]}
    grid = found["GRID"]
    assert grid.flags["clock"]["off_grid"] == 1
    assert grid.actual == 2976  # the off-grid reading is not an interval
    assert grid.flags["profile_mismatch"] == {"profile_wh": 297_600 - 100, "register_wh": 297_600}
    assert grid.status == "review"
    assert grid.consumption_import_wh == 297_600
    # Meters with none of this have no flags.
    await meter(db, "PLAIN", max_power_w=4000)
    await store_readings(db, "PLAIN", rows)
    assert (await statements(db))["PLAIN"].flags == {}


async def test_power_off_intervals_are_not_missing(db: Conn) -> None:
    await meter(db, "PWR")
    rows = series(OCT.start, OCT.end)
    # No power from 10:07 to 11:02 on 2 October: interval ends 10:15 to 11:00 (four) unread.
    lost_at = datetime(2026, 10, 2, 10, 7, tzinfo=UTC)
    restored_at = datetime(2026, 10, 2, 11, 2, tzinfo=UTC)
    off = [r for r in rows if lost_at < r[0] <= restored_at]
    assert len(off) == 4
    kept = [r for r in rows if r not in off]
    stored = await store_readings(db, "PWR", kept)
    await event(db, "PWR", "001", lost_at, '{"isolated": true}')
    await event(db, "PWR", "002", restored_at)
    s = (await statements(db))["PWR"]
    assert (s.power_off, s.missing_recoverable, s.missing_lost, s.status) == (4, 0, 0, "ready")
    assert s.flags["power_loss"] == {"count": 1, "minutes": 55.0, "isolated": 1, "site_wide": 0}
    assert s.completeness == 100.0
    assert stored


async def test_a_period_across_dst_in_berlin(db: Conn) -> None:
    berlin = BillingConfig(timezone="Europe/Berlin")
    october = parse_period("2026-10", berlin)
    await meter(db, "DST", interval_s=3600)
    await store_readings(db, "DST", series(october.start, october.end, step=timedelta(hours=1)))
    [s] = await compute_statements(db, october, as_of=AS_OF, retention=RETENTION)
    # 31 days and the hour given back on 25 October.
    assert (s.expected, s.actual, s.status) == (745, 745, "ready")
    assert s.consumption_import_wh == 745 * 100
    assert s.start == datetime(2026, 9, 30, 22, tzinfo=UTC)


async def test_a_meter_registered_mid_period(db: Conn) -> None:
    registered = datetime(2026, 10, 10, 12, 5, tzinfo=UTC)
    first_grid = datetime(2026, 10, 10, 12, 15, tzinfo=UTC)
    # One that reports from its first interval on, one that started 45 minutes later.
    await meter(db, "NEW", registered_at=registered)
    await store_readings(db, "NEW", series(first_grid, OCT.end))
    await meter(db, "LATE", registered_at=registered)
    await store_readings(db, "LATE", series(first_grid + 3 * Q, OCT.end))
    # Registered after the period: not in it.
    await meter(db, "NOVEMBER", registered_at=OCT.end + Q)
    found = await statements(db)
    assert "NOVEMBER" not in found
    new, late = found["NEW"], found["LATE"]
    expected = int((OCT.end - first_grid) / Q)
    assert (new.start, new.expected, new.actual, new.open.kind, new.status) == (
        first_grid, expected, expected, "read", "ready",
    )  # fmt: skip
    assert new.consumption_import_wh == expected * 100
    assert (late.open.kind, late.status, late.expected, late.actual, late.missing_lost) == (
        "first_read", "ready", expected, expected - 2, 2,  # 12:30 and 12:45 never came
    )  # fmt: skip
    assert late.open.import_wh == 1_000_000


async def test_meters_by_site_and_current_period(db: Conn) -> None:
    await meter(db, "A1", site="S1")
    await meter(db, "B1", site="S2")
    await store_readings(db, "A1", series(OCT.start, OCT.end))
    only = await compute_statements(db, OCT, as_of=AS_OF, retention=RETENTION, site="S2")
    assert [s.meter_id for s in only] == ["B1"]
    # The current period, half-way: the close is not due yet, so it is pending.
    nov = parse_period("2026-11", CFG)
    mid = nov.start + timedelta(days=15)
    await store_readings(db, "A1", series(nov.start + Q, mid))
    a1 = (await statements(db, as_of=mid, period=nov))["A1"]
    assert (a1.open.kind, a1.close.kind, a1.status) == ("read", "missing", "pending")
    assert a1.actual == 15 * 96


async def test_health_refresh_exports_billing_gauges_and_records_adjustments(db: Conn, db_url: str) -> None:
    await meter(db, "A")
    await meter(db, "B")
    await store_readings(db, "A", series(OCT.start, OCT.end + 4 * Q))
    await store_readings(db, "B", series(OCT.start, OCT.end - Q))  # pending: no close yet
    clock = [datetime(2026, 11, 2, tzinfo=UTC)]
    metrics = Metrics()
    async with Store(DatabaseConfig(url=db_url)) as store:
        monitor = HealthMonitor(
            FlagsConfig(), store=store, metrics=metrics, now=lambda: clock[0], billing=CFG, retention_days=90
        )
        counts = await monitor.refresh_billing()
        assert counts["2026-10"] == {"pending": 1, "review": 0, "estimated": 0, "ready": 1}
        assert counts["2026-11"]["pending"] == 2  # the current period: not over
        reg = metrics.registry
        assert metric(reg, "ingestd_billing_meters", period="2026-10", status="pending") == 1
        assert metric(reg, "ingestd_billing_meters", period="2026-10", status="ready") == 1
        assert (
            metric(reg, "ingestd_billing_period_end_timestamp_seconds", period="2026-10")
            == OCT.end.timestamp()
        )
        assert (
            metric(reg, "ingestd_billing_cutoff_timestamp_seconds", period="2026-10")
            == (OCT.end + timedelta(days=3)).timestamp()
        )
        assert metric(reg, "ingestd_billing_adjustments_pending") == 0
        # October is closed; then B's close reading arrives: the next refresh records it.
        async with store.connection() as conn:
            await close_period(
                conn, OCT, await compute_statements(conn, OCT, as_of=clock[0], retention=RETENTION)
            )
        await store_readings(db, "B", [(OCT.end, 1_000_000 + 2976 * 100)], replay=True)
        clock[0] = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
        counts = await monitor.refresh_billing()
        assert set(counts) == {"2026-11", "2026-12"}
        assert metric(reg, "ingestd_billing_adjustments_pending") == 3
        # October is neither current nor previous any more: its series are gone.
        assert (
            reg.get_sample_value("ingestd_billing_meters", {"period": "2026-10", "status": "ready"}) is None
        )
        assert reg.get_sample_value("ingestd_billing_cutoff_timestamp_seconds", {"period": "2026-10"}) is None
