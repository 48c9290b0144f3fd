"""Every event a meter signed is stored, including several with the same time and code in
one message (issue 11): an event is identified by its position in the signed message.
Through the real broker, daemon and database; the migration that gave existing rows their
position (0005) on a database written by the code before it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from structlog.testing import capture_logs

from conftest import running_daemon
from helpers import jws, metric, publish, wait_settled
from ingestd.config import Config, DatabaseConfig, FlagsConfig
from ingestd.envelope import Message, format_time, parse_body
from ingestd.health import classify_power_losses
from ingestd.signature import Signer, generate_private_key
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Accept, Store, migrations
from services import PostgresServer

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def body(
    meter: str, seq: int, events: list[dict[str, Any]], *, sent: datetime | None = None
) -> dict[str, Any]:
    return {
        "v": 1,
        "meter": meter,
        "epoch": 0,
        "seq": seq,
        "sent": format_time(sent or datetime.now(UTC)),
        "readings": [{"t": format_time(T0 + timedelta(minutes=15 * seq)), "import_wh": 1000 + seq}],
        "events": events,
    }


async def one_meter(store: Store, key_factory: KeyFactory) -> VirtualMeter:
    meter = build_fleet(1, prefix=f"EV-{uuid.uuid4().hex[:6]}-", algs=("ES256",), keys=key_factory)[0]
    await register_fleet(store, [meter])
    return meter


async def event_rows(db: Conn, meter: str) -> list[tuple[int, int, datetime, str, dict[str, Any]]]:
    rows = await db.fetch(
        "SELECT seq, idx, time, code, detail FROM events WHERE meter_id = $1 ORDER BY seq, idx", meter
    )
    return [(r["seq"], r["idx"], r["time"], r["code"], orjson.loads(r["detail"])) for r in rows]


# -- through the broker and the daemon ----------------------------------------------------


async def test_several_010_events_with_one_t_mark_every_part_lost_and_are_all_stored(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    meter = await one_meter(store, key_factory)
    m = meter.meter_id
    topic = f"{config.mqtt.topic_prefix}/{m}/up"
    # The meter answers a replay request for 2-9 at one instant: three parts are gone.
    req = str(uuid.uuid4())
    now = format_time(datetime.now(UTC).replace(microsecond=0))
    parts = [(2, 3), (5, 6), (8, 9)]
    answer = [
        {"t": now, "code": "010", "detail": {"req": req, "epoch": 0, "from_seq": a, "to_seq": b}}
        for a, b in parts
    ]
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(
            config.mqtt.host, config.mqtt.port, [(topic, meter.sign(body(m, s, []))) for s in (1, 10)]
        )
        await wait_settled(registry, 2)
        await publish(config.mqtt.host, config.mqtt.port, [(topic, meter.sign(body(m, 11, answer)))])
        await wait_settled(registry, 3)
        assert metric(registry, "ingestd_events_total", code="010") == 3

    gaps = await db.fetch(
        "SELECT from_seq, to_seq, status FROM gaps WHERE meter_id = $1 ORDER BY from_seq", m
    )
    assert [(g["from_seq"], g["to_seq"], g["status"]) for g in gaps] == [
        (2, 3, "lost"),
        (4, 4, "open"),
        (5, 6, "lost"),
        (7, 7, "open"),
        (8, 9, "lost"),
    ]
    t = datetime.fromisoformat(now)
    assert await event_rows(db, m) == [(11, i, t, "010", e["detail"]) for i, e in enumerate(answer)]


async def test_two_same_second_tamper_events_are_both_stored_and_counted(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    meter = await one_meter(store, key_factory)
    m = meter.meter_id
    t = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    events: list[dict[str, Any]] = [
        {"t": format_time(t), "code": "003", "detail": {"sensor": "light", "lux": 40}},
        {"t": format_time(t), "code": "003", "detail": {"sensor": "light", "lux": 900}},
        # Earlier than the two before it: a row's idx is its place in the message, not in time.
        {"t": format_time(t - timedelta(seconds=30)), "code": "004"},
    ]
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(
            config.mqtt.host,
            config.mqtt.port,
            [(f"{config.mqtt.topic_prefix}/{m}/up", meter.sign(body(m, 1, events)))],
        )
        await wait_settled(registry, 1)
        assert metric(registry, "ingestd_messages_accepted_total") == 1
        assert metric(registry, "ingestd_events_total", code="003") == 2
        assert metric(registry, "ingestd_tamper_events_total", code="003") == 2
        assert metric(registry, "ingestd_events_total", code="004") == 1

    assert await event_rows(db, m) == [
        (1, 0, t, "003", {"sensor": "light", "lux": 40}),
        (1, 1, t, "003", {"sensor": "light", "lux": 900}),
        (1, 2, t - timedelta(seconds=30), "004", {}),
    ]
    health = await db.fetchrow(
        "SELECT last_tamper_code, last_tamper_at FROM meter_health WHERE meter_id = $1", m
    )
    assert health is not None
    assert (health["last_tamper_code"], health["last_tamper_at"]) == ("003", t)


async def test_a_resend_of_a_message_with_same_t_events_is_still_a_duplicate(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    meter = await one_meter(store, key_factory)
    m = meter.meter_id
    topic = f"{config.mqtt.topic_prefix}/{m}/up"
    t = format_time(datetime.now(UTC).replace(microsecond=0))
    original = body(m, 1, [{"t": t, "code": "001"}, {"t": t, "code": "001"}, {"t": t, "code": "002"}])
    first = meter.sign(original)
    # Both kinds of resend: the same bytes (a redelivery), and re-signed from flash.
    replay = meter.sign(dict(original, sent=format_time(datetime.now(UTC)), replay=True))
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, [(topic, first)])
        await wait_settled(registry, 1)
        await publish(config.mqtt.host, config.mqtt.port, [(topic, first), (topic, replay)])
        await wait_settled(registry, 3)
        assert metric(registry, "ingestd_messages_accepted_total") == 1
        assert metric(registry, "ingestd_messages_duplicate_total") == 2
        assert metric(registry, "ingestd_messages_rejected_total", reason="seq_conflict") == 0
        assert metric(registry, "ingestd_events_total", code="001") == 2
        assert metric(registry, "ingestd_events_total", code="002") == 1

    assert [(seq, idx, code) for seq, idx, _t, code, _d in await event_rows(db, m)] == [
        (1, 0, "001"),
        (1, 1, "001"),
        (1, 2, "002"),
    ]
    assert await db.fetchval("SELECT count(*) FROM raw_messages WHERE meter_id = $1", m) == 1
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0


# -- the batch write and the power-loss classifier, on the database ----------------------


def accept(meter: str, seq: int, events: list[dict[str, Any]], *, at: datetime = T0) -> Accept:
    raw = orjson.dumps(body(meter, seq, events, sent=T0))
    b = parse_body(raw)
    message = Message(b.meter_id, b.epoch, b.seq, b.sent, b.replay, b.readings, b.events, b.digest, kid="k")
    return Accept(message, f"meters/{meter}/up", raw, at)


async def test_two_power_losses_of_one_instant_are_both_classified(db_url: str, db: Conn) -> None:
    same = {"t": format_time(T0), "code": "001"}
    async with Store(DatabaseConfig(url=db_url)) as store:
        result = await store.write_batch([accept("PL-1", 1, [same, same])], [], now=T0)
    assert result.events_stored == {"001": 2}
    classified = await classify_power_losses(db, T0 + timedelta(days=1), FlagsConfig())
    # A meter without a site has no one to compare with: isolated.
    assert [(c.meter_id, c.time, c.isolated) for c in classified] == [("PL-1", T0, True)] * 2
    rows = await db.fetch("SELECT idx, detail ->> 'isolated' AS isolated FROM events ORDER BY idx")
    assert [(r["idx"], r["isolated"]) for r in rows] == [(0, "true"), (1, "true")]


async def test_a_power_loss_locked_elsewhere_is_skipped_not_waited_for_by_its_twin(
    db_url: str, db: Conn
) -> None:
    same = {"t": format_time(T0), "code": "001"}
    async with Store(DatabaseConfig(url=db_url)) as store:
        await store.write_batch([accept("PL-1", 1, [same, same])], [], now=T0)
    # Another instance is classifying the first of the two.
    other: Conn = await asyncpg.connect(db_url)
    try:
        async with other.transaction():
            await other.execute("SELECT FROM events WHERE idx = 0 FOR UPDATE")
            # Waiting for that lock would be a bug: fail at once instead of hanging.
            await db.execute("SET lock_timeout = '1s'")
            classified = await classify_power_losses(db, T0 + timedelta(days=1), FlagsConfig())
            assert len(classified) == 1
    finally:
        await other.close()
    rows = await db.fetch("SELECT idx, detail ? 'isolated' AS done FROM events ORDER BY idx")
    assert [(r["idx"], r["done"]) for r in rows] == [(0, False), (1, True)]


# -- migration 0005 on a database written before it --------------------------------------

# The insert of events as it was up to migration 0004: the first event of each time and
# code of a message stored, the others dropped by the conflict.
OLD_EVENT_INSERT = """
    INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::jsonb[],
                         $5::bigint[], $6::bigint[], $7::timestamptz[])
    ON CONFLICT DO NOTHING"""


async def database_before_0005(pg_server: PostgresServer) -> tuple[str, Conn]:
    """A new database migrated up to 0004, and a connection to it (jsonb as text)."""
    url = await asyncio.to_thread(pg_server.create_database, f"m5_{uuid.uuid4().hex[:12]}")
    db: Conn = await asyncpg.connect(url)
    await db.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for mig in migrations():
        if mig.version < 5:
            await db.execute(mig.sql)
            await db.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name
            )
    await db.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")
    return url, db


async def write_the_old_way(
    db: Conn, signer: Signer, meter: str, epoch: int, seq: int, events: list[dict[str, Any]]
) -> None:
    """What the daemon before 0005 stored for an accepted message with these events."""
    message = {"v": 1, "meter": meter, "epoch": epoch, "seq": seq, "sent": format_time(T0), "events": events}
    parsed = parse_body(orjson.dumps(message))
    await db.execute(
        "INSERT INTO message_seqs VALUES ($1, $2, $3, $4, $5)", meter, epoch, seq, parsed.digest, T0
    )
    await db.execute(
        """INSERT INTO raw_messages (meter_id, epoch, seq, received_at, sent, replay, kid, topic, payload)
           VALUES ($1, $2, $3, $4, $4, false, $5, $6, $7)""",
        meter,
        epoch,
        seq,
        T0,
        signer.kid,
        f"meters/{meter}/up",
        jws(signer, message),
    )
    n = len(parsed.events)
    await db.execute(
        OLD_EVENT_INSERT,
        [meter] * n,
        [e.time for e in parsed.events],
        [e.code for e in parsed.events],
        [orjson.dumps(e.detail).decode() for e in parsed.events],
        [epoch] * n,
        [seq] * n,
        [T0] * n,
    )


async def migrate_logging_notices(url: str) -> list[str]:
    with capture_logs() as logs:
        async with Store(DatabaseConfig(url=url)) as store:
            applied = await store.migrate()
    assert [(mig.version, mig.name) for mig in applied][:1] == [(5, "event_index")]
    return [entry["notice"] for entry in logs if entry["event"] == "migration_notice"]


async def test_migration_0005_places_existing_events_and_restores_the_dropped(
    pg_server: PostgresServer,
) -> None:
    url, db = await database_before_0005(pg_server)
    signer = Signer("EdDSA", "old-key", generate_private_key("EdDSA"))
    t = "2026-11-24T00:14:10Z"
    try:
        # Two 010 answers and two 003 at one instant, in the order the meter signed them.
        await write_the_old_way(
            db,
            signer,
            "OLD-1",
            0,
            7,
            [
                {"t": t, "code": "010", "detail": {"epoch": 0, "from_seq": 2, "to_seq": 3}},
                {"t": t, "code": "003", "detail": {"n": 1}},
                {"t": t, "code": "010", "detail": {"epoch": 0, "from_seq": 5, "to_seq": 6}},
                {"t": t, "code": "003", "detail": {"n": 2}},
                {
                    "t": "2026-11-24T00:14:09Z",
                    "code": "010",
                    "detail": {"epoch": 0, "from_seq": 9, "to_seq": 9},
                },
            ],
        )
        # One instant in two other notations: lower-case separators, an offset, a fraction
        # finer than microseconds (the daemon truncates it; a plain cast would round it up).
        await write_the_old_way(
            db,
            signer,
            "OLD-1",
            0,
            8,
            [
                {"t": "2026-11-24t01:14:10.123456789+01:00", "code": "001"},
                {"t": "2026-11-24T00:14:10.123456z", "code": "001", "detail": {"again": True}},
            ],
        )
        # A power loss classified since: its stored detail is no longer the signed one.
        await db.execute("""UPDATE events SET detail = detail || '{"isolated": true}' WHERE seq = 8""")
        # A message with one event, and one whose raw copy is gone (two events left).
        await write_the_old_way(db, signer, "OLD-2", 3, 1, [{"t": t, "code": "002"}])
        await write_the_old_way(
            db, signer, "OLD-3", 0, 4, [{"t": t, "code": "001"}, {"t": "2026-11-24T00:10:00Z", "code": "002"}]
        )
        await db.execute("DELETE FROM raw_messages WHERE meter_id = 'OLD-3'")
        assert await db.fetchval("SELECT count(*) FROM events") == 7  # of 10 signed

        notices = await migrate_logging_notices(url)

        rows = await db.fetch(
            "SELECT meter_id, seq, idx, time, code, detail, received_at FROM events"
            " ORDER BY meter_id, seq, idx"
        )
        at = datetime(2026, 11, 24, 0, 14, 10, tzinfo=UTC)
        fine = at.replace(microsecond=123456)
        assert [
            (r["meter_id"], r["seq"], r["idx"], r["time"], r["code"], orjson.loads(r["detail"])) for r in rows
        ] == [
            ("OLD-1", 7, 0, at, "010", {"epoch": 0, "from_seq": 2, "to_seq": 3}),
            ("OLD-1", 7, 1, at, "003", {"n": 1}),
            ("OLD-1", 7, 2, at, "010", {"epoch": 0, "from_seq": 5, "to_seq": 6}),  # restored
            ("OLD-1", 7, 3, at, "003", {"n": 2}),  # restored
            ("OLD-1", 7, 4, at - timedelta(seconds=1), "010", {"epoch": 0, "from_seq": 9, "to_seq": 9}),
            ("OLD-1", 8, 0, fine, "001", {"isolated": True}),
            ("OLD-1", 8, 1, fine, "001", {"again": True}),  # restored
            ("OLD-2", 1, 0, at, "002", {}),
            # No signed copy to place them by: -1, -2 in time order.
            ("OLD-3", 4, -2, at, "001", {}),
            ("OLD-3", 4, -1, datetime(2026, 11, 24, 0, 10, tzinfo=UTC), "002", {}),
        ]
        assert {r["received_at"] for r in rows} == {T0}
        assert any(
            "3 restored from raw_messages, 2 without a position (idx < 0), 0 stored messages unreadable" in n
            for n in notices
        ), notices
        definition = await db.fetchval("SELECT pg_get_indexdef('events_identity'::regclass)")
        assert definition.endswith('(meter_id, epoch, seq, idx, "time")')
        # A daemon older than 0005, until it is restarted, stores every event it did:
        # positions unknown (negative), none colliding with another of its instant.
        await write_the_old_way(db, signer, "OLD-4", 0, 1, [{"t": t, "code": "001"}, {"t": t, "code": "002"}])
        rows = await db.fetch("SELECT idx, code FROM events WHERE meter_id = 'OLD-4' ORDER BY code")
        assert [r["code"] for r in rows] == ["001", "002"]
        unknown = {r["idx"] for r in rows}
        assert len(unknown) == 2
        assert max(unknown) < 0
    finally:
        await db.close()


async def test_migration_0005_leaves_the_events_of_an_unreadable_raw_message_alone(
    pg_server: PostgresServer,
) -> None:
    url, db = await database_before_0005(pg_server)
    signer = Signer("EdDSA", "old-key", generate_private_key("EdDSA"))
    t = "2026-11-24T00:14:10Z"
    try:
        await write_the_old_way(db, signer, "ODD", 0, 1, [{"t": t, "code": "003"}, {"t": t, "code": "003"}])
        # Bytes the database cannot read as a signed message (not UTF-8, then not JSON).
        await db.execute("UPDATE raw_messages SET payload = '\\xff00'::bytea")

        notices = await migrate_logging_notices(url)

        rows = await db.fetch("SELECT idx, code FROM events")
        assert [(r["idx"], r["code"]) for r in rows] == [(-1, "003")]
        assert any(
            "0 restored from raw_messages, 1 without a position (idx < 0), 1 stored messages unreadable" in n
            for n in notices
        ), notices
    finally:
        await db.close()


async def test_a_migration_is_not_cut_short_by_the_command_timeout(pg_server: PostgresServer) -> None:
    # 0005 rewrites the events table: on a large one it takes minutes, far longer than
    # database.command_timeout_s allows a query of the daemon. 0001 alone (the extension,
    # the hypertables) takes longer than this timeout.
    url = await asyncio.to_thread(pg_server.create_database, f"m_{uuid.uuid4().hex[:12]}")
    async with Store(DatabaseConfig(url=url, command_timeout_s=0.1)) as store:
        applied = await store.migrate()
    assert [m.version for m in applied] == [m.version for m in migrations()]
