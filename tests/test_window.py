"""What one message can touch, through the real broker, daemon and database.

Readings and events must lie within the data window of their message's `sent` (from
`ingest.max_data_age_days` before it to `ingest.max_clock_skew_s` after it), and `sent`
at most `ingest.max_data_age_days` before the receive time. Without them, a stolen key
made a hypertable chunk per reading (issue 9, defect 4); with them, one message touches
at most the chunks its window spans, which docs/security.md states and the first test
reaches, and all messages together only chunks of the last 200 days. Honest replays from
flash, and redeliveries of old bytes, are stored. A rejected message's topic is cut
before the quarantine and the log (defect 8).
"""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
import structlog

from conftest import running_daemon
from helpers import metric, publish, wait_settled
from ingestd.config import Config
from ingestd.envelope import TOPIC_SHOWN_MAX, format_time, shown_topic
from ingestd.signature import Signer, generate_private_key, public_key_pem
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture
async def meter(store: Store) -> Signer:
    signer = Signer("ES256", "WIN-1-k1", generate_private_key("ES256"))
    await store.add_meter(
        "WIN-1",
        alg="ES256",
        kid=signer.kid,
        public_key_pem=public_key_pem(signer.key.public_key()).decode("ascii"),
        site="WIN",
        interval_s=900,
    )
    return signer


def body(seq: int, sent: datetime, readings: list[datetime], events: list[datetime], **more: Any) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "meter": "WIN-1",
            "epoch": 0,
            "seq": seq,
            "sent": format_time(sent),
            "readings": [{"t": format_time(t), "import_wh": 1000 + i} for i, t in enumerate(readings)],
            "events": [{"t": format_time(t), "code": "001"} for t in events],
            **more,
        }
    )


def window(config: Config) -> tuple[timedelta, timedelta]:
    """How far before and after `sent` a reading or event may lie."""
    return timedelta(days=config.ingest.max_data_age_days), timedelta(seconds=config.ingest.max_clock_skew_s)


async def chunk_intervals(db: Conn) -> dict[str, timedelta]:
    rows = await db.fetch(
        """SELECT hypertable_name::text AS name, time_interval FROM timescaledb_information.dimensions
           WHERE hypertable_name IN ('readings', 'events')"""
    )
    return {r["name"]: r["time_interval"] for r in rows}


async def chunks(db: Conn) -> dict[str, int]:
    rows = await db.fetch(
        """SELECT hypertable_name::text AS name, count(*) AS n FROM timescaledb_information.chunks
           GROUP BY hypertable_name"""
    )
    return {r["name"]: r["n"] for r in rows}


def most_chunks(span: timedelta, interval: timedelta) -> int:
    """The most chunks of ``interval`` that a closed time range of length ``span`` meets."""
    return span // interval + 1 + (1 if span % interval else 0)


async def test_one_message_touches_at_most_the_chunks_its_window_spans(
    config: Config, meter: Signer, db: Conn
) -> None:
    """The worst case of docs/security.md, reached: for each hypertable, a message whose
    readings (or events) cover its whole window, placed so that the window meets as many
    chunks as it can: it starts an hour before a chunk boundary (TimescaleDB aligns chunks
    to the Unix epoch), as late as lets its sent be in the past."""
    max_age, max_ahead = window(config)
    span = max_age + max_ahead
    intervals = await chunk_intervals(db)
    lead = timedelta(hours=1)
    assert all(span % i >= lead for i in intervals.values()), "the lead must not lose a chunk"
    latest_start = datetime.now(UTC) - max_age - timedelta(minutes=1)
    payloads: dict[str, bytes] = {}
    stored = 0
    for seq, (name, interval) in enumerate(sorted(intervals.items()), start=1):
        start = UNIX_EPOCH + (latest_start + lead - UNIX_EPOCH) // interval * interval - lead
        sent = start + max_age
        end = sent + max_ahead
        if name == "readings":
            every = timedelta(hours=6)
            times = [start + k * every for k in range(span // every + 1)] + [end]
            payloads[name] = meter.sign_body(body(seq, sent, times, []))
            stored = len(times)
        else:
            times = [start + k * (span / 99) for k in range(99)] + [end]
            payloads[name] = meter.sign_body(body(seq, sent, [], times))
    assert set(payloads) == {"readings", "events"}
    made = {}
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        for received, name in enumerate(sorted(payloads), start=1):
            payload = payloads[name]
            assert len(payload) < 65536
            before = await chunks(db)
            await publish(config.mqtt.host, config.mqtt.port, [("meters/WIN-1/up", payload)])
            await wait_settled(registry, received)
            assert metric(registry, "ingestd_messages_accepted_total") == received
            after = await chunks(db)
            made[name] = after.get(name, 0) - before.get(name, 0)
        assert metric(registry, "ingestd_readings_stored_total") == stored
    # With the defaults (100 days and 5 minutes; chunks of 7 and 30 days): 16 and 5.
    assert made == {name: most_chunks(span, interval) for name, interval in intervals.items()}
    # The raw copies are partitioned by the receive time: one chunk, the current one.
    assert (await chunks(db))["raw_messages"] == 1


async def test_times_outside_the_window_are_bad_body_and_create_no_chunk(
    config: Config, meter: Signer, db: Conn
) -> None:
    """Issue 9's attack (one reading a week for years, in one validly signed message), a
    reading or an event just outside either end of the window, and a sent older than the
    window before its receipt: rejected, and no chunk made."""
    max_age, max_ahead = window(config)
    sent = datetime.now(UTC).replace(microsecond=0)
    tick = timedelta(seconds=1)
    weekly = [sent - k * timedelta(weeks=1) for k in range(300)]
    messages = [
        meter.sign_body(body(1, sent, weekly, [])),
        meter.sign_body(body(2, sent, [sent, sent - max_age - tick], [])),
        meter.sign_body(body(3, sent, [sent], [sent + max_ahead + tick])),
        # The window follows sent: a sent far in the past does not let today's data in,
        meter.sign_body(body(4, sent - timedelta(days=3000), [sent], [])),
        # and a sent older than the window before its receipt is clock skew, so that no
        # message places its window in another era.
        meter.sign_body(body(5, sent - max_age - tick, [sent - max_age - tick], [])),
        meter.sign_body(body(6, sent - timedelta(days=3000), [sent - timedelta(days=3000)], [])),
    ]
    before = await chunks(db)
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, [("meters/WIN-1/up", m) for m in messages])
        await wait_settled(registry, len(messages))
        assert metric(registry, "ingestd_messages_rejected_total", reason="bad_body") == 4
        assert metric(registry, "ingestd_messages_rejected_total", reason="clock_skew") == 2
        assert metric(registry, "ingestd_messages_accepted_total") == 0
    rows = await db.fetch("SELECT reason, detail, payload FROM quarantine ORDER BY id")
    reasons = ["bad_body"] * 4 + ["clock_skew"] * 2
    assert [(r["reason"], r["payload"]) for r in rows] == list(
        zip(reasons, [m[:4096] for m in messages], strict=True)
    )
    first_out = next(k for k, t in enumerate(weekly) if t < sent - max_age)
    expected = [
        (f"readings[{first_out}].t {format_time(weekly[first_out])} ", " before sent "),
        (f"readings[1].t {format_time(sent - max_age - tick)} ", " before sent "),
        (f"events[0].t {format_time(sent + max_ahead + tick)} ", " after sent "),
        (f"readings[0].t {format_time(sent)} ", " after sent "),
        (f"sent {format_time(sent - max_age - tick)} ", " before the receive time"),
        (f"sent {format_time(sent - timedelta(days=3000))} ", " before the receive time"),
    ]
    for row, (start, side) in zip(rows, expected, strict=True):
        assert row["detail"].startswith(start), row["detail"]
        assert side in row["detail"], row["detail"]
    assert await chunks(db) == before
    assert await db.fetchval("SELECT count(*) FROM readings") == 0


async def test_honest_replays_and_late_redeliveries_are_stored(
    config: Config, meter: Signer, db: Conn
) -> None:
    """Never reject what an honest meter sends: a replay from flash of data as old as the
    head-end still asks for (gaps.retention_days), re-sent with a fresh sent, fills its gap;
    data at the very end of the window is stored; a redelivery of the original bytes is
    stored after the longest it can honestly wait (flash plus the broker's session expiry)."""
    max_age, max_ahead = window(config)
    now = datetime.now(UTC).replace(microsecond=0)
    oldest_asked = now - timedelta(days=config.gaps.retention_days)
    waited = timedelta(days=config.gaps.retention_days) + timedelta(seconds=config.mqtt.session_expiry_s)
    messages = [
        # seq 2 arrives first: seq 1 is a gap the head-end asks the meter to replay.
        meter.sign_body(body(2, now, [now - timedelta(minutes=1)], [])),
        meter.sign_body(body(1, now, [oldest_asked], [oldest_asked], replay=True)),
        meter.sign_body(body(3, now, [now - max_age, now + max_ahead], [now - max_age])),
        meter.sign_body(body(4, now - waited, [now - waited - timedelta(minutes=1)], [now - waited])),
    ]
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, [("meters/WIN-1/up", m) for m in messages[:1]])
        await wait_settled(registry, 1)
        await publish(config.mqtt.host, config.mqtt.port, [("meters/WIN-1/up", m) for m in messages[1:]])
        await wait_settled(registry, len(messages))
        assert metric(registry, "ingestd_messages_accepted_total") == len(messages)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    stored = await db.fetch("SELECT seq, time FROM readings ORDER BY seq, time")
    assert [(r["seq"], r["time"]) for r in stored] == [
        (1, oldest_asked),
        (2, now - timedelta(minutes=1)),
        (3, now - max_age),
        (3, now + max_ahead),
        (4, now - waited - timedelta(minutes=1)),
    ]
    gaps = await db.fetch("SELECT from_seq, to_seq, status FROM gaps")
    assert [(g["from_seq"], g["to_seq"], g["status"]) for g in gaps] == [(1, 1, "filled")]


async def test_a_60_kb_topic_is_quarantined_with_the_topic_cut(
    config: Config, meter: Signer, db: Conn
) -> None:
    """MQTT allows topics of 65,535 bytes. A signed message on a 60 KB topic (one level
    between the prefix and /up, which the subscription matches) is rejected and
    quarantined with at most TOPIC_SHOWN_MAX bytes of its topic, marked as cut, and the
    log line carries no more."""
    level = "".join(random.Random(8).choices(string.ascii_letters + string.digits, k=60_000))
    topic = f"meters/{level}/up"
    payload = meter.sign_body(body(1, datetime.now(UTC), [datetime.now(UTC)], []))
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(config) as daemon:
            registry = daemon.metrics.registry
            await publish(config.mqtt.host, config.mqtt.port, [(topic, payload)])
            await wait_settled(registry, 1)
            assert metric(registry, "ingestd_messages_rejected_total", reason="topic_mismatch") == 1
    row = await db.fetchrow(
        """SELECT reason, topic, meter_id, payload, octet_length(topic) AS topic_bytes,
                  pg_column_size(q.*) AS row_bytes
           FROM quarantine q"""
    )
    assert row is not None
    assert row["reason"] == "topic_mismatch"
    assert row["payload"] == payload
    assert row["meter_id"] is None
    assert row["topic"] == shown_topic(topic)
    assert row["topic"].startswith(topic[: TOPIC_SHOWN_MAX - 32])
    assert row["topic"].endswith(f"[... cut, {len(topic)} bytes]")
    assert row["topic_bytes"] <= TOPIC_SHOWN_MAX
    assert row["row_bytes"] <= len(payload) + TOPIC_SHOWN_MAX + 512
    rejected = [e for e in logs if e["event"] == "message_rejected"]
    assert [e["topic"] for e in rejected] == [shown_topic(topic)]
