"""End to end, on the real broker and database: every algorithm accepted, every rejection
reason produced once, and the rows and metrics checked exactly."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from conftest import running_daemon
from helpers import jws, metric, publish, wait_settled
from ingestd.config import Config
from ingestd.errors import REJECT_REASONS
from ingestd.signature import ALGS, Signer, b64url_decode
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Store

MESSAGES_PER_METER = 3


def _body(
    meter: str, seq: int, *, sent: datetime | None = None, import_wh: int = 1000, **extra: Any
) -> dict[str, Any]:
    now = sent or datetime.now(UTC)
    return {
        "v": 1,
        "meter": meter,
        "epoch": 0,
        "seq": seq,
        "sent": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "replay": False,
        # Relative to sent: a fixed time would leave the data window as the calendar moves.
        "readings": [
            {"t": (now - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ"), "import_wh": import_wh + seq}
        ],
        **extra,
    }


async def test_every_alg_accepted_and_every_reason_rejected(
    config: Config, store: Store, db: asyncpg.Connection[asyncpg.Record], key_factory: KeyFactory
) -> None:
    fleet = build_fleet(len(ALGS), prefix="E2E-", interval_s=60, keys=key_factory, per_site=5)
    await register_fleet(store, fleet)
    revoked = build_fleet(1, prefix="REV-", algs=("ES256",), keys=key_factory)[0]
    await register_fleet(store, [revoked])
    assert await store.revoke_key(revoked.signer.kid)
    stranger = Signer("ES256", "no-such-kid", key_factory.new("ES256"))
    es_meter = next(m for m in fleet if m.signer.alg == "ES256")
    ed_meter = next(m for m in fleet if m.signer.alg == "EdDSA")
    rng = random.Random(7)
    prefix = config.mqtt.topic_prefix

    def up(meter: VirtualMeter | str) -> str:
        return f"{prefix}/{meter if isinstance(meter, str) else meter.meter_id}/up"

    good: list[tuple[str, bytes]] = []
    for meter in fleet:
        for _ in range(MESSAGES_PER_METER):
            body = meter.next_body(datetime.now(UTC), rng, event_rate=0.5)
            good.append((up(meter), meter.sign(body)))
    events_sent: dict[str, int] = {}
    for _topic, payload in good:
        body = orjson.loads(_payload_body(payload))
        for event in body.get("events", []):
            events_sent[event["code"]] = events_sent.get(event["code"], 0) + 1

    es = es_meter.meter_id
    tampered = orjson.loads(jws(es_meter.signer, _body(es, 100)))
    tampered["payload"] = orjson.loads(jws(es_meter.signer, _body(es, 101)))["payload"]
    attacks: dict[str, tuple[str, bytes]] = {
        "too_large": (up(es), b"{" + b" " * (64 * 1024) + b"}"),
        "bad_json": (up(es), b'{"protected": '),
        "bad_envelope": (up(es), orjson.dumps({"payload": "e30", "signature": ""})),
        "unknown_key": (up(es), jws(stranger, _body(es, 200))),
        "revoked_key": (up(revoked), jws(revoked.signer, _body(revoked.meter_id, 1))),
        # An EdDSA header on a kid registered for ES256: algorithm confusion.
        "alg_mismatch": (
            up(es),
            jws(es_meter.signer, _body(es, 300), header={"alg": "EdDSA", "kid": es_meter.signer.kid}),
        ),
        "bad_signature": (up(es), orjson.dumps(tampered)),
        # A valid message of one meter, published on another meter's topic.
        "topic_mismatch": (up(ed_meter), jws(es_meter.signer, _body(es, 400))),
        "bad_body": (
            up(es),
            jws(es_meter.signer, {"v": 1, "meter": es, "epoch": 0, "sent": "2026-11-24T00:00:00Z"}),
        ),
        "clock_skew": (
            up(es),
            jws(es_meter.signer, _body(es, 500, sent=datetime.now(UTC) + timedelta(minutes=10))),
        ),
    }
    assert set(attacks) | {"seq_conflict"} == set(REJECT_REASONS)

    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        host, port = config.mqtt.host, config.mqtt.port
        await publish(host, port, good + list(attacks.values()))
        sent = len(good) + len(attacks)
        await wait_settled(registry, sent)
        # Now the originals are stored: the same message again is a duplicate, and the
        # same (meter, epoch, seq) with other content is a conflict.
        first_topic, first_payload = good[0]
        first = orjson.loads(_payload_body(first_payload))
        conflicting = dict(first, readings=[{"t": first["readings"][0]["t"], "import_wh": 1}])
        conflict_meter = fleet[0]
        await publish(
            host, port, [(first_topic, first_payload), (first_topic, jws(conflict_meter.signer, conflicting))]
        )
        await wait_settled(registry, sent + 2)

        accepted = len(good)
        assert metric(registry, "ingestd_messages_accepted_total") == accepted
        assert metric(registry, "ingestd_messages_duplicate_total") == 1
        assert metric(registry, "ingestd_readings_stored_total") == accepted
        for reason in REJECT_REASONS:
            assert metric(registry, "ingestd_messages_rejected_total", reason=reason) == 1, reason
        for code, count in events_sent.items():
            assert metric(registry, "ingestd_events_total", code=code) == count
        assert metric(registry, "ingestd_mqtt_connected") == 1
        assert metric(registry, "ingestd_batch_size_count") >= 2
        assert metric(registry, "ingestd_sent_to_commit_seconds_count") == accepted
        # The same numbers over HTTP, as Prometheus scrapes them.
        assert daemon.metrics_port
        text = await asyncio.to_thread(_scrape, daemon.metrics_port)
        assert f"ingestd_messages_accepted_total {float(accepted)}" in text
        assert 'ingestd_messages_rejected_total{reason="bad_signature"} 1.0' in text

    assert await db.fetchval("SELECT count(*) FROM readings") == accepted
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == accepted
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == accepted
    assert await db.fetchval("SELECT count(*) FROM events") == sum(events_sent.values())
    by_alg = await db.fetch(
        "SELECT k.alg, count(*) AS n FROM raw_messages r JOIN meter_keys k USING (kid) GROUP BY k.alg"
    )
    assert {r["alg"]: r["n"] for r in by_alg} == dict.fromkeys(ALGS, MESSAGES_PER_METER)
    quarantined = await db.fetch("SELECT reason, count(*) AS n FROM quarantine GROUP BY reason")
    assert {r["reason"]: r["n"] for r in quarantined} == dict.fromkeys(REJECT_REASONS, 1)
    # The audit trail holds the exact bytes received.
    raw = await db.fetchval(
        "SELECT payload FROM raw_messages WHERE meter_id = $1 AND seq = $2", first["meter"], first["seq"]
    )
    assert raw == first_payload
    # The first content stays after a conflict.
    kept = await db.fetchval(
        "SELECT import_wh FROM readings WHERE meter_id = $1 AND time = $2::text::timestamptz",
        first["meter"],
        first["readings"][0]["t"],
    )
    assert kept == first["readings"][0]["import_wh"]
    too_large = await db.fetchrow("SELECT payload, payload_size FROM quarantine WHERE reason = 'too_large'")
    assert too_large is not None
    assert too_large["payload_size"] == 64 * 1024 + 2
    assert len(too_large["payload"]) == config.ingest.quarantine_payload_max


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        return str(response.read().decode())


def _payload_body(payload: bytes) -> bytes:
    return b64url_decode(orjson.loads(payload)["payload"])
