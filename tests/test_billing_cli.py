"""``ingestd billing`` and ``ingestd meter set`` as operators run them: a subprocess on a
real database. The command goes by the database's clock, so the period is chosen from it:
``cycle_day`` is set so that the previous period ended less than four days ago."""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson
from test_billing import event, meter, series, store_readings
from test_cli import (
    EXIT_USAGE,
    aingestd,
    assert_ok,
    assert_one_line_error,
    cli_env,
    describe,
    es256_pem,
    write_key,
)

from ingestd.billing import CSV_COLUMNS, Period, cutoff, parse_period, period_containing, previous_period
from ingestd.config import BillingConfig

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

H = timedelta(hours=1)


async def recent_period(db: Conn) -> tuple[BillingConfig, Period]:
    now: datetime = await db.fetchval("SELECT now()")
    cfg = BillingConfig(cycle_day=min(now.day, 28))
    return cfg, previous_period(period_containing(now, cfg), cfg)


def env(db_url: str, cfg: BillingConfig, cutoff_days: int) -> dict[str, str]:
    return cli_env(
        db_url, INGESTD_BILLING_CYCLE_DAY=str(cfg.cycle_day), INGESTD_BILLING_CUTOFF_DAYS=str(cutoff_days)
    )


async def fleet(db: Conn, p: Period) -> None:
    """READY: every hour read. OPEN: its close reading has not arrived (the one after it
    has: estimated). PEND: nothing after the period. TAMP: a cover opened."""
    before = p.start - 30 * 24 * H
    for meter_id, site in (("READY", "S1"), ("OPEN", "S1"), ("PEND", "S2"), ("TAMP", "S2")):
        await meter(db, meter_id, site=site, interval_s=3600, registered_at=before)
    hourly = series(p.start, p.end, step=H)
    await store_readings(db, "READY", hourly)
    await store_readings(
        db, "OPEN", [r for r in hourly if r[0] != p.end] + [(p.end + H, hourly[-1][1] + 100)]
    )
    await store_readings(db, "PEND", hourly[:-1])
    await store_readings(db, "TAMP", hourly)
    await event(db, "TAMP", "003", p.start + 5 * H)


async def test_report_in_every_format(db: Conn, db_url: str) -> None:
    cfg, p = await recent_period(db)
    await fleet(db, p)
    e = env(db_url, cfg, 5)

    proc = await aingestd("billing", "report", "--period", p.name, "--format", "csv", env=e)
    assert_ok(proc)
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS
    table = [dict(zip(CSV_COLUMNS, r, strict=True)) for r in rows[1:]]
    # Most urgent first: pending, review, estimated, ready.
    assert [(r["meter_id"], r["status"]) for r in table] == [
        ("PEND", "pending"),
        ("TAMP", "review"),
        ("OPEN", "estimated"),
        ("READY", "ready"),
    ]
    hours = int((p.end - p.start) / H)
    ready = table[3]
    assert (ready["consumption_import_wh"], ready["expected"], ready["actual"]) == (
        str(hours * 100),
        str(hours),
        str(hours),
    )
    assert (ready["open_kind"], ready["close_kind"], ready["completeness_pct"]) == ("read", "read", "100.00")
    assert (table[0]["close_import_wh"], table[0]["close_kind"]) == ("", "missing")
    assert table[1]["flags"] == "tamper"
    assert len(table[2]["close_messages"].split()) == 2  # both readings the estimate used

    proc = await aingestd("billing", "report", "--period", p.name, "--format", "json", env=e)
    assert_ok(proc)
    doc = orjson.loads(proc.stdout)
    assert doc["period"] == p.name
    assert doc["closed"] is False
    assert doc["totals"]["overall"]["by_status"] == {"pending": 1, "review": 1, "estimated": 1, "ready": 1}
    assert doc["totals"]["sites"]["S1"]["meters"] == 2

    proc = await aingestd("billing", "report", "--period", p.name, env=e)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"period {p.name}: ")
    assert (
        f"cut-off {cutoff(p, BillingConfig(cycle_day=cfg.cycle_day, cutoff_days=5)).isoformat()}" in lines[0]
    )
    assert lines[1].split()[:3] == ["SITE", "METER", "STATUS"]
    assert [line.split()[1] for line in lines[2:6]] == ["PEND", "TAMP", "OPEN", "READY"]
    assert "site S1: 2 meters (0 pending, 0 review, 1 estimated, 1 ready)" in proc.stdout
    assert "all: 4 meters (1 pending, 1 review, 1 estimated, 1 ready)" in proc.stdout

    proc = await aingestd(
        "billing", "report", "--period", p.name, "--site", "S2", "--status", "review", env=e
    )
    assert_ok(proc)
    assert [line.split()[1] for line in proc.stdout.splitlines()[2:-3]] == ["TAMP"], describe(proc)


async def test_bad_input_is_one_line_and_exit_2(db: Conn, db_url: str) -> None:
    cfg, p = await recent_period(db)
    await fleet(db, p)
    e = env(db_url, cfg, 5)
    cases = [
        (("billing", "report", "--period", "2026-13"), "expected YYYY-MM"),
        (("billing", "report", "--period", "11/2026"), "expected YYYY-MM"),
        (("billing", "report", "--period", "2999-01"), "in the future"),
        (("billing", "report", "--period", p.name, "--site", "NOWHERE"), "--site 'NOWHERE'"),
        (("billing", "close", "--period", "2999-01"), "in the future"),
        (("billing", "adjustments", "--period", p.name), "not closed"),
        (("meter", "set", "NOSUCH", "--max-power-w", "5000"), "no such meter"),
        (("meter", "set", "READY", "--max-power-w", "-1"), "--max-power-w"),
    ]
    for args, needle in cases:
        assert_one_line_error(await aingestd(*args, env=e), EXIT_USAGE, needle)
    current = period_containing(p.end, cfg)
    assert_one_line_error(
        await aingestd("billing", "close", "--period", current.name, "--force", env=e),
        EXIT_USAGE,
        "not over yet",
    )
    assert await db.fetchval("SELECT count(*) FROM billing_statements") == 0


async def test_close_then_adjustments(db: Conn, db_url: str) -> None:
    cfg, p = await recent_period(db)
    await fleet(db, p)
    # Before the cut-off: only with --force.
    early = env(db_url, cfg, 5)
    assert_one_line_error(
        await aingestd("billing", "close", "--period", p.name, env=early), EXIT_USAGE, "--force"
    )
    assert await db.fetchval("SELECT count(*) FROM billing_statements") == 0
    proc = await aingestd("billing", "close", "--period", p.name, "--force", env=early)
    assert_ok(proc)
    assert proc.stdout.strip() == (
        f"period {p.name} closed: 4 statements (1 pending, 1 review, 1 estimated, 1 ready)"
    )
    # Once the cut-off has passed no --force is needed, but a second close is refused.
    late = env(db_url, cfg, 0)
    assert_one_line_error(
        await aingestd("billing", "close", "--period", p.name, env=late), EXIT_USAGE, "already closed"
    )
    digests = await db.fetch("SELECT meter_id, digest FROM billing_statements ORDER BY meter_id")
    stored = await db.fetchrow("SELECT statement, digest FROM billing_statements WHERE meter_id = 'READY'")
    assert stored is not None
    doc = orjson.loads(stored["statement"])
    assert hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest() == stored["digest"]

    proc = await aingestd("billing", "adjustments", "--period", p.name, env=late)
    assert_ok(proc)
    assert proc.stdout.strip() == "no adjustments"
    # The pending meter's close reading arrives from flash, after the close.
    [(_, wh, seq)] = await store_readings(
        db, "PEND", [(p.end, 1_000_000 + int((p.end - p.start) / H) * 100)], replay=True
    )
    proc = await aingestd("billing", "adjustments", "--period", p.name, "--json", env=late)
    assert_ok(proc)
    found = {a["field"]: a for a in orjson.loads(proc.stdout)}
    assert set(found) == {"close_import_wh", "consumption_import_wh", "status"}
    assert (found["close_import_wh"]["old_value"], found["close_import_wh"]["new_value"]) == (None, str(wh))
    assert found["close_import_wh"]["caused_by"][0]["seq"] == seq
    assert (found["status"]["old_value"], found["status"]["new_value"]) == ("pending", "ready")
    proc = await aingestd("billing", "report", "--period", p.name, env=late)
    assert_ok(proc)
    assert "(closed)" in proc.stdout.splitlines()[0]
    assert f"3 adjustment(s) to re-bill: ingestd billing adjustments --period {p.name}" in proc.stdout
    proc = await aingestd("billing", "adjustments", "--mark-billed", env=late)
    assert_ok(proc)
    assert await db.fetchval("SELECT count(*) FROM billing_adjustments WHERE billed_at IS NULL") == 0
    proc = await aingestd("billing", "report", "--period", p.name, env=late)
    assert "to re-bill" not in proc.stdout
    # Nothing rewrote the closed statements.
    assert await db.fetch("SELECT meter_id, digest FROM billing_statements ORDER BY meter_id") == digests


async def test_meter_max_power(db: Conn, db_url: str, tmp_path: Path) -> None:
    e = cli_env(db_url)
    key = write_key(tmp_path / "k.pem", es256_pem())
    args = ("meter", "add", "M-1", "--alg", "ES256", "--kid", "M-1-k", "--key", key, "--max-power-w", "11000")
    assert_ok(await aingestd(*args, env=e))
    assert await db.fetchval("SELECT max_power_w FROM meters WHERE meter_id = 'M-1'") == 11000
    proc = await aingestd("meter", "set", "M-1", "--max-power-w", "23000", env=e)
    assert_ok(proc)
    assert proc.stdout.strip() == "meter M-1: max power 23000 W"
    assert await db.fetchval("SELECT max_power_w FROM meters WHERE meter_id = 'M-1'") == 23000
    assert_ok(await aingestd("meter", "set", "M-1", "--max-power-w", "none", env=e))
    assert await db.fetchval("SELECT max_power_w FROM meters WHERE meter_id = 'M-1'") is None


def test_period_of_the_cli_helpers_agree() -> None:
    cfg = BillingConfig(cycle_day=28)
    p = parse_period("2026-10", cfg)
    assert previous_period(period_containing(p.end, cfg), cfg) == p
