"""Handcrafted attacks through the real broker and the real running daemon.

Each attack is published on the real Mosquitto, taken by a running ingestd, and must end
with its exact rejection reason, that reason's counter, a quarantine row holding what was
received, and a daemon that still works: a good message from another meter, sent after
the attack, is stored. The parser-level cases (every field rule, every order of checks)
are in test_envelope.py; here each attack travels the whole path once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from conftest import running_daemon
from helpers import metric, publish, wait_settled
from ingestd.config import Config
from ingestd.envelope import MAX_INT64, MAX_PAYLOAD, format_time, shown_topic, topic_meter
from ingestd.errors import REJECT_REASONS, RejectReason
from ingestd.signature import (
    Alg,
    PrivateKey,
    Signer,
    b64url_decode,
    b64url_encode,
    generate_private_key,
    public_key_pem,
)
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]


@dataclass(frozen=True)
class Meter:
    meter_id: str
    signer: Signer

    @property
    def kid(self) -> str:
        return self.signer.kid


@dataclass
class Scene:
    """Registered meters: the victim, an honest control meter, a rogue meter whose own key
    the attacker holds (a stolen key), and meters whose key is expired or not yet valid."""

    prefix: str
    victim: Meter
    honest: Meter
    rogue: Meter
    expired: Meter
    future: Meter
    # An RSA key the attacker made, and the victim's public key PEM (public knowledge).
    attacker_rsa: Signer
    victim_pem: bytes
    # Readings are at base + 15 minutes * seq: a day before the test, so that they lie
    # within the data window of any sent the test uses (a fixed date would not, one day).
    base: datetime = field(
        default_factory=lambda: (
            datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
        )
    )
    seqs: dict[str, int] = field(default_factory=dict)

    def up(self, meter: Meter | str) -> str:
        return f"{self.prefix}/{meter if isinstance(meter, str) else meter.meter_id}/up"

    def next_seq(self, meter_id: str) -> int:
        self.seqs[meter_id] = self.seqs.get(meter_id, 0) + 1
        return self.seqs[meter_id]

    def body(self, who: Meter | str, /, **changes: Any) -> dict[str, Any]:
        meter_id = who if isinstance(who, str) else who.meter_id
        seq = self.next_seq(meter_id)
        # One interval per seq, so that accepted readings never share a (meter, time).
        t = self.base + timedelta(minutes=15 * seq)
        body: dict[str, Any] = {
            "v": 1,
            "meter": meter_id,
            "epoch": 0,
            "seq": seq,
            "sent": format_time(datetime.now(UTC)),
            "replay": False,
            "readings": [{"t": format_time(t), "import_wh": 1000 + seq}],
        }
        body.update(changes)
        return body


STATIC_KEYS: dict[str, PrivateKey] = {}


def _key(name: str, alg: Alg) -> PrivateKey:
    # Made once per module run: RSA generation takes a noticeable fraction of a second.
    if name not in STATIC_KEYS:
        STATIC_KEYS[name] = generate_private_key(alg)
    return STATIC_KEYS[name]


async def _register(store: Store, meter: Meter, **window: datetime) -> None:
    await store.add_meter(
        meter.meter_id,
        alg=meter.signer.alg,
        kid=meter.kid,
        public_key_pem=public_key_pem(meter.signer.key.public_key()).decode("ascii"),
        site="ATTACK",
        interval_s=900,
        **window,
    )


@pytest.fixture
async def scene(config: Config, store: Store) -> Scene:
    victim = Meter("VICTIM-1", Signer("ES256", "VICTIM-1-k1", _key("victim", "ES256")))
    honest = Meter("HONEST-1", Signer("EdDSA", "HONEST-1-k1", _key("honest", "EdDSA")))
    rogue = Meter("ROGUE-1", Signer("ES256", "ROGUE-1-k1", _key("rogue", "ES256")))
    expired = Meter("EXPIRED-1", Signer("ES256", "EXPIRED-1-k1", _key("expired", "ES256")))
    future = Meter("FUTURE-1", Signer("ES256", "FUTURE-1-k1", _key("future", "ES256")))
    now = datetime.now(UTC)
    for meter in (victim, honest, rogue):
        await _register(store, meter)
    await _register(store, expired, valid_from=now - timedelta(days=2), valid_until=now - timedelta(days=1))
    await _register(store, future, valid_from=now + timedelta(days=1))
    return Scene(
        prefix=config.mqtt.topic_prefix,
        victim=victim,
        honest=honest,
        rogue=rogue,
        expired=expired,
        future=future,
        attacker_rsa=Signer("RS256", victim.kid, _key("attacker-rsa", "RS256")),
        victim_pem=public_key_pem(victim.signer.key.public_key()),
    )


# -- building attack payloads ---------------------------------------------------------


def h64(header: object) -> str:
    return b64url_encode(orjson.dumps(header))


def envelope(protected: str, body: bytes, signature: bytes) -> bytes:
    return orjson.dumps(
        {"protected": protected, "payload": b64url_encode(body), "signature": b64url_encode(signature)}
    )


def signed(signer: Signer, body: dict[str, Any] | bytes) -> bytes:
    return signer.sign_body(body if isinstance(body, bytes) else orjson.dumps(body))


def literal(body: dict[str, Any], **literals: bytes) -> bytes:
    """The body's JSON with members replaced by literal JSON text (NaN, 2^64, 1e400 ...)."""
    raw = orjson.dumps({**body, **{name: f"@@{name}@@" for name in literals}})
    for name, text in literals.items():
        raw = raw.replace(f'"@@{name}@@"'.encode(), text)
    return raw


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# -- running an attack ----------------------------------------------------------------


Attack = Callable[[Scene], list[tuple[str, bytes]]]


@dataclass(frozen=True)
class Case:
    reason: RejectReason
    build: Attack
    # A word the quarantine's detail must contain: the check that fired, not just any.
    detail: str


def _alg_none(s: Scene) -> list[tuple[str, bytes]]:
    # Unsigned: "alg": "none" and an empty signature, as in the classic JWT attack.
    body = orjson.dumps(s.body(s.victim))
    return [(s.up(s.victim), envelope(h64({"alg": "none", "kid": s.victim.kid}), body, b""))]


def _rs256_on_es256_key(s: Scene) -> list[tuple[str, bytes]]:
    # A genuine RS256 signature by the attacker's own RSA key, claiming the victim's kid.
    return [(s.up(s.victim), signed(s.attacker_rsa, s.body(s.victim)))]


def _hs256_with_public_pem(s: Scene) -> list[tuple[str, bytes]]:
    # The public key PEM used as an HMAC secret: what a verifier that lets the header pick
    # the algorithm would accept.
    protected = h64({"alg": "HS256", "kid": s.victim.kid})
    payload = b64url_encode(orjson.dumps(s.body(s.victim)))
    mac = hmac.new(s.victim_pem, f"{protected}.{payload}".encode(), hashlib.sha256).digest()
    raw = orjson.dumps({"protected": protected, "payload": payload, "signature": b64url_encode(mac)})
    return [(s.up(s.victim), raw)]


def _body_for_victim_on_victim_topic(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.victim), signed(s.rogue.signer, s.body(s.victim)))]


def _body_for_victim_on_signer_topic(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.rogue), signed(s.rogue.signer, s.body(s.victim)))]


def _own_body_on_victim_topic(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.victim), signed(s.rogue.signer, s.body(s.rogue)))]


def _too_large(s: Scene) -> list[tuple[str, bytes]]:
    # A valid message padded with JSON white space to one byte over the limit.
    good = signed(s.victim.signer, s.body(s.victim))
    return [(s.up(s.victim), good + b" " * (MAX_PAYLOAD + 1 - len(good)))]


def _nested_envelope(s: Scene) -> list[tuple[str, bytes]]:
    arrays = nested(30_000)  # 60,000 bytes: under the size limit, far past any parser's depth
    objects = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    return [(s.up(s.victim), arrays), (s.up(s.victim), objects)]


def _nested_body(s: Scene) -> list[tuple[str, bytes]]:
    # Signed by the rogue key, so the body is parsed: too deep for the JSON parser (the
    # first), and deep but parseable in a reading's extra field and an event's detail.
    rogue = s.rogue
    reading = b'[{"t":"2026-11-24T00:15:00Z","import_wh":1,"x":' + nested(500) + b"}]"
    event = b'[{"t":"2026-11-24T00:15:00Z","code":"001","detail":{"d":' + nested(500) + b"}}]"
    bodies = [
        literal(s.body(rogue), x=nested(15_000)),
        literal(s.body(rogue), readings=reading),
        literal(s.body(rogue), events=event),
    ]
    return [(s.up(rogue), signed(rogue.signer, b)) for b in bodies]


def _non_utf8_envelope(s: Scene) -> list[tuple[str, bytes]]:
    good = signed(s.victim.signer, s.body(s.victim))
    return [
        (s.up(s.victim), b"\xff\xfe" + good),
        (s.up(s.victim), good.replace(b'"protected"', b'"prot\xc3\x28ected"')),
        (s.up(s.victim), b'{"protected":"\xed\xa0\x80"}'),  # an encoded surrogate
    ]


def _non_utf8_header(s: Scene) -> list[tuple[str, bytes]]:
    protected = b64url_encode(b'{"alg":"ES256","kid":"\xff"}')
    return [(s.up(s.victim), envelope(protected, orjson.dumps(s.body(s.victim)), b"\x00" * 64))]


def _non_utf8_body(s: Scene) -> list[tuple[str, bytes]]:
    raw = orjson.dumps(s.body(s.rogue)).replace(b"ROGUE-1", b"ROGUE-\xff")
    return [(s.up(s.rogue), signed(s.rogue.signer, raw))]


def _huge_numbers(s: Scene) -> list[tuple[str, bytes]]:
    rogue = s.rogue
    bodies = [
        literal(s.body(rogue), seq=b"18446744073709551616"),  # 2^64
        literal(s.body(rogue), seq=b"1e400"),
        literal(s.body(rogue), epoch=b"9223372036854775808"),  # 2^63
        literal(s.body(rogue), seq=b"100000000000000000000000000000000000000000"),
        orjson.dumps(s.body(rogue, readings=[{"t": "2026-11-24T00:15:00Z", "import_wh": 2**64 - 1}])),
        literal(s.body(rogue), readings=b'[{"t":"2026-11-24T00:15:00Z","import_wh":1e400}]'),
        literal(s.body(rogue), readings=b'[{"t":"2026-11-24T00:15:00Z","import_wh":1,"x":-1e400}]'),
    ]
    return [(s.up(rogue), signed(rogue.signer, b)) for b in bodies]


def _huge_number_in_envelope(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.victim), b'{"protected":1e400,"payload":"","signature":""}')]


def _nan_and_infinity(s: Scene) -> list[tuple[str, bytes]]:
    rogue = s.rogue
    bodies = [
        literal(s.body(rogue), seq=b"NaN"),
        literal(s.body(rogue), epoch=b"Infinity"),
        literal(s.body(rogue), seq=b"-Infinity"),
        literal(s.body(rogue), readings=b'[{"t":"2026-11-24T00:15:00Z","import_wh":1,"x":NaN}]'),
    ]
    return [(s.up(rogue), signed(rogue.signer, b)) for b in bodies]


def _nan_in_envelope(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.victim), b'{"protected":NaN,"payload":Infinity,"signature":-Infinity}')]


def _seq_2_63(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.rogue), signed(s.rogue.signer, literal(s.body(s.rogue), seq=b"9223372036854775808")))]


def _expired_key(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.expired), signed(s.expired.signer, s.body(s.expired)))]


def _not_yet_valid_key(s: Scene) -> list[tuple[str, bytes]]:
    return [(s.up(s.future), signed(s.future.signer, s.body(s.future)))]


def _odd_meter_ids_in_topic(s: Scene) -> list[tuple[str, bytes]]:
    # Topics that are legal MQTT and match the subscription, but name no possible meter.
    # (A real wildcard cannot be published at all: see the raw MQTT test below.)
    rogue = s.rogue
    topics = [
        f"{s.prefix}/{'R' * 65}/up",  # one character over the id limit
        f"{s.prefix}/{'R' * 10_000}/up",
        f"{s.prefix}//up",  # the empty id
        f"{s.prefix}/ROGUE-1 /up",
        f"{s.prefix}/ROGUE.1/up",
        f"{s.prefix}/ROGUE-\u0661/up",  # an Arabic-Indic digit: \\d would take it, our pattern not
        f"{s.prefix}/..%2F/up",
    ]
    return [(topic, signed(rogue.signer, s.body(rogue))) for topic in topics]


def _nul_in_body(s: Scene) -> list[tuple[str, bytes]]:
    rogue = s.rogue
    with_nul = [
        s.body(rogue, meter="ROGUE-1\u0000"),
        s.body(rogue, note="a\u0000b"),  # in an ignored member: still refused
        s.body(rogue, **{"k\u0000": 1}),  # in a member name
        s.body(rogue, readings=[{"t": "2026-11-24T00:15:00Z", "import_wh": 1, "x": "\u0000"}]),
        s.body(rogue, events=[{"t": "2026-11-24T00:15:00Z", "code": "001", "detail": {"\u0000": 0}}]),
    ]
    return [(s.up(rogue), signed(rogue.signer, b)) for b in with_nul]


def _nul_in_header(s: Scene) -> list[tuple[str, bytes]]:
    protected = h64({"alg": "ES256", "kid": s.victim.kid + "\u0000"})
    return [(s.up(s.victim), envelope(protected, orjson.dumps(s.body(s.victim)), b"\x00" * 64))]


def _raw_nul_in_envelope(s: Scene) -> list[tuple[str, bytes]]:
    # A raw NUL byte inside a JSON string is not JSON.
    good = signed(s.victim.signer, s.body(s.victim))
    return [(s.up(s.victim), good.replace(b'"signature":"', b'"signature":"\x00'))]


def _escaped_nul_in_envelope(s: Scene) -> list[tuple[str, bytes]]:
    # The escaped NUL is JSON, but no base64url.
    good = signed(s.victim.signer, s.body(s.victim))
    return [(s.up(s.victim), good.replace(b'"signature":"', b'"signature":"\\u0000'))]


def _repeated_envelope_member(s: Scene) -> list[tuple[str, bytes]]:
    # A captured message with a second "payload" in front of the real one: the parser keeps
    # the last, which verifies; a first-wins reader of the stored bytes sees the forgery.
    good = signed(s.victim.signer, s.body(s.victim))
    fake = b64url_encode(
        orjson.dumps(s.body(s.victim, readings=[{"t": "2026-11-24T00:00:00Z", "import_wh": 1}]))
    )
    return [(s.up(s.victim), good.replace(b'"payload":', b'"payload":"%s","payload":' % fake.encode(), 1))]


def _repeated_body_member(s: Scene) -> list[tuple[str, bytes]]:
    # Two values of one register in one signed reading: which one is "the" reading?
    raw = literal(s.body(s.rogue), readings=b'[{"t":"2026-11-24T00:15:00Z","import_wh":5,"import_wh":7}]')
    return [(s.up(s.rogue), signed(s.rogue.signer, raw))]


def _unrepresentable_times(s: Scene) -> list[tuple[str, bytes]]:
    # Valid RFC 3339, but the database driver sends datetime.min and datetime.max as
    # -infinity and infinity: a time that must be refused at the check, not by the database
    # (nor stored as infinity).
    rogue = s.rogue
    bodies = [
        s.body(rogue, readings=[{"t": "0001-01-01T00:00:00Z", "import_wh": 1}]),
        s.body(rogue, readings=[{"t": "0001-01-01T01:00:00+01:00", "import_wh": 1}]),
        s.body(rogue, readings=[{"t": "9999-12-31T23:59:59.9999999Z", "import_wh": 1}]),
        s.body(rogue, events=[{"t": "9999-12-31T23:59:59.999999Z", "code": "001"}]),
        s.body(rogue, sent="0001-01-01T00:00:00Z"),
    ]
    return [(s.up(rogue), signed(rogue.signer, b)) for b in bodies]


CASES: dict[str, Case] = {
    "alg-none-unsigned": Case("bad_envelope", _alg_none, "unsupported alg"),
    "rs256-header-on-es256-key": Case("alg_mismatch", _rs256_on_es256_key, "header alg RS256"),
    "hs256-with-public-key-as-secret": Case("bad_envelope", _hs256_with_public_pem, "unsupported alg"),
    "body-for-victim-on-victim-topic": Case(
        "topic_mismatch", _body_for_victim_on_victim_topic, "key belongs to ROGUE-1"
    ),
    "body-for-victim-on-signer-topic": Case(
        "topic_mismatch", _body_for_victim_on_signer_topic, "key belongs to ROGUE-1"
    ),
    "own-body-on-victim-topic": Case("topic_mismatch", _own_body_on_victim_topic, "topic is"),
    "64-kib-plus-one": Case("too_large", _too_large, "65537 bytes"),
    "nested-envelope": Case("bad_json", _nested_envelope, "depth limit"),
    "nested-body": Case("bad_body", _nested_body, ""),
    "non-utf8-envelope": Case("bad_json", _non_utf8_envelope, ""),
    "non-utf8-header": Case("bad_envelope", _non_utf8_header, "not JSON"),
    "non-utf8-body": Case("bad_body", _non_utf8_body, "not JSON"),
    "huge-numbers": Case("bad_body", _huge_numbers, ""),
    "huge-number-in-envelope": Case("bad_json", _huge_number_in_envelope, "infinity"),
    "nan-infinity": Case("bad_body", _nan_and_infinity, ""),
    "nan-in-envelope": Case("bad_json", _nan_in_envelope, ""),
    "seq-2-63": Case("bad_body", _seq_2_63, "seq must be an integer"),
    "expired-key": Case("revoked_key", _expired_key, "key expired"),
    "not-yet-valid-key": Case("revoked_key", _not_yet_valid_key, "key not yet valid"),
    "odd-meter-ids-in-topic": Case("topic_mismatch", _odd_meter_ids_in_topic, "topic is"),
    "nul-in-body": Case("bad_body", _nul_in_body, "NUL"),
    "nul-in-header": Case("bad_envelope", _nul_in_header, "kid must be"),
    "raw-nul-in-envelope": Case("bad_json", _raw_nul_in_envelope, "unexpected"),
    "escaped-nul-in-envelope": Case("bad_envelope", _escaped_nul_in_envelope, "base64url"),
    "unrepresentable-times": Case("bad_body", _unrepresentable_times, "not an RFC 3339 date-time"),
    "repeated-envelope-member": Case("bad_envelope", _repeated_envelope_member, "repeat"),
    "repeated-body-member": Case("bad_body", _repeated_body_member, "repeat"),
}


async def _quarantine(db: Conn) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT reason, detail, topic, meter_id, kid, payload, payload_size FROM quarantine ORDER BY id"
    )


async def _honest_message_is_stored(
    scene: Scene, config: Config, registry: CollectorRegistry, db: Conn, received: int
) -> None:
    """The daemon still works: a good message from another meter, sent after the attack,
    is stored."""
    body = scene.body(scene.honest)
    await publish(
        config.mqtt.host, config.mqtt.port, [(scene.up(scene.honest), signed(scene.honest.signer, body))]
    )
    await wait_settled(registry, received + 1)
    stored = await db.fetchval(
        "SELECT count(*) FROM readings WHERE meter_id = $1 AND seq = $2", "HONEST-1", body["seq"]
    )
    assert stored == 1


@pytest.mark.parametrize("name", list(CASES))
async def test_attack_is_rejected_counted_quarantined_and_harmless(
    name: str, scene: Scene, config: Config, db: Conn
) -> None:
    case = CASES[name]
    messages = case.build(scene)
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, messages)
        await wait_settled(registry, len(messages))
        for reason in REJECT_REASONS:
            expected = len(messages) if reason == case.reason else 0
            assert metric(registry, "ingestd_messages_rejected_total", reason=reason) == expected, reason
        assert metric(registry, "ingestd_messages_accepted_total") == 0
        rows = await _quarantine(db)
        assert [r["reason"] for r in rows] == [case.reason] * len(messages)
        cap = config.ingest.quarantine_payload_max
        for row, (topic, payload) in zip(rows, messages, strict=True):
            # Cut when longer than any uplink topic can be (a 10,000-character meter id).
            assert row["topic"] == shown_topic(topic)
            assert row["meter_id"] == topic_meter(topic, scene.prefix)
            assert row["payload"] == payload[:cap]
            assert row["payload_size"] == len(payload)
            assert case.detail in row["detail"], row["detail"]
        await _honest_message_is_stored(scene, config, registry, db, len(messages))
        assert metric(registry, "ingestd_messages_accepted_total") == 1
    # Nothing of the attack reached the data tables.
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == 1
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == 1
    assert await db.fetchval("SELECT count(*) FROM readings WHERE meter_id <> 'HONEST-1'") == 0
    assert await db.fetchval("SELECT count(*) FROM events") == 0


async def test_largest_seq_is_accepted_and_the_daemon_keeps_going(
    scene: Scene, config: Config, db: Conn
) -> None:
    """seq 2^63-1 is valid (2^63 is not: seq-2-63 above). As the first message of its
    epoch it skips nearly 2^63 seqs: that must cost the daemon nothing special."""
    body = scene.body(scene.rogue, seq=MAX_INT64)
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(
            config.mqtt.host, config.mqtt.port, [(scene.up(scene.rogue), signed(scene.rogue.signer, body))]
        )
        await wait_settled(registry, 1, within_s=10)
        assert metric(registry, "ingestd_messages_accepted_total") == 1
        await _honest_message_is_stored(scene, config, registry, db, 1)
    assert await db.fetchval("SELECT max_seq FROM meter_epochs WHERE meter_id = 'ROGUE-1'") == MAX_INT64


# -- replays ---------------------------------------------------------------------------


async def test_replayed_message_is_a_duplicate_and_cannot_be_altered(
    scene: Scene, config: Config, db: Conn
) -> None:
    """What an eavesdropper can do with a captured message: send it again (the same bytes,
    or the same JWS in other JSON white space and member order: a duplicate, nothing
    stored twice), send it on another meter's topic, or change its seq (which breaks the
    signature). A new seq with a valid signature needs the key: see the stolen key test."""
    victim = scene.victim
    first = signed(victim.signer, scene.body(victim))
    second = signed(victim.signer, scene.body(victim))
    parts = orjson.loads(first)
    reordered = b'{ "signature" : "%s",\n "payload":"%s" , "protected":"%s" }' % (
        parts["signature"].encode(),
        parts["payload"].encode(),
        parts["protected"].encode(),
    )
    changed = orjson.loads(b64url_decode(parts["payload"]))
    changed["seq"] = 3
    reseq = orjson.dumps(dict(parts, payload=b64url_encode(orjson.dumps(changed))))
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        host, port = config.mqtt.host, config.mqtt.port
        await publish(host, port, [(scene.up(victim), first), (scene.up(victim), second)])
        await wait_settled(registry, 2)
        assert metric(registry, "ingestd_messages_accepted_total") == 2
        replays = [
            (scene.up(victim), first),
            (scene.up(victim), first),
            (scene.up(victim), reordered),
            (scene.up(scene.honest), first),
            (scene.up(victim), reseq),
        ]
        await publish(host, port, replays)
        await wait_settled(registry, 2 + len(replays))
        assert metric(registry, "ingestd_messages_accepted_total") == 2
        assert metric(registry, "ingestd_messages_duplicate_total") == 3
        assert metric(registry, "ingestd_messages_rejected_total", reason="topic_mismatch") == 1
        assert metric(registry, "ingestd_messages_rejected_total", reason="bad_signature") == 1
        assert metric(registry, "ingestd_readings_stored_total") == 2
        await _honest_message_is_stored(scene, config, registry, db, 2 + len(replays))
    for table in ("readings", "raw_messages", "message_seqs"):
        count = await db.fetchval(f"SELECT count(*) FROM {table} WHERE meter_id = 'VICTIM-1'")
        assert count == 2, table
    rows = await _quarantine(db)
    assert [(r["reason"], r["topic"], r["payload"]) for r in rows] == [
        ("topic_mismatch", scene.up(scene.honest), first),
        ("bad_signature", scene.up(victim), reseq),
    ]
    # The audit copy is the first arrival's bytes, not a replay's.
    assert (
        await db.fetchval("SELECT payload FROM raw_messages WHERE meter_id = 'VICTIM-1' AND seq = 1") == first
    )


async def test_stolen_key_cannot_overwrite_what_is_stored(scene: Scene, config: Config, db: Conn) -> None:
    """With the rogue meter's own key the attacker signs what it likes for that meter, but
    cannot change what is stored: the same seq with other readings is a seq_conflict, and
    an old interval's reading under a new seq is not stored again (the first one stays)."""
    rogue = scene.rogue
    original = scene.body(rogue)
    t = original["readings"][0]["t"]
    conflict = dict(original, readings=[{"t": t, "import_wh": 10**12}])
    rewrite = scene.body(rogue, readings=[{"t": t, "import_wh": 10**12}])
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        host, port = config.mqtt.host, config.mqtt.port
        await publish(host, port, [(scene.up(rogue), signed(rogue.signer, original))])
        await wait_settled(registry, 1)
        await publish(
            host,
            port,
            [
                (scene.up(rogue), signed(rogue.signer, conflict)),
                (scene.up(rogue), signed(rogue.signer, rewrite)),
            ],
        )
        await wait_settled(registry, 3)
        assert metric(registry, "ingestd_messages_rejected_total", reason="seq_conflict") == 1
        assert metric(registry, "ingestd_messages_accepted_total") == 2  # the rewrite's message
        assert metric(registry, "ingestd_readings_stored_total") == 1  # but not its reading
    rows = await db.fetch("SELECT seq, import_wh FROM readings WHERE meter_id = 'ROGUE-1'")
    assert [(r["seq"], r["import_wh"]) for r in rows] == [
        (original["seq"], original["readings"][0]["import_wh"])
    ]
    assert [r["reason"] for r in await _quarantine(db)] == ["seq_conflict"]


# -- keys revoked while the daemon runs ----------------------------------------------------


async def test_key_revoked_while_running_is_refused_within_seconds(
    scene: Scene, config: Config, store: Store, db: Conn
) -> None:
    """`ingestd meter revoke-key` (Store.revoke_key) on a running daemon: no restart; the
    NOTIFY reaches it and the key's next messages are revoked_key."""
    victim = scene.victim
    loop = asyncio.get_running_loop()
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        host, port = config.mqtt.host, config.mqtt.port
        await publish(host, port, [(scene.up(victim), signed(victim.signer, scene.body(victim)))])
        await wait_settled(registry, 1)
        assert metric(registry, "ingestd_messages_accepted_total") == 1
        revoked_at = loop.time()
        assert await store.revoke_key(victim.kid)
        sent = 1
        # Poll: one message at a time until the daemon refuses one.
        while metric(registry, "ingestd_messages_rejected_total", reason="revoked_key") == 0:
            assert loop.time() - revoked_at < 5, "revocation not applied within 5 s"
            await publish(host, port, [(scene.up(victim), signed(victim.signer, scene.body(victim)))])
            sent += 1
            await wait_settled(registry, sent)
        # From then on, every message of that key is refused.
        more = [(scene.up(victim), signed(victim.signer, scene.body(victim))) for _ in range(3)]
        await publish(host, port, more)
        await wait_settled(registry, sent + 3)
        refused = metric(registry, "ingestd_messages_rejected_total", reason="revoked_key")
        assert refused == 4
        assert metric(registry, "ingestd_messages_accepted_total") == sent - 1
        await _honest_message_is_stored(scene, config, registry, db, sent + 3)
    rows = await _quarantine(db)
    assert [r["reason"] for r in rows] == ["revoked_key"] * 4
    assert all("key revoked" in r["detail"] and r["kid"] == victim.kid for r in rows)


# -- topics no client library would send --------------------------------------------------


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    size, length = len(body), bytearray()
    while True:
        size, digit = divmod(size, 128)
        length.append(digit | (0x80 if size else 0))
        if not size:
            return bytes([kind, *length]) + body


def _mqtt_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


async def raw_publish(host: str, port: int, topic: bytes, payload: bytes) -> str:
    """Publish at QoS 1 with a hand-made MQTT 3.1.1 client, which, unlike paho, sends any
    topic bytes; "acked" when the broker took it, "closed" when it dropped the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        connect = (
            _mqtt_string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 30) + _mqtt_string(b"raw-attacker")
        )
        writer.write(_mqtt_packet(0x10, connect))
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x20\x02\x00\x00"
        writer.write(_mqtt_packet(0x32, _mqtt_string(topic) + struct.pack("!H", 1) + payload))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4), 5)
        if answer == b"\x40\x02\x00\x01":
            return "acked"
        assert answer == b"", answer
        return "closed"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_topics_mqtt_forbids_never_reach_the_daemon(scene: Scene, config: Config, db: Conn) -> None:
    """Wildcards, NUL and invalid UTF-8 in a topic name: the broker drops the connection,
    so the daemon never sees them (what it does see is tested in odd-meter-ids-in-topic)."""
    rogue = scene.rogue
    payload = signed(rogue.signer, scene.body(rogue))
    bad_topics = [
        f"{scene.prefix}/+/up".encode(),
        f"{scene.prefix}/#".encode(),
        f"{scene.prefix}/ROGUE-1\u0000/up".encode(),
        f"{scene.prefix}/ROGUE-\xff/up".encode("latin-1"),
        f"{scene.prefix}/ROGUE-1/up".encode() + b"\xed\xa0\x80",  # an encoded surrogate
    ]
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        host, port = config.mqtt.host, config.mqtt.port
        for topic in bad_topics:
            assert await raw_publish(host, port, topic, payload) == "closed", topic
        # The same hand-made client with a proper topic gets through: the test is sound.
        assert await raw_publish(host, port, scene.up(rogue).encode(), payload) == "acked"
        await wait_settled(registry, 1)
        assert metric(registry, "ingestd_messages_accepted_total") == 1
        await _honest_message_is_stored(scene, config, registry, db, 1)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
