"""The batch write's readings, on the real database: they go in through a temporary table
filled by binary COPY (``ingestd/store.py`` ``_insert_data``), and must come out as they
went in, with the order of the batch deciding between two readings for one interval."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from ingestd.envelope import Message, format_time, parse_body
from ingestd.store import Accept, Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

T0 = datetime(2026, 11, 24, tzinfo=UTC)


def accept(meter: str, seq: int, readings: list[dict[str, Any]]) -> Accept:
    body = {"v": 1, "meter": meter, "epoch": 0, "seq": seq, "sent": format_time(T0), "readings": readings}
    b = parse_body(orjson.dumps(body))
    message = Message(b.meter_id, b.epoch, b.seq, b.sent, b.replay, b.readings, b.events, b.digest, kid="k")
    return Accept(message, f"meters/{meter}/up", orjson.dumps(body), T0)


def at(minutes: int) -> str:
    return format_time(T0 - timedelta(minutes=minutes))


async def test_readings_are_stored_as_sent(store: Store, db: Conn) -> None:
    extra = {"phase": [1.5, None, "L1"], "nested": {"b": True, "a": {"deep": -1}}, "text": 'ü \\ "'}
    batch = [
        accept(
            "M1", 1, [{"t": at(30), "import_wh": 5, "export_wh": 0, **extra}, {"t": at(15), "import_wh": 7}]
        ),
        accept("M2", 1, [{"t": at(15), "import_wh": 2**63 - 1, "export_wh": 3}]),
    ]
    result = await store.write_batch(batch, [])
    assert result.readings_stored == 3
    rows = await db.fetch(
        "SELECT meter_id, time, import_wh, export_wh, extra::text, epoch, seq, received_at"
        " FROM readings ORDER BY meter_id, time"
    )
    assert [(*r[:4], r[4] and orjson.loads(r[4]), *r[5:]) for r in rows] == [
        ("M1", T0 - timedelta(minutes=30), 5, 0, extra, 0, 1, T0),
        ("M1", T0 - timedelta(minutes=15), 7, None, None, 0, 1, T0),
        ("M2", T0 - timedelta(minutes=15), 2**63 - 1, 3, None, 0, 1, T0),
    ]
    # jsonb, not text: the database reads its members.
    assert (
        await db.fetchval("SELECT extra->'nested'->'a'->>'deep' FROM readings WHERE extra IS NOT NULL")
        == "-1"
    )


async def test_the_first_reading_for_an_interval_in_a_batch_is_the_one_stored(store: Store, db: Conn) -> None:
    # Seqs 1..40 of one meter, every one with a reading for the same interval: the first wins,
    # as it would message by message, and each message's other reading is stored.
    batch = [
        accept("M1", seq, [{"t": at(1), "import_wh": seq}, {"t": at(100 + seq), "import_wh": 0}])
        for seq in range(1, 41)
    ]
    result = await store.write_batch(batch, [])
    assert result.readings_stored == 41
    assert await db.fetchval("SELECT import_wh FROM readings WHERE time = $1", T0 - timedelta(minutes=1)) == 1
    # A later batch stores only what is new: nothing of the earlier one is left over.
    later = await store.write_batch(
        [accept("M1", 41, [{"t": at(1), "import_wh": 99}, {"t": at(500), "import_wh": 1}])], []
    )
    assert later.readings_stored == 1
    assert await db.fetchval("SELECT import_wh FROM readings WHERE time = $1", T0 - timedelta(minutes=1)) == 1
    assert await db.fetchval("SELECT count(*) FROM readings") == 42
