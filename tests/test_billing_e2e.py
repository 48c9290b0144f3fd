"""Billing end to end: the simulator's fleet, with lost uplinks, forgotten flash, power
outages and tamper events, meters a (time-compressed) month through the real broker and
daemon; `ingestd billing report` must match a computation made here from the signed raw
messages alone (JWS payloads decoded by this test, not by ingestd)."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import orjson
import pytest
from test_backfill import fleet_client, headend, poll, with_gaps
from test_cli import aingestd, assert_ok, cli_env

from conftest import running_daemon
from ingestd.config import Config, HeadendConfig
from ingestd.simulator import Faults, HeadendKey, KeyFactory, build_fleet, register_fleet
from ingestd.store import Store

__all__ = ["headend"]  # the fixture, imported for this module's tests

START = datetime(2026, 10, 1, tzinfo=UTC)
END = datetime(2026, 11, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
TAMPER = {"003", "005", "007", "011", "013", "014", "015"}


def decode(payload: bytes) -> dict[str, Any]:
    """The body of a flattened JWS, by hand: base64url of the `payload` member."""
    envelope = json.loads(payload)
    b64 = envelope["payload"]
    body: dict[str, Any] = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
    return body


def when(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def on_line(t: datetime, a: tuple[datetime, int], b: tuple[datetime, int]) -> int:
    """The register at t between two readings, rounded half up, in exact fractions."""
    value = a[1] + Fraction(b[1] - a[1]) * Fraction(
        int((t - a[0]).total_seconds()), int((b[0] - a[0]).total_seconds())
    )
    floor = value.numerator // value.denominator
    return floor + (1 if value - floor >= Fraction(1, 2) else 0)


def expected_statement(messages: list[dict[str, Any]], as_of: datetime) -> dict[str, Any]:
    """One meter's statement for October, from its signed messages."""
    readings: dict[datetime, tuple[int, int | None, bool]] = {}
    events: list[tuple[datetime, str]] = []
    for body in messages:
        for r in body.get("readings", []):
            readings[when(r["t"])] = (r["import_wh"], r.get("export_wh"), bool(body.get("replay")))
        events.extend((when(e["t"]), e["code"]) for e in body.get("events", []))
    times = sorted(readings)

    def boundary(at: datetime) -> tuple[str, int | None, int | None]:
        if at in readings:
            return "read", readings[at][0], readings[at][1]
        before = [t for t in times if t < at]
        after = [t for t in times if t > at]
        if not before or not after:
            return "missing", None, None
        a, b = before[-1], after[0]
        imp = on_line(at, (a, readings[a][0]), (b, readings[b][0]))
        exp_a, exp_b = readings[a][1], readings[b][1]
        exp = on_line(at, (a, exp_a), (b, exp_b)) if exp_a is not None and exp_b is not None else None
        return "estimated", imp, exp

    open_, close = boundary(START), boundary(END)
    grid = [START + i * HOUR for i in range(1, 745)]
    read = [t for t in grid if t in readings]
    losses = sorted(t for t, c in events if c == "001")
    restores = sorted(t for t, c in events if c == "002")
    outages = [(lost, next((r for r in restores if r >= lost), as_of)) for lost in losses]
    unread = [t for t in grid if t not in readings]
    power_off = [t for t in unread if any(a < t <= b for a, b in outages)]
    tamper = [(t, c) for t, c in sorted(events) if c in TAMPER and START < t <= END]
    kinds = (open_[0], close[0])
    status = (
        "pending"
        if "missing" in kinds
        else "review"
        if tamper
        else "estimated"
        if "estimated" in kinds
        else "ready"
    )
    return {
        "status": status,
        "open_import_wh": open_[1],
        "close_import_wh": close[1],
        "open_export_wh": open_[2],
        "close_export_wh": close[2],
        "consumption_import_wh": None if None in (open_[1], close[1]) else close[1] - open_[1],  # type: ignore[operator]
        "expected": 744,
        "actual": sum(not readings[t][2] for t in read),
        "replayed": sum(readings[t][2] for t in read),
        "power_off": len(power_off),
        "missing": len(unread) - len(power_off),
        "tamper": [{"code": c, "time": t.isoformat()} for t, c in tamper],
        "open_kind": kinds[0],
        "close_kind": kinds[1],
    }


@pytest.mark.slow
async def test_report_matches_the_signed_messages(
    config: Config,
    store: Store,
    db: asyncpg.Connection[asyncpg.Record],
    db_url: str,
    key_factory: KeyFactory,
    headend: tuple[HeadendConfig, HeadendKey],
) -> None:
    cfg = with_gaps(config, headend[0])
    meters = build_fleet(
        8, prefix="BL-", algs=("ES256", "EdDSA"), interval_s=3600, per_site=4, keys=key_factory
    )
    await register_fleet(store, meters)
    # Installed long before October (the test registers them today).
    await db.execute("UPDATE meters SET registered_at = $1", START - 30 * 24 * HOUR)
    faults = Faults(drop=0.03, forget=0.3, tamper=0.002)
    async with running_daemon(cfg), fleet_client(cfg, meters, headend[1], faults) as fleet:
        # The month, compressed: each meter meters every hour of it (and a little either
        # side) as fast as the broker takes it, its clock injected.
        t = START - 2 * HOUR + timedelta(seconds=30)
        while t < END + 3 * HOUR:
            for meter in meters:
                await fleet.tick(meter, event_rate=0.02, now=t)
            t += HOUR
        # A last message from each, never lost: a gap at the end shows only when a later
        # seq arrives.
        fleet.faults = Faults()
        for meter in meters:
            await fleet.tick(meter, now=t)
        expected_keys = {(m.meter_id, 0, s) for m in meters for s in range(1, m.seq + 1)}
        await poll(db, expected_keys, within_s=120)
    assert fleet.stats.dropped > 0, "the test must lose messages"
    assert fleet.stats.replayed > 0, "and get some back from flash"
    assert await db.fetchval("SELECT count(*) FROM gaps WHERE status = 'lost'") > 0

    proc = await aingestd("billing", "report", "--period", "2026-10", "--format", "json", env=cli_env(db_url))
    assert_ok(proc)
    report = orjson.loads(proc.stdout)
    as_of = datetime.fromisoformat(report["as_of"])
    by_meter: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await db.fetch("SELECT meter_id, payload FROM raw_messages"):
        by_meter[row["meter_id"]].append(decode(row["payload"]))
    got = {s["meter_id"]: s for s in report["statements"]}
    assert set(got) == {m.meter_id for m in meters}
    for meter_id, s in got.items():
        want = expected_statement(by_meter[meter_id], as_of)
        have = {
            "status": s["status"],
            "open_import_wh": s["open_import_wh"],
            "close_import_wh": s["close_import_wh"],
            "open_export_wh": s["open_export_wh"],
            "close_export_wh": s["close_export_wh"],
            "consumption_import_wh": s["consumption_import_wh"],
            "expected": s["expected"],
            "actual": s["actual"],
            "replayed": s["replayed"],
            "power_off": s["power_off"],
            # Every gap is closed (filled or lost): nothing is still recoverable.
            "missing": s["missing_lost"] + s["missing_recoverable"],
            "tamper": s["flags"].get("tamper", []),
            "open_kind": s["open_source"]["kind"],
            "close_kind": s["close_source"]["kind"],
        }
        assert have == want, meter_id
        assert s["missing_recoverable"] == 0, meter_id
    assert sum(s["replayed"] for s in got.values()) > 0
    assert sum(s["actual"] for s in got.values()) > 0
    totals = report["totals"]["overall"]
    assert totals["meters"] == len(meters)
    assert sum(totals["by_status"].values()) == len(meters)
