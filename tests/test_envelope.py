"""Wire protocol v1 checks (ingestd.envelope), without services.

Every rejection reason ``check_message`` can produce is driven by a message built for it,
signed with keys made once per module; the order of the checks is asserted where it
matters for security (nothing in the body is believed before the signature verifies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.envelope import (
    MAX_EVENTS,
    MAX_INT64,
    MAX_PAYLOAD,
    MAX_READINGS,
    TOPIC_SHOWN_MAX,
    Message,
    MeterKey,
    check_message,
    format_time,
    parse_body,
    parse_envelope,
    parse_time,
    shown_topic,
    topic_meter,
)
from ingestd.errors import REJECT_REASONS, Rejected
from ingestd.signature import ALGS, Alg, Signer, b64url_encode, generate_private_key

NOW = datetime(2026, 11, 24, 0, 15, 30, tzinfo=UTC)
SKEW = timedelta(minutes=5)
MAX_AGE = timedelta(days=100)  # ingest.max_data_age_days's default
PREFIX = "meters"
TOPIC = "meters/M1/up"
DROP: Any = object()  # marks a body member to leave out


class Lookup:
    """The key table as check_message sees it."""

    def __init__(self, *keys: MeterKey) -> None:
        self._keys = {k.kid: k for k in keys}

    def get(self, kid: str, /) -> MeterKey | None:
        return self._keys.get(kid)


@dataclass(frozen=True)
class Fleet:
    """Signers (by kid) and the registered keys of meters M1 and M2."""

    signers: dict[str, Signer]
    keys: dict[str, MeterKey]

    def lookup(self, *changed: MeterKey) -> Lookup:
        """Every registered key, with ``changed`` replacing the key of the same kid."""
        table = dict(self.keys)
        table.update({k.kid: k for k in changed})
        return Lookup(*table.values())


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    # kid -> (alg, meter). One RSA key serves RS256 and PS256; one DSA key (slow to make).
    plan: dict[str, tuple[Alg, str]] = {
        "es-1": ("ES256", "M1"),
        "ed-1": ("EdDSA", "M1"),
        "ed-2": ("Ed25519", "M1"),
        "es-2": ("ES256", "M2"),
        "rs-1": ("RS256", "M1"),
        "ps-1": ("PS256", "M1"),
        "ds-1": ("DS256", "M1"),
    }
    rsa_key = generate_private_key("RS256")
    signers: dict[str, Signer] = {}
    keys: dict[str, MeterKey] = {}
    for kid, (alg, meter) in plan.items():
        private = rsa_key if alg in {"RS256", "PS256"} else generate_private_key(alg)
        signers[kid] = Signer(alg, kid, private)
        keys[kid] = MeterKey(kid, meter, alg, private.public_key())
    # A key nobody registered, of the same alg as es-1.
    signers["es-stranger"] = Signer("ES256", "es-1", generate_private_key("ES256"))
    return Fleet(signers, keys)


def make_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "meter": "M1",
        "epoch": 0,
        "seq": 1042,
        "sent": "2026-11-24T00:15:03Z",
        "replay": False,
        "readings": [{"t": "2026-11-24T00:15:00Z", "import_wh": 1234567, "export_wh": 0}],
        "events": [{"t": "2026-11-24T00:14:10Z", "code": "001", "detail": {}}],
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


def header64(header: object) -> str:
    return b64url_encode(orjson.dumps(header))


def jws(signer: Signer, body: dict[str, Any] | bytes, *, header: object = None) -> bytes:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return signer.sign_body(raw, header64(header) if header is not None else None)


def envelope(**members: object) -> bytes:
    return orjson.dumps(members)


def check(
    payload: bytes,
    keys: Lookup,
    *,
    topic: str = TOPIC,
    received_at: datetime = NOW,
    skew: timedelta = SKEW,
    max_age: timedelta = MAX_AGE,
) -> Message:
    return check_message(
        topic, payload, received_at, keys, topic_prefix=PREFIX, max_clock_skew=skew, max_data_age=max_age
    )


def rejected(
    payload: bytes,
    keys: Lookup,
    *,
    topic: str = TOPIC,
    received_at: datetime = NOW,
    skew: timedelta = SKEW,
    max_age: timedelta = MAX_AGE,
) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(payload, keys, topic=topic, received_at=received_at, skew=skew, max_age=max_age)
    assert info.value.reason in REJECT_REASONS
    return info.value


def signed_parts(payload: bytes) -> dict[str, str]:
    parts = orjson.loads(payload)
    assert isinstance(parts, dict)
    return parts


# --- too_large ------------------------------------------------------------------------


def padded(payload: bytes, size: int) -> bytes:
    """The same JWS, padded with trailing JSON whitespace to exactly ``size`` bytes."""
    assert len(payload) <= size
    return payload + b" " * (size - len(payload))


def test_payload_over_64_kib_is_too_large(fleet: Fleet) -> None:
    payload = padded(jws(fleet.signers["es-1"], make_body()), MAX_PAYLOAD + 1)
    assert len(payload) == 64 * 1024 + 1
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "too_large"
    assert exc.kid is None


def test_payload_of_exactly_64_kib_is_accepted(fleet: Fleet) -> None:
    payload = padded(jws(fleet.signers["es-1"], make_body()), 64 * 1024)
    assert check(payload, fleet.lookup()).seq == 1042


def test_too_large_is_decided_before_parsing() -> None:
    with pytest.raises(Rejected) as info:
        parse_envelope(b"x" * (MAX_PAYLOAD + 1))
    assert info.value.reason == "too_large"


# --- bad_json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"protected": "\xff\xfe"}', id="non-utf8"),
        pytest.param(b"\xff\xfe{}", id="non-utf8-prefix"),
        pytest.param(b'{"protected": NaN, "payload": "", "signature": ""}', id="nan"),
        pytest.param(b'{"protected": Infinity}', id="infinity"),
        pytest.param(b'{"protected": 1' + b"0" * 400 + b"}", id="integer-beyond-double"),
        pytest.param(b'{"protected": "a",}', id="trailing-comma"),
        pytest.param(b"[" * 1100 + b"]" * 1100, id="nesting-too-deep"),
        pytest.param(b'{"protected": "a"} {}', id="two-documents"),
    ],
)
def test_bad_json(fleet: Fleet, payload: bytes) -> None:
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_json"
    assert exc.kid is None


def test_integer_just_over_2_64_is_read_as_a_float_not_bad_json(fleet: Fleet) -> None:
    # orjson 3.x reads integers beyond 64 bits as floats (only values beyond a double's
    # range are a JSON error), so such a member is a bad envelope, not bad JSON.
    parts = signed_parts(jws(fleet.signers["es-1"], make_body()))
    payload = orjson.dumps(parts)[:-1] + b',"x":18446744073709551616}'
    assert rejected(payload, fleet.lookup()).reason == "bad_envelope"
    as_member = envelope(protected=2**64 - 1, payload="e30", signature="")
    assert rejected(as_member, fleet.lookup()).reason == "bad_envelope"


# --- bad_envelope ---------------------------------------------------------------------


def good_parts(fleet: Fleet) -> dict[str, str]:
    return signed_parts(jws(fleet.signers["es-1"], make_body()))


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        pytest.param({"signature": DROP}, "members", id="missing-signature"),
        pytest.param({"protected": DROP}, "members", id="missing-protected"),
        pytest.param({"header": {"kid": "es-1"}}, "members", id="extra-member"),
        pytest.param({"signatures": []}, "members", id="general-serialization-member"),
        pytest.param({"payload": 5}, "strings", id="payload-not-string"),
        pytest.param({"signature": None}, "strings", id="signature-null"),
        pytest.param({"protected": {"alg": "ES256", "kid": "es-1"}}, "strings", id="protected-object"),
    ],
)
def test_bad_envelope_shape(fleet: Fleet, change: dict[str, Any], detail: str) -> None:
    parts: dict[str, Any] = {**good_parts(fleet), **change}
    payload = orjson.dumps({k: v for k, v in parts.items() if v is not DROP})
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_envelope"
    assert detail in exc.detail
    assert exc.kid is None


@pytest.mark.parametrize("payload", [b"[]", b'["a", "b", "c"]', b'"text"', b"5", b"null", b"true"])
def test_envelope_that_is_not_an_object(fleet: Fleet, payload: bytes) -> None:
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_envelope"
    assert "object" in exc.detail


@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda s: s + "=" * (-len(s) % 4 or 4), id="padding"),
        pytest.param(lambda s: s + "==", id="two-pad-chars"),
        pytest.param(lambda s: s.replace("-", "+").replace("_", "/") + "+/", id="standard-alphabet"),
        pytest.param(lambda s: s[:10] + " " + s[10:], id="space"),
        pytest.param(lambda s: s[:10] + "\n" + s[10:], id="newline"),
        pytest.param(lambda s: s + "A" * ((1 - len(s)) % 4), id="impossible-length"),
        pytest.param(lambda s: s + "é", id="non-ascii"),
    ],
)
def test_bad_base64url(fleet: Fleet, member: str, spoil: Any) -> None:
    parts = good_parts(fleet)
    parts[member] = spoil(parts[member])
    exc = rejected(orjson.dumps(parts), fleet.lookup())
    assert exc.reason == "bad_envelope"
    # The member and the rule, for whoever has to fix the encoder (a newline or a
    # non-ASCII character is written as a JSON escape, refused before any decoding).
    assert exc.detail.startswith((f"{member} is not strict base64url: ", "escape sequences are not allowed"))


def test_non_canonical_base64url_last_character(fleet: Fleet) -> None:
    # 1 byte encodes as 2 characters, of which the last carries 4 unused bits: "QQ" is
    # not the canonical encoding of b"A" ("QQ" vs "QR" decode alike with a lax decoder).
    parts = good_parts(fleet)
    parts["signature"] = "QR"
    exc = rejected(orjson.dumps(parts), fleet.lookup())
    assert exc.reason == "bad_envelope"
    assert exc.detail == (
        "signature is not strict base64url: its last character has non-zero unused bits (not canonical)"
    )


@pytest.mark.parametrize(
    ("protected", "detail"),
    [
        pytest.param(b64url_encode(b"not json"), "not JSON", id="header-not-json"),
        pytest.param(b64url_encode(b'{"alg": "ES256", "kid": "es-1"'), "not JSON", id="header-truncated"),
        pytest.param(b64url_encode(b"\xff\xfe"), "not JSON", id="header-not-utf8"),
        pytest.param(b64url_encode(b""), "not JSON", id="header-empty"),
        pytest.param(header64(["ES256", "es-1"]), "object", id="header-array"),
        pytest.param(header64("ES256"), "object", id="header-string"),
        pytest.param(header64({"kid": "es-1"}), "alg", id="missing-alg"),
        pytest.param(header64({"alg": "ES256"}), "kid", id="missing-kid"),
        pytest.param(header64({}), "alg", id="empty-header"),
        pytest.param(header64({"alg": "none", "kid": "es-1"}), "alg", id="alg-none"),
        pytest.param(header64({"alg": "None", "kid": "es-1"}), "alg", id="alg-None"),
        pytest.param(header64({"alg": "HS256", "kid": "es-1"}), "alg", id="alg-HS256"),
        pytest.param(header64({"alg": "es256", "kid": "es-1"}), "alg", id="alg-lowercase"),
        pytest.param(header64({"alg": "ES256 ", "kid": "es-1"}), "alg", id="alg-trailing-space"),
        pytest.param(header64({"alg": ["ES256"], "kid": "es-1"}), "alg", id="alg-list"),
        pytest.param(header64({"alg": None, "kid": "es-1"}), "alg", id="alg-null"),
        pytest.param(header64({"alg": "ES256", "kid": "es-1", "crit": ["exp"]}), "crit", id="crit"),
        pytest.param(header64({"alg": "ES256", "kid": "es-1", "crit": []}), "crit", id="crit-empty"),
        pytest.param(header64({"alg": "ES256", "kid": "es 1"}), "kid", id="kid-with-space"),
        pytest.param(header64({"alg": "ES256", "kid": ""}), "kid", id="kid-empty"),
        pytest.param(header64({"alg": "ES256", "kid": "k" * 129}), "kid", id="kid-129-chars"),
        pytest.param(header64({"alg": "ES256", "kid": "kid\u00e9"}), "kid", id="kid-non-ascii"),
        pytest.param(header64({"alg": "ES256", "kid": "kid\n"}), "kid", id="kid-newline"),
        pytest.param(header64({"alg": "ES256", "kid": 5}), "kid", id="kid-int"),
        pytest.param(header64({"alg": "ES256", "kid": None}), "kid", id="kid-null"),
    ],
)
def test_bad_protected_header(fleet: Fleet, protected: str, detail: str) -> None:
    # Signed over the bad header, so that nothing but the header is wrong.
    payload = fleet.signers["es-1"].sign_body(orjson.dumps(make_body()), protected)
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_envelope"
    assert detail in exc.detail
    assert exc.kid is None


def test_kid_of_128_printable_characters_is_well_formed(fleet: Fleet) -> None:
    kid = "!~" * 64
    key = dataclasses.replace(fleet.keys["es-1"], kid=kid)
    payload = jws(fleet.signers["es-1"], make_body(), header={"alg": "ES256", "kid": kid})
    assert check(payload, fleet.lookup(key)).kid == kid


def test_extra_header_parameters_are_allowed(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], make_body(), header={"alg": "ES256", "kid": "es-1", "typ": "JOSE"})
    assert check(payload, fleet.lookup()).kid == "es-1"


def test_parse_envelope_returns_the_signing_input(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], b'{"v":1}')
    parts = signed_parts(payload)
    header = parse_envelope(payload)
    assert header.alg == "ES256"
    assert header.kid == "es-1"
    assert header.body == b'{"v":1}'
    assert header.signing_input == f"{parts['protected']}.{parts['payload']}".encode()
    assert len(header.signature) == 64


# --- unknown_key, revoked_key ---------------------------------------------------------


def test_unknown_key(fleet: Fleet) -> None:
    signer = fleet.signers["es-1"]
    payload = jws(signer, make_body(), header={"alg": "ES256", "kid": "nobody"})
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "unknown_key"
    assert "nobody" in exc.detail
    assert exc.kid == "nobody"


@pytest.mark.parametrize(
    ("change", "word"),
    [
        pytest.param({"revoked_at": NOW - timedelta(seconds=1)}, "revoked", id="revoked-before"),
        pytest.param({"revoked_at": NOW}, "revoked", id="revoked-at-receipt"),
        pytest.param({"valid_until": NOW - timedelta(days=1)}, "expired", id="expired"),
        pytest.param({"valid_until": NOW}, "expired", id="expires-at-receipt"),
        pytest.param({"valid_from": NOW + timedelta(seconds=1)}, "not yet valid", id="not-yet-valid"),
    ],
)
@pytest.mark.parametrize("kid", ["es-1", "ed-1"])
def test_revoked_key(fleet: Fleet, kid: str, change: dict[str, datetime], word: str) -> None:
    key = dataclasses.replace(fleet.keys[kid], **change)  # type: ignore[arg-type]
    exc = rejected(jws(fleet.signers[kid], make_body()), fleet.lookup(key))
    assert exc.reason == "revoked_key"
    assert word in exc.detail
    assert exc.kid == kid


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"revoked_at": NOW + timedelta(seconds=1)}, id="revoked-later"),
        pytest.param({"valid_until": NOW + timedelta(seconds=1)}, id="expires-later"),
        pytest.param({"valid_from": NOW}, id="valid-from-receipt"),
        pytest.param(
            {"valid_from": NOW - timedelta(days=1), "valid_until": NOW + timedelta(days=1)}, id="in-window"
        ),
    ],
)
def test_key_usable_at_receipt(fleet: Fleet, change: dict[str, datetime]) -> None:
    key = dataclasses.replace(fleet.keys["es-1"], **change)  # type: ignore[arg-type]
    assert check(jws(fleet.signers["es-1"], make_body()), fleet.lookup(key)).kid == "es-1"


def test_revocation_is_judged_at_receipt_not_at_sent(fleet: Fleet) -> None:
    # A message sent before the revocation but received after it is refused: the key may be
    # in an attacker's hands, who can write any `sent`.
    key = dataclasses.replace(fleet.keys["es-1"], revoked_at=NOW - timedelta(minutes=1))
    body = make_body(sent="2026-11-01T00:00:00Z")
    assert rejected(jws(fleet.signers["es-1"], body), fleet.lookup(key)).reason == "revoked_key"


# --- alg_mismatch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kid", "claimed"),
    [
        ("es-1", "RS256"),
        ("es-1", "EdDSA"),
        ("es-1", "PS256"),
        ("ed-1", "ES256"),
        ("rs-1", "PS256"),
        # One scheme, two names: the header still names what the key was registered for.
        ("ed-1", "Ed25519"),
        ("ed-2", "EdDSA"),
    ],
)
def test_alg_mismatch(fleet: Fleet, kid: str, claimed: Alg) -> None:
    # Algorithm confusion: the header claims another alg than the key was registered for.
    payload = jws(fleet.signers[kid], make_body(), header={"alg": claimed, "kid": kid})
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "alg_mismatch"
    assert claimed in exc.detail
    assert exc.kid == kid


def test_alg_mismatch_even_when_the_signature_verifies_under_the_claimed_alg(fleet: Fleet) -> None:
    # rs-1 and ps-1 share one RSA key: an RS256 signature by that key is genuine, but ps-1
    # is registered for PS256 only.
    rs = fleet.signers["rs-1"]
    payload = Signer("RS256", "ps-1", rs.key).sign_body(orjson.dumps(make_body()))
    assert rejected(payload, fleet.lookup()).reason == "alg_mismatch"


# --- bad_signature --------------------------------------------------------------------


def test_body_changed_after_signing(fleet: Fleet) -> None:
    parts = signed_parts(jws(fleet.signers["es-1"], make_body()))
    forged = make_body(readings=[{"t": "2026-11-24T00:15:00Z", "import_wh": 1}])
    parts["payload"] = b64url_encode(orjson.dumps(forged))
    exc = rejected(orjson.dumps(parts), fleet.lookup())
    assert exc.reason == "bad_signature"
    assert exc.kid == "es-1"


def test_header_changed_after_signing(fleet: Fleet) -> None:
    parts = signed_parts(jws(fleet.signers["es-1"], make_body()))
    parts["protected"] = header64({"kid": "es-1", "alg": "ES256"})  # same members, other bytes
    assert rejected(orjson.dumps(parts), fleet.lookup()).reason == "bad_signature"


@pytest.mark.parametrize("signer", ["es-stranger", "es-2"])
def test_signature_by_another_key_of_the_same_alg(fleet: Fleet, signer: str) -> None:
    payload = jws(fleet.signers[signer], make_body(), header={"alg": "ES256", "kid": "es-1"})
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_signature"
    assert "es-1" in exc.detail


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(b"\xff" * 64, id="ones"),
        pytest.param(b"\x01" * 63, id="short"),
    ],
)
@pytest.mark.parametrize("kid", ["es-1", "ed-1", "ds-1", "rs-1"])
def test_garbage_signature(fleet: Fleet, kid: str, signature: bytes) -> None:
    parts = signed_parts(jws(fleet.signers[kid], make_body()))
    parts["signature"] = b64url_encode(signature)
    assert rejected(orjson.dumps(parts), fleet.lookup()).reason == "bad_signature"


def test_signature_is_checked_before_the_body_is_read(fleet: Fleet) -> None:
    parts = signed_parts(jws(fleet.signers["es-1"], make_body()))
    parts["payload"] = b64url_encode(b'{"v": 2, "meter": "M2"}')
    assert rejected(orjson.dumps(parts), fleet.lookup()).reason == "bad_signature"


def test_key_status_is_checked_before_the_signature(fleet: Fleet) -> None:
    key = dataclasses.replace(fleet.keys["es-1"], revoked_at=NOW)
    payload = jws(fleet.signers["es-stranger"], b"not even json")
    assert rejected(payload, fleet.lookup(key)).reason == "revoked_key"


# --- topic_mismatch -------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("meters/M2/up", id="other-meter"),
        pytest.param("meters/m1/up", id="other-case"),
        pytest.param("devices/M1/up", id="wrong-prefix"),
        pytest.param("meters2/M1/up", id="prefix-with-suffix"),
        pytest.param("x/meters/M1/up", id="prefix-not-at-start"),
        pytest.param("meters/M1/up/extra", id="extra-level"),
        pytest.param("meters/M1/down/replay", id="downlink"),
        pytest.param("meters/M1", id="no-up"),
        pytest.param("meters/M1/upx", id="up-suffix"),
        pytest.param("meters/x/M1/up", id="two-levels"),
        pytest.param("meters/+/up", id="wildcard"),
        pytest.param("", id="empty"),
    ],
)
def test_topic_does_not_name_the_meter(fleet: Fleet, topic: str) -> None:
    exc = rejected(jws(fleet.signers["es-1"], make_body()), fleet.lookup(), topic=topic)
    assert exc.reason == "topic_mismatch"
    assert exc.kid == "es-1"


def test_body_names_another_meter_than_the_keys_owner(fleet: Fleet) -> None:
    # M1's key signs a body claiming to be M2, published on M2's topic.
    payload = jws(fleet.signers["es-1"], make_body(meter="M2"))
    exc = rejected(payload, fleet.lookup(), topic="meters/M2/up")
    assert exc.reason == "topic_mismatch"
    assert "key belongs to M1" in exc.detail


def test_another_meters_key_on_this_meters_topic(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-2"], make_body(meter="M2"))
    exc = rejected(payload, fleet.lookup(), topic=TOPIC)
    assert exc.reason == "topic_mismatch"
    assert "topic" in exc.detail


def test_multi_level_topic_prefix(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], make_body())
    message = check_message(
        "site/a/meters/M1/up",
        payload,
        NOW,
        fleet.lookup(),
        topic_prefix="site/a/meters",
        max_clock_skew=SKEW,
        max_data_age=MAX_AGE,
    )
    assert message.meter_id == "M1"


# --- bad_body -------------------------------------------------------------------------

READING = {"t": "2026-11-24T00:15:00Z", "import_wh": 5}
EVENT = {"t": "2026-11-24T00:14:10Z", "code": "001"}


def reading(**changes: Any) -> dict[str, Any]:
    merged = {**READING, **changes}
    return {k: v for k, v in merged.items() if v is not DROP}


def event(**changes: Any) -> dict[str, Any]:
    merged = {**EVENT, **changes}
    return {k: v for k, v in merged.items() if v is not DROP}


BAD_BODIES = [
    # (changes to the body, text the detail must contain)
    ({"v": DROP}, "v must be 1"),
    ({"v": 2}, "v must be 1"),
    ({"v": "1"}, "v must be 1"),
    ({"v": True}, "v must be 1"),
    ({"v": 1.0}, "v must be 1"),
    ({"v": 0}, "v must be 1"),
    ({"meter": DROP}, "meter"),
    ({"meter": "M 1"}, "meter"),
    ({"meter": "M1/up"}, "meter"),
    ({"meter": "M\u00e91"}, "meter"),
    ({"meter": "M" * 65}, "meter"),
    ({"meter": ""}, "meter"),
    ({"meter": 1}, "meter"),
    ({"epoch": DROP}, "epoch"),
    ({"epoch": -1}, "epoch"),
    ({"epoch": True}, "epoch"),
    ({"epoch": 1.5}, "epoch"),
    ({"epoch": 0.0}, "epoch"),
    ({"epoch": 2**63}, "epoch"),
    ({"epoch": "0"}, "epoch"),
    ({"seq": DROP}, "seq"),
    ({"seq": 0}, "seq"),
    ({"seq": -5}, "seq"),
    ({"seq": 2**63}, "seq"),
    ({"seq": 2**64 - 1}, "seq"),
    ({"seq": "5"}, "seq"),
    ({"seq": None}, "seq"),
    ({"sent": DROP}, "sent"),
    ({"sent": None}, "sent"),
    ({"sent": 1764000000}, "sent"),
    ({"sent": "yesterday"}, "sent"),
    ({"sent": "2026-11-24"}, "sent"),
    ({"sent": "2026-11-24T00:15:03"}, "sent"),
    ({"sent": "2026-11-24 00:15:03Z"}, "sent"),
    ({"sent": "2026-11-24T00:15:03+0000"}, "sent"),
    ({"sent": "2026-13-24T00:15:03Z"}, "sent"),
    ({"replay": "yes"}, "replay"),
    ({"replay": 1}, "replay"),
    ({"replay": None}, "replay"),
    ({"readings": {}}, "readings must be a list"),
    ({"readings": "none"}, "readings must be a list"),
    ({"readings": None}, "readings must be a list"),
    ({"readings": [5]}, "readings[0]"),
    ({"readings": [READING, []]}, "readings[1]"),
    ({"readings": [reading(t=DROP)]}, "readings[0].t"),
    ({"readings": [reading(t="2026-11-24")]}, "readings[0].t"),
    ({"readings": [READING, reading(t=5)]}, "readings[1].t"),
    ({"readings": [reading(import_wh=DROP)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=None)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=-1)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=1.5)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=5.0)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=True)]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh="5")]}, "readings[0].import_wh"),
    ({"readings": [reading(import_wh=2**63)]}, "readings[0].import_wh"),
    ({"readings": [reading(export_wh="0")]}, "readings[0].export_wh"),
    ({"readings": [reading(export_wh=None)]}, "readings[0].export_wh"),
    ({"readings": [reading(export_wh=-1)]}, "readings[0].export_wh"),
    ({"readings": [reading(export_wh=False)]}, "readings[0].export_wh"),
    ({"events": {}}, "events must be a list"),
    ({"events": None}, "events must be a list"),
    ({"events": ["001"]}, "events[0]"),
    ({"events": [event(t=DROP)]}, "events[0].t"),
    ({"events": [EVENT, event(t="later")]}, "events[1].t"),
    ({"events": [event(code="1")]}, "events[0].code"),
    ({"events": [event(code="0001")]}, "events[0].code"),
    ({"events": [event(code="00a")]}, "events[0].code"),
    ({"events": [event(code="")]}, "events[0].code"),
    ({"events": [event(code="\u0661\u0662\u0663")]}, "events[0].code"),
    ({"events": [event(code=1)]}, "events[0].code"),
    ({"events": [event(code=DROP)]}, "events[0].code"),
    ({"events": [event(detail=[])]}, "events[0].detail"),
    ({"events": [event(detail="x")]}, "events[0].detail"),
    ({"events": [event(detail=None)]}, "events[0].detail"),
    ({"events": [EVENT] * (MAX_EVENTS + 1)}, "101 events"),
]


@pytest.mark.parametrize(("changes", "detail"), BAD_BODIES, ids=[d for _, d in BAD_BODIES])
def test_bad_body(fleet: Fleet, changes: dict[str, Any], detail: str) -> None:
    exc = rejected(jws(fleet.signers["es-1"], make_body(**changes)), fleet.lookup())
    assert exc.reason == "bad_body"
    assert detail in exc.detail
    assert exc.kid == "es-1"


def test_too_many_readings(fleet: Fleet) -> None:
    body = make_body(readings=[READING] * (MAX_READINGS + 1), events=[])
    payload = jws(fleet.signers["ed-1"], body)
    assert len(payload) <= MAX_PAYLOAD  # so that the count, not the size, is what fails
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "bad_body"
    assert "1001 readings" in exc.detail


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        pytest.param(b"not json", "not JSON", id="not-json"),
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b'{"v": 1,', "not JSON", id="truncated"),
        pytest.param(b'{"v": NaN}', "not JSON", id="nan"),
        pytest.param(b'{"meter": "\xff"}', "not JSON", id="non-utf8"),
        pytest.param(b"[" * 1100 + b"]" * 1100, "not JSON", id="too-deep"),
        pytest.param(b"[]", "not a JSON object", id="array"),
        pytest.param(b'[{"v": 1}]', "not a JSON object", id="array-of-body"),
        pytest.param(b'"body"', "not a JSON object", id="string"),
        pytest.param(b"null", "not a JSON object", id="null"),
    ],
)
def test_body_that_is_not_a_json_object(fleet: Fleet, raw: bytes, detail: str) -> None:
    exc = rejected(jws(fleet.signers["es-1"], raw), fleet.lookup())
    assert exc.reason == "bad_body"
    assert detail in exc.detail


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(orjson.dumps(make_body(readings=[reading(note="a\u0000b")])), id="in-reading-extra"),
        pytest.param(orjson.dumps(make_body(events=[event(detail={"k": "\u0000"})])), id="in-detail"),
        pytest.param(orjson.dumps(make_body(fw="\u0000")), id="in-unknown-member"),
        pytest.param(orjson.dumps(make_body(**{"\u0000": 1})), id="in-a-key"),
    ],
)
def test_nul_character_in_a_string(fleet: Fleet, raw: bytes) -> None:
    assert b"\\u0000" in raw
    exc = rejected(jws(fleet.signers["es-1"], raw), fleet.lookup())
    assert exc.reason == "bad_body"
    assert "NUL" in exc.detail


def test_raw_control_character_is_not_json(fleet: Fleet) -> None:
    raw = orjson.dumps(make_body()).replace(b'"M1"', b'"M1\x00"')
    exc = rejected(jws(fleet.signers["es-1"], raw), fleet.lookup())
    assert exc.reason == "bad_body"


def test_parse_body_directly() -> None:
    with pytest.raises(Rejected) as info:
        parse_body(orjson.dumps(make_body(seq=0)))
    assert info.value.reason == "bad_body"
    assert "seq" in info.value.detail


# --- repeated member names (bad_body) -------------------------------------------------

REPEAT = "a member name is repeated within one object"
T = '"t":"2026-11-24T00:15:00Z"'
DEEP = 300  # deeper than orjson writes (254), so that the exact count runs


def spliced(body: dict[str, Any], **texts: str) -> bytes:
    """The body's JSON with each string "@name@" replaced by the JSON text ``texts[name]``
    (text orjson cannot write: repeated names, escapes of our choosing)."""
    return re.sub(rb'"@(\w+)@"', lambda m: texts[m[1].decode()].encode(), orjson.dumps(body))


def in_reading(members: str) -> bytes:
    """A body whose one reading is the object ``{members}``."""
    return spliced(make_body(readings=["@r@"]), r="{" + members + "}")


def in_detail(members: str) -> bytes:
    """A body whose one event's detail is the object ``{members}``."""
    return spliced(make_body(events=[event(detail="@d@")]), d="{" + members + "}")


REPEATED = [
    pytest.param(orjson.dumps(make_body()).replace(b'"seq":', b'"seq":1041,"seq":', 1), id="top-level"),
    pytest.param(
        orjson.dumps(make_body()).replace(b'"replay":false', b'"replay":false,"replay":false'),
        id="top-level-same-value",
    ),
    pytest.param(in_reading(f'{T},"import_wh":5,"import_wh":7'), id="reading-register"),
    pytest.param(in_reading(f'"t":"2026-11-24T00:00:00Z",{T},"import_wh":5'), id="reading-time"),
    pytest.param(in_reading(f'{T},"import_wh":5,"note":"a","note":"b"'), id="reading-extra"),
    pytest.param(in_reading(f'{T},"import_wh":5,"x":{{"y":{{"z":1,"z":1}}}}'), id="nested-in-extra"),
    pytest.param(in_detail('"k":1,"k":2'), id="event-detail"),
    pytest.param(in_detail('"phases":[{"l":1},{"v":230,"v":231}]'), id="in-a-list-in-detail"),
    pytest.param(spliced(make_body(events=[event(code="@c@")]), c='"001","code":"002"'), id="event-code"),
    pytest.param(spliced(make_body(fw="@fw@"), fw='{"build":{"id":1,"id":2}}'), id="unknown-member"),
    pytest.param(spliced(make_body(fw="@fw@"), fw='[[{}],[{"a":[],"a":[]}]]'), id="in-lists"),
    pytest.param(in_reading(f'{T},"import_wh":5,"\\u0074":"2026-11-24T00:00:00Z"'), id="escape-u0074"),
    pytest.param(in_detail('"\\u006b":1,"\\u006B":2'), id="escape-both-spellings"),
    pytest.param(in_detail('"caf\u00e9":1,"caf\\u00e9":2'), id="escape-non-ascii"),
    pytest.param(in_detail('"a/b":1,"a\\/b":2'), id="escape-solidus"),
    pytest.param(in_detail('"\\"":1,"\\u0022":2'), id="escape-quote"),
    # \u003a is the one escape that writes a colon: then colons cannot simply be counted.
    pytest.param(in_detail('"a:b":1,"a\\u003ab":2'), id="escape-colon"),
    pytest.param(in_detail('"p":"C:\\\\","\\u003a":1,":":2'), id="escape-colon-after-backslash"),
    pytest.param(in_detail('"k" : 1 ,\n\t"k"\r\n:\n2'), id="whitespace"),
    pytest.param(
        spliced(make_body(fw="@fw@"), fw="[" * DEEP + '{"a":1,"a":1}' + "]" * DEEP),
        id="deeper-than-orjson-writes",
    ),
]


@pytest.mark.parametrize("raw", REPEATED)
def test_repeated_member_name_is_bad_body(raw: bytes) -> None:
    with pytest.raises(Rejected) as info:
        parse_body(raw)
    assert info.value.reason == "bad_body"
    assert info.value.detail == REPEAT


def test_repeated_member_name_in_a_signed_message(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], in_reading(f'{T},"import_wh":5,"import_wh":7'))
    exc = rejected(payload, fleet.lookup())
    assert (exc.reason, exc.detail, exc.kid) == ("bad_body", REPEAT, "es-1")


NOT_REPEATED = [
    pytest.param(
        orjson.dumps(make_body(readings=[reading(), reading(t="2026-11-24T00:30:00Z")])), id="two-readings"
    ),
    pytest.param(in_detail('"t":{"t":{"t":[{"t":1},{"t":2}]}}'), id="same-name-nested"),
    pytest.param(
        in_reading(f'{T},"import_wh":5,"note":"x\\":y","n2":"\\":\\"","n3":":"'), id="colons-in-values"
    ),
    pytest.param(in_detail('"a\\":b":1,"a":2,"\\":":3,":":4'), id="colons-in-names"),
    # A scan that skipped a string not followed by a colon would then start one at its
    # closing quote, and find '","' followed by a colon here.
    pytest.param(in_detail('"a":["x",":"]'), id="string-after-string"),
    pytest.param(in_detail('"a":["x",":"],"\\u003a":1'), id="string-after-string-escape-colon"),
    pytest.param(in_detail('"q":"say \\"hi\\"","q2":"\\\\","q3":"\\\\\\"","\\\\":1'), id="escaped-quotes"),
    pytest.param(in_detail('"p":"C:\\\\","\\u003a":1,"::":2,"a\\u003Ab":3'), id="escaped-colons"),
    pytest.param(in_detail('"caf\u00e9":1,"cafe\\u0301":2'), id="composed-and-decomposed"),
    pytest.param(json.dumps(make_body(), indent=2).encode(), id="indented"),
    pytest.param(in_detail('"k" : 1 ,\n\t"l"\r\n:\n2'), id="whitespace"),
    pytest.param(spliced(make_body(fw="@fw@"), fw="[" * DEEP + '{"a":1,"b":1}' + "]" * DEEP), id="deep"),
]


@pytest.mark.parametrize("raw", NOT_REPEATED)
def test_no_repeated_member_name(raw: bytes) -> None:
    parse_body(raw)


# Names from a few characters, so that they often repeat, each character spelled at random,
# as itself or escaped. ":" is among them: the check counts colons.
NAME_CHARS = 'ab:"\\/ \u00e9\u2028'
WHITESPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])


@st.composite
def json_names(draw: st.DrawFn) -> str:
    spelled = []
    for char in draw(st.text(alphabet=NAME_CHARS, max_size=3)):
        plain = {'"': ['\\"'], "\\": ["\\\\"], "/": ["/", "\\/"]}.get(char, [char])
        spelled.append(draw(st.sampled_from([*plain, f"\\u{ord(char):04x}", f"\\u{ord(char):04X}"])))
    return '"' + "".join(spelled) + '"'


@st.composite
def json_objects(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    """An object as JSON text, its names possibly repeated (no dict can hold that)."""
    members = draw(st.lists(st.tuples(json_names(), WHITESPACE, WHITESPACE, values), max_size=4))
    return "{" + ",".join(f"{name}{before}:{after}{value}" for name, before, after, value in members) + "}"


JSON_TEXTS = st.recursive(
    (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
    ).map(lambda value: json.dumps(value, ensure_ascii=False))
    | json_names(),
    lambda children: (
        st.lists(children, max_size=3).map(lambda items: "[" + ",".join(items) + "]") | json_objects(children)
    ),
    max_leaves=16,
)


def has_repeat(raw: bytes) -> bool:
    """The reference: the standard library's parser, shown every member of every object."""
    repeats = False

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeats
        names = [name for name, _ in members]
        repeats = repeats or len(set(names)) < len(names)
        return dict(members)

    json.loads(raw, object_pairs_hook=pairs)
    return repeats


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(st.tuples(json_names(), JSON_TEXTS), max_size=2),
    extra=json_objects(JSON_TEXTS),
    detail=json_objects(JSON_TEXTS),
)
def test_property_repeats_agree_with_a_reference_parser(
    members: list[tuple[str, str]], extra: str, detail: str
) -> None:
    # Random unknown members at the top, a random extra field and a random event detail;
    # the rest of the body is valid, so a repeat is the one reason it may be rejected.
    body = make_body(readings=["@r@"], events=[event(detail="@d@")])
    raw = spliced(body, r=f'{{{T},"import_wh":5,"x":{extra}}}', d=detail)
    raw = raw[:-1] + "".join(f",{name}:{value}" for name, value in members).encode() + b"}"
    if has_repeat(raw):
        with pytest.raises(Rejected) as info:
            parse_body(raw)
        assert (info.value.reason, info.value.detail) == ("bad_body", REPEAT)
    else:
        parse_body(raw)


# --- clock_skew -----------------------------------------------------------------------


def sent_at(delta: timedelta) -> str:
    return format_time(NOW + delta)


@pytest.mark.parametrize("kid", ["es-1", "ed-1"])
def test_sent_six_minutes_ahead_is_clock_skew(fleet: Fleet, kid: str) -> None:
    payload = jws(fleet.signers[kid], make_body(sent=sent_at(timedelta(minutes=6))))
    exc = rejected(payload, fleet.lookup())
    assert exc.reason == "clock_skew"
    assert exc.kid == kid


@pytest.mark.parametrize(
    "delta",
    [
        timedelta(minutes=4),
        timedelta(minutes=5),  # the limit itself is allowed
        timedelta(0),
        -MAX_AGE,  # a redelivery as old as the data window: not skew
    ],
)
def test_sent_within_the_skew_is_accepted(fleet: Fleet, delta: timedelta) -> None:
    # The data moves with sent: what the meter created at that moment.
    body = make_body(
        sent=sent_at(delta),
        readings=[{"t": format_time(NOW + delta - timedelta(seconds=3)), "import_wh": 1}],
        events=[],
    )
    message = check(jws(fleet.signers["es-1"], body), fleet.lookup())
    assert message.sent == NOW + delta


def test_skew_boundary_follows_max_clock_skew(fleet: Fleet) -> None:
    ahead = jws(fleet.signers["es-1"], make_body(sent=sent_at(timedelta(seconds=61))))
    assert rejected(ahead, fleet.lookup(), skew=timedelta(minutes=1)).reason == "clock_skew"
    assert check(ahead, fleet.lookup(), skew=timedelta(minutes=2)).seq == 1042
    one_second = jws(fleet.signers["es-1"], make_body(sent=sent_at(timedelta(seconds=1))))
    assert rejected(one_second, fleet.lookup(), skew=timedelta(0)).reason == "clock_skew"
    on_time = jws(fleet.signers["es-1"], make_body(sent=sent_at(timedelta(0))))
    assert check(on_time, fleet.lookup(), skew=timedelta(0)).seq == 1042


def test_skew_compares_instants_not_local_clock_text(fleet: Fleet) -> None:
    # 02:19:30+02:00 is 00:19:30Z: four minutes ahead, accepted.
    payload = jws(fleet.signers["es-1"], make_body(sent="2026-11-24T02:19:30+02:00"))
    assert check(payload, fleet.lookup()).sent == NOW + timedelta(minutes=4)


# --- the time window (bad_body) ----------------------------------------------------------

SENT = datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)


def timed_body(readings: list[datetime], events: list[datetime], **changes: Any) -> dict[str, Any]:
    """The example body (sent SENT) with readings and events at these times."""
    return make_body(
        readings=[{"t": format_time(t), "import_wh": 1000 + i} for i, t in enumerate(readings)],
        events=[{"t": format_time(t), "code": "001"} for t in events],
        **changes,
    )


@pytest.mark.parametrize(
    ("readings", "events"),
    [
        ([SENT - MAX_AGE], []),  # the oldest allowed, exactly
        ([SENT + SKEW], []),  # the latest allowed, exactly
        ([], [SENT - MAX_AGE, SENT + SKEW]),
        ([SENT - MAX_AGE, SENT, SENT + SKEW], [SENT - MAX_AGE, SENT + SKEW]),
    ],
)
def test_times_within_the_window_are_accepted(
    fleet: Fleet, readings: list[datetime], events: list[datetime]
) -> None:
    message = check(jws(fleet.signers["es-1"], timed_body(readings, events)), fleet.lookup())
    assert [r.time for r in message.readings] == readings
    assert [e.time for e in message.events] == events


@pytest.mark.parametrize(
    ("readings", "events", "detail"),
    [
        (
            [SENT - MAX_AGE - timedelta(microseconds=1)],
            [],
            "readings[0].t 2026-08-16T00:15:02.999Z is more than 100 days before sent 2026-11-24T00:15:03Z",
        ),
        (
            [SENT, SENT, SENT + SKEW + timedelta(seconds=1)],
            [],
            "readings[2].t 2026-11-24T00:20:04Z is more than 300 s after sent 2026-11-24T00:15:03Z",
        ),
        (
            [SENT],
            [SENT, datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)],
            "events[1].t 0001-01-01T00:00:01Z is more than 100 days before sent",
        ),
        (
            [SENT],
            [datetime(9999, 1, 1, tzinfo=UTC)],
            "events[0].t 9999-01-01T00:00:00Z is more than 300 s after",
        ),
    ],
)
def test_a_time_outside_the_window_is_bad_body_naming_it(
    fleet: Fleet, readings: list[datetime], events: list[datetime], detail: str
) -> None:
    exc = rejected(jws(fleet.signers["es-1"], timed_body(readings, events)), fleet.lookup())
    assert exc.reason == "bad_body"
    assert detail in exc.detail, exc.detail
    assert exc.kid == "es-1"


def test_the_window_follows_its_settings(fleet: Fleet) -> None:
    payload = jws(
        fleet.signers["es-1"], timed_body([SENT - timedelta(days=11)], [SENT + timedelta(minutes=2)])
    )
    assert check(payload, fleet.lookup()).seq == 1042
    too_old = rejected(payload, fleet.lookup(), max_age=timedelta(days=10))
    assert "more than 10 days before" in too_old.detail
    too_late = rejected(payload, fleet.lookup(), skew=timedelta(minutes=1))
    assert "more than 60 s after" in too_late.detail


def test_the_window_is_read_before_the_topic(fleet: Fleet) -> None:
    # docs/protocol.md section 6: the window is part of the body's validity (step 8).
    payload = jws(fleet.signers["es-1"], timed_body([SENT - 2 * MAX_AGE], []))
    assert rejected(payload, fleet.lookup(), topic="meters/M2/up").reason == "bad_body"


@pytest.mark.parametrize("age", [timedelta(0), timedelta(days=30), timedelta(days=90), MAX_AGE])
def test_honest_replay_from_flash_is_accepted(fleet: Fleet, age: timedelta) -> None:
    """A replay keeps the original readings and events and is re-sent with a fresh sent
    (docs/protocol.md section 9): its data is as old as the flash it comes from."""
    created = NOW - age
    original = timed_body([created], [created], sent=format_time(created))
    replay = dict(original, sent=format_time(NOW), replay=True)
    first = check(jws(fleet.signers["es-1"], original), fleet.lookup(), received_at=created)
    again = check(jws(fleet.signers["es-1"], replay), fleet.lookup())
    assert again.replay
    assert again.digest == first.digest


def test_redelivery_of_the_same_bytes_long_after_is_accepted(fleet: Fleet) -> None:
    """A redelivery keeps its bytes, so its original sent: the window is judged from sent,
    not from the receive time, and sent may be as old as the window (an offline meter, a
    week at the broker)."""
    created = NOW - MAX_AGE
    payload = jws(
        fleet.signers["es-1"], timed_body([created - MAX_AGE], [created], sent=format_time(created))
    )
    assert check(payload, fleet.lookup()).sent == created


@pytest.mark.parametrize("max_age", [MAX_AGE, timedelta(days=7)])
def test_sent_older_than_the_window_before_receipt_is_clock_skew(fleet: Fleet, max_age: timedelta) -> None:
    """Else each message could place its window in another era (docs/security.md)."""
    sent = NOW - max_age - timedelta(seconds=1)
    payload = jws(fleet.signers["es-1"], timed_body([sent], [sent], sent=format_time(sent)))
    exc = rejected(payload, fleet.lookup(), max_age=max_age)
    assert exc.reason == "clock_skew"
    assert exc.detail == f"sent {format_time(sent)} is more than {max_age.days} days before the receive time"
    assert exc.kid == "es-1"
    limit = sent + timedelta(seconds=1)
    on_the_limit = jws(fleet.signers["es-1"], timed_body([sent], [], sent=format_time(limit)))
    assert check(on_the_limit, fleet.lookup(), max_age=max_age).sent == limit


def test_window_ends_beyond_datetimes_range_do_not_break_the_check(fleet: Fleet) -> None:
    early_sent = datetime(1, 1, 1, 0, 5, tzinfo=UTC)
    early = timed_body([datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)], [], sent=format_time(early_sent))
    assert check(jws(fleet.signers["es-1"], early), fleet.lookup(), received_at=early_sent).seq == 1042
    late_sent = datetime(9999, 12, 31, 23, 58, tzinfo=UTC)
    late = timed_body([datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)], [], sent=format_time(late_sent))
    assert check(jws(fleet.signers["es-1"], late), fleet.lookup(), received_at=late_sent).seq == 1042


# --- shown_topic --------------------------------------------------------------------------


def test_short_topics_are_shown_whole() -> None:
    assert shown_topic("meters/M1/up") == "meters/M1/up"
    exact = "m/" + "é" * ((TOPIC_SHOWN_MAX - 2) // 2)
    assert len(exact.encode()) == TOPIC_SHOWN_MAX
    assert shown_topic(exact) == exact


@pytest.mark.parametrize("char", ["x", "é", "\u20ac", "\U0001f600"])
def test_long_topics_are_cut_and_marked(char: str) -> None:
    topic = "meters/" + char * 60_000 + "/up"
    shown = shown_topic(topic)
    kept, mark = shown.split("[... cut, ")
    assert mark == f"{len(topic.encode())} bytes]"
    assert topic.startswith(kept)
    # Whole characters only: a cut through one drops it.
    assert TOPIC_SHOWN_MAX - 3 <= len(shown.encode()) <= TOPIC_SHOWN_MAX
    assert shown_topic(shown) == shown


# --- accepted messages ----------------------------------------------------------------


def test_accepted_message_maps_every_field(fleet: Fleet) -> None:
    body = make_body(
        epoch=3,
        seq=77,
        sent="2026-11-24T01:15:03+01:00",
        replay=DROP,
        readings=[
            {"t": "2026-11-24T00:15:00Z", "import_wh": 10, "export_wh": 2, "voltage": 230.5, "phase": "L1"},
            {"t": "2026-11-24T00:00:00.250Z", "import_wh": 9},
        ],
        events=[
            {"t": "2026-11-24T00:14:10Z", "code": "001"},
            {"t": "2026-11-24T00:14:20Z", "code": "999", "detail": {"why": ["x", 1]}},
        ],
        firmware="1.2.3",  # unknown top-level members are ignored
    )
    message = check(jws(fleet.signers["ed-1"], body), fleet.lookup())
    assert message.meter_id == "M1"
    assert message.epoch == 3
    assert message.seq == 77
    assert message.kid == "ed-1"
    assert message.sent == datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)
    assert message.sent.tzinfo is UTC
    assert message.replay is False
    first, second = message.readings
    assert first.time == datetime(2026, 11, 24, 0, 15, tzinfo=UTC)
    assert (first.import_wh, first.export_wh) == (10, 2)
    assert first.extra == {"voltage": 230.5, "phase": "L1"}
    assert second.time == datetime(2026, 11, 24, 0, 0, 0, 250000, tzinfo=UTC)
    assert (second.import_wh, second.export_wh, second.extra) == (9, None, None)
    assert [(e.code, e.detail) for e in message.events] == [("001", {}), ("999", {"why": ["x", 1]})]
    assert message.events[0].time == datetime(2026, 11, 24, 0, 14, 10, tzinfo=UTC)
    assert len(message.digest) == 32


def test_replay_flag(fleet: Fleet) -> None:
    message = check(jws(fleet.signers["es-1"], make_body(replay=True)), fleet.lookup())
    assert message.replay is True


@pytest.mark.parametrize("kid", ["es-1", "ed-1", "ed-2", "rs-1", "ps-1", "ds-1"])
def test_every_alg_is_accepted(fleet: Fleet, kid: str) -> None:
    message = check(jws(fleet.signers[kid], make_body()), fleet.lookup())
    assert message.kid == kid
    assert message.meter_id == "M1"


def test_every_alg_is_covered(fleet: Fleet) -> None:
    assert {fleet.keys[k].alg for k in ("es-1", "ed-1", "ed-2", "rs-1", "ps-1", "ds-1")} == set(ALGS)


def test_heartbeat_without_readings_or_events(fleet: Fleet) -> None:
    message = check(jws(fleet.signers["es-1"], make_body(readings=DROP, events=DROP)), fleet.lookup())
    assert message.readings == ()
    assert message.events == ()
    empty = check(jws(fleet.signers["es-1"], make_body(readings=[], events=[])), fleet.lookup())
    assert empty.digest == message.digest


def test_a_thousand_readings(fleet: Fleet) -> None:
    readings = [reading(import_wh=i) for i in range(MAX_READINGS)]
    payload = jws(fleet.signers["es-1"], make_body(readings=readings, events=[]))
    assert len(payload) <= MAX_PAYLOAD
    message = check(payload, fleet.lookup())
    assert [r.import_wh for r in message.readings] == list(range(MAX_READINGS))


def test_a_hundred_events(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], make_body(events=[EVENT] * MAX_EVENTS))
    assert len(check(payload, fleet.lookup()).events) == MAX_EVENTS


def test_largest_integers(fleet: Fleet) -> None:
    body = make_body(
        epoch=MAX_INT64, seq=MAX_INT64, readings=[reading(import_wh=MAX_INT64, export_wh=MAX_INT64)]
    )
    message = check(jws(fleet.signers["es-1"], body), fleet.lookup())
    assert (message.epoch, message.seq) == (2**63 - 1, 2**63 - 1)
    assert message.readings[0].import_wh == message.readings[0].export_wh == MAX_INT64


def test_meter_id_of_64_characters(fleet: Fleet) -> None:
    meter = "a-Z_9" * 12 + "abcd"
    assert len(meter) == 64
    key = dataclasses.replace(fleet.keys["es-1"], meter_id=meter)
    payload = jws(fleet.signers["es-1"], make_body(meter=meter))
    assert check(payload, fleet.lookup(key), topic=f"meters/{meter}/up").meter_id == meter


def test_check_message_is_repeatable(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], make_body())
    assert check(payload, fleet.lookup()) == check(payload, fleet.lookup())


# --- digest ---------------------------------------------------------------------------


def digest(body: dict[str, Any] | bytes) -> bytes:
    return parse_body(body if isinstance(body, bytes) else orjson.dumps(body)).digest


def test_digest_ignores_sent_replay_and_unknown_members() -> None:
    first = digest(make_body())
    assert digest(make_body(sent="2026-11-25T00:00:00Z", replay=True)) == first
    assert digest(make_body(replay=DROP, firmware="2.0")) == first


def test_digest_covers_readings_and_events() -> None:
    first = digest(make_body())
    assert digest(make_body(readings=[reading(import_wh=1234568, export_wh=0)])) != first
    assert digest(make_body(events=[event(code="002", detail={})])) != first
    assert digest(make_body(events=[])) != first
    assert digest(make_body(readings=[reading(extra=1) | {"import_wh": 1234567, "export_wh": 0}])) != first


def test_digest_ignores_member_order_and_whitespace() -> None:
    one = (
        b'{"v":1,"meter":"M1","epoch":0,"seq":1,"sent":"2026-11-24T00:15:03Z",'
        b'"readings":[{"t":"2026-11-24T00:15:00Z","import_wh":5,"export_wh":0,"x":{"a":1,"b":2}}],'
        b'"events":[{"t":"2026-11-24T00:14:10Z","code":"001","detail":{"p":1,"q":2}}]}'
    )
    two = (
        b'{ "events" : [ {"detail": {"q": 2, "p": 1}, "code": "001", "t": "2026-11-24T00:14:10Z"} ],\n'
        b'  "readings": [ {"x": {"b": 2, "a": 1}, "export_wh": 0, "import_wh": 5,'
        b' "t": "2026-11-24T00:15:00Z"} ],'
        b' "sent": "2026-11-24T00:20:00Z", "seq": 1, "epoch": 0, "meter": "M1", "v": 1 }'
    )
    assert digest(one) == digest(two)


def test_digest_covers_unknown_members_of_an_event() -> None:
    """Dropped from the stored event, yet signed: a resend that changes one is other
    content (seq_conflict), not a duplicate."""
    plain = digest(make_body(events=[event()]))
    tagged = digest(make_body(events=[event(firmware_note="a")]))
    assert tagged != plain
    assert digest(make_body(events=[event(firmware_note="b")])) != tagged
    assert digest(make_body(events=[event(firmware_note="a")])) == tagged
    # The event as stored is the same either way.
    events = parse_body(orjson.dumps(make_body(events=[event(firmware_note="a")]))).events
    assert (events[0].code, events[0].detail, events[0].unknown) == ("001", {}, {"firmware_note": "a"})


def test_digest_of_events_without_unknown_members_is_unchanged() -> None:
    # Messages stored before unknown event members counted must still match their resends.
    assert digest(make_body()).hex() == (
        hashlib.sha256(
            b'[[["2026-11-24T00:15:00+00:00",1234567,0,null]],[["2026-11-24T00:14:10+00:00","001",{}]]]'
        ).hexdigest()
    )


def test_unknown_event_members_nested_too_deep_are_bad_body() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(Rejected, match=r"events\[0\] nests deeper than 32 levels"):
        parse_body(orjson.dumps(make_body(events=[event(x=deep)])))


def test_digest_is_the_stored_definition() -> None:
    """Digests are stored (``message_seqs``): the same content must keep its digest across
    versions, or a redelivery after an upgrade would be a ``seq_conflict``. The definition:
    SHA-256 of the sorted-key JSON of each reading's and event's values, times written by
    ``isoformat()``."""
    raw = (
        b'{"v":1,"meter":"M1","epoch":0,"seq":1,"sent":"2026-11-24T00:15:03Z",'
        b'"readings":[{"t":"2026-11-24T01:15:00.123456+01:00","import_wh":5,"export_wh":0,"x":{"b":[1.5,null],"a":"z"}},'
        b'{"t":"0001-01-01T00:00:01Z","import_wh":9223372036854775807},{"t":"9999-12-31T23:59:59.5Z","import_wh":0}],'
        b'"events":[{"t":"2026-11-24T00:14:10.000001Z","code":"001","detail":{"q":{"d":1,"c":2},"p":true}}]}'
    )
    body = parse_body(raw)
    canonical = json.dumps(
        [
            [[r.time.isoformat(), r.import_wh, r.export_wh, r.extra] for r in body.readings],
            [[e.time.isoformat(), e.code, e.detail] for e in body.events],
        ],
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert body.digest == hashlib.sha256(canonical).digest()


def test_digest_does_not_depend_on_meter_or_seq() -> None:
    # The (meter, epoch, seq) key is compared separately; the digest is only the content.
    assert digest(make_body(seq=1)) == digest(make_body(seq=2, meter="M2"))


# --- topic_meter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "prefix", "meter"),
    [
        ("meters/M1/up", "meters", "M1"),
        ("meters/M-000123/up", "meters", "M-000123"),
        ("a/b/M_1/up", "a/b", "M_1"),
        ("meters/" + "x" * 64 + "/up", "meters", "x" * 64),
        ("meters/" + "x" * 65 + "/up", "meters", None),
        ("meters//up", "meters", None),
        ("meters/up", "meters", None),
        ("meters/M 1/up", "meters", None),
        ("meters/M.1/up", "meters", None),
        ("meters/M1/up/extra", "meters", None),
        ("meters/M1/down/replay", "meters", None),
        ("meters/a/b/up", "meters", None),
        ("meter/M1/up", "meters", None),
        ("metersX/M1/up", "meters", None),
        ("/meters/M1/up", "meters", None),
        ("meters/M1/up", "a/b", None),
        ("meters/+/up", "meters", None),
        ("meters/#/up", "meters", None),
    ],
)
def test_topic_meter(topic: str, prefix: str, meter: str | None) -> None:
    assert topic_meter(topic, prefix) == meter


# --- parse_time, format_time ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24T00:15:03Z", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24T00:15:03z", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24t00:15:03Z", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24T00:15:03+00:00", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24T00:15:03-00:00", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24T01:15:03+02:00", datetime(2026, 11, 23, 23, 15, 3, tzinfo=UTC)),
        ("2026-11-23T18:45:03-05:30", datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC)),
        ("2026-11-24T00:15:03.5Z", datetime(2026, 11, 24, 0, 15, 3, 500000, tzinfo=UTC)),
        ("2026-11-24T00:15:03.12Z", datetime(2026, 11, 24, 0, 15, 3, 120000, tzinfo=UTC)),
        ("2026-11-24T00:15:03.123Z", datetime(2026, 11, 24, 0, 15, 3, 123000, tzinfo=UTC)),
        ("2026-11-24T00:15:03.123456Z", datetime(2026, 11, 24, 0, 15, 3, 123456, tzinfo=UTC)),
        # Beyond microseconds: truncated, not rounded.
        ("2026-11-24T00:15:03.1234567Z", datetime(2026, 11, 24, 0, 15, 3, 123456, tzinfo=UTC)),
        ("2026-11-24T00:15:03.999999999Z", datetime(2026, 11, 24, 0, 15, 3, 999999, tzinfo=UTC)),
        ("2026-11-24T00:15:03.000000001+01:00", datetime(2026, 11, 23, 23, 15, 3, tzinfo=UTC)),
        ("2024-02-29T23:59:59Z", datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-24 00:15:03Z",  # RFC 3339 allows a space, the protocol does not
        "2026-11-24_00:15:03Z",
        "2026-13-01T00:00:00Z",
        "2026-00-01T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2026-11-24T23:59:60Z",  # leap second: Python cannot hold it
        "2026-11-24T24:00:00Z",
        "2026-11-24T00:60:00Z",
        "2026-11-24T00:15:03",
        "2026-11-24",
        "2026-11-24T00:15Z",
        "2026-11-24T00:15:03.Z",
        "2026-11-24T00:15:03.1234567890Z",
        "2026-11-24T00:15:03+0200",
        "2026-11-24T00:15:03+02",
        "2026-11-24T00:15:03+24:00",
        "2026-11-24T00:15:03UTC",
        "2026-11-24T00:15:03ZZ",
        " 2026-11-24T00:15:03Z",
        "2026-11-24T00:15:03Z\n",
        "+2026-11-24T00:15:03Z",
        "20261124T001503Z",
        "2026-W48-2T00:15:03Z",
        "2026-328T00:15:03Z",
        "0000-01-01T00:00:00Z",
        "\u0662\u0660\u0662\u0666-11-24T00:15:03Z",  # Arabic-Indic digits match \d
        "\uff12\uff10\uff12\uff16-11-24T00:15:03Z",  # fullwidth digits
        "",
    ],
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|isoformat|must be|out of range|offset|day"):
        parse_time(text)


@pytest.mark.parametrize("text", ["2026-11-24T00:15:03+02:60", "2026-11-24T00:15:03+00:99"])
def test_parse_time_rejects_offset_minutes_over_59(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_time(text)


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        # datetime.min and datetime.max, which the database driver turns into -infinity
        # and infinity: found by test_fuzz_store.py.
        "0001-01-01T00:00:00Z",
        "0001-01-01T01:00:00+01:00",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T22:59:59.999999-01:00",
    ],
)
def test_parse_time_out_of_range_after_offset_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_time(text)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00.000001Z", "9999-12-31T23:59:59.999998Z"])
def test_parse_time_just_inside_the_representable_range(text: str) -> None:
    assert parse_time(text).year in {1, 9999}


def test_sent_out_of_range_after_offset_is_bad_body(fleet: Fleet) -> None:
    payload = jws(fleet.signers["es-1"], make_body(sent="0001-01-01T00:00:00+01:00"))
    assert rejected(payload, fleet.lookup()).reason == "bad_body"


@pytest.mark.parametrize("where", ["reading-extra", "event-detail"])
def test_deeply_nested_extra_is_bad_body_not_a_crash(fleet: Fleet, where: str) -> None:
    # orjson cannot write 300 levels, so the nested value is spliced in as text.
    deep = "[" * 300 + "]" * 300
    body = (
        make_body(readings=[reading(x="DEEP")])
        if where == "reading-extra"
        else make_body(events=[event(detail={"x": "DEEP"})])
    )
    raw = orjson.dumps(body).replace(b'"DEEP"', deep.encode())
    exc = rejected(jws(fleet.signers["es-1"], raw), fleet.lookup())
    assert exc.reason == "bad_body"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC), "2026-11-24T00:15:03Z"),
        (datetime(2026, 11, 24, 0, 15, 3, 250000, tzinfo=UTC), "2026-11-24T00:15:03.250Z"),
        (datetime(2026, 11, 24, 0, 15, 3, 999, tzinfo=UTC), "2026-11-24T00:15:03.000Z"),
        (datetime(2026, 11, 24, 2, 15, 3, tzinfo=timezone(timedelta(hours=2))), "2026-11-24T00:15:03Z"),
        (datetime(2026, 11, 23, 19, 15, 3, tzinfo=timezone(timedelta(hours=-5))), "2026-11-24T00:15:03Z"),
    ],
)
def test_format_time(value: datetime, text: str) -> None:
    assert format_time(value) == text


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 24, 0, 15, 3, tzinfo=UTC),
        datetime(2026, 11, 24, 0, 15, 3, 123000, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    ],
)
def test_format_then_parse_round_trips(value: datetime) -> None:
    assert parse_time(format_time(value)) == value


# --- property: never anything but a Message or a Rejected -----------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
KIDS = st.sampled_from(["es-1", "ed-1", "ds-1", "rs-1", "ps-1", "es-2", "nobody"]) | TEXT
B64_JSON = JSON_VALUES.map(lambda v: b64url_encode(orjson.dumps(v)))
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from([*ALGS, "none", "HS256"]) | JSON_SCALARS,
        "kid": KIDS | JSON_SCALARS,
        "crit": JSON_VALUES,
        "typ": JSON_VALUES,
    },
).map(header64)
MEMBER_VALUES = (
    HEADERS
    | B64_JSON
    | st.binary(max_size=80).map(b64url_encode)
    | TEXT
    | JSON_SCALARS
    | st.binary(max_size=40).map(lambda b: b64url_encode(b) + "=")
)
ENVELOPES = st.dictionaries(
    st.sampled_from(["protected", "payload", "signature"]) | TEXT, MEMBER_VALUES, max_size=4
).map(orjson.dumps)
TIMES = (
    st.datetimes(timezones=st.just(UTC)).map(format_time)
    | st.sampled_from(["2026-11-24T00:15:03Z", "2026-11-24T00:25:03Z", "2026-11-24"])
    | TEXT
)
READINGS = st.fixed_dictionaries(
    {},
    optional={
        "t": TIMES | JSON_SCALARS,
        "import_wh": st.integers(min_value=-1, max_value=2**64 - 1) | JSON_SCALARS,
        "export_wh": st.integers(min_value=-1, max_value=2**64 - 1) | JSON_SCALARS,
        "x": JSON_VALUES,
    },
)
EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "t": TIMES,
        "code": st.sampled_from(["001", "002", "1", "0001"]) | TEXT | JSON_SCALARS,
        "detail": JSON_VALUES,
    },
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | JSON_SCALARS,
        "meter": st.sampled_from(["M1", "M2", "M 1"]) | TEXT | JSON_SCALARS,
        "epoch": st.integers(min_value=-1, max_value=2**64 - 1) | JSON_SCALARS,
        "seq": st.integers(min_value=-1, max_value=2**64 - 1) | JSON_SCALARS,
        "sent": TIMES | JSON_SCALARS,
        "replay": st.booleans() | JSON_SCALARS,
        "readings": st.lists(READINGS | JSON_VALUES, max_size=4) | JSON_VALUES,
        "events": st.lists(EVENTS | JSON_VALUES, max_size=4) | JSON_VALUES,
        "other": JSON_VALUES,
    },
)


def outcome(payload: bytes, keys: Lookup, topic: str = TOPIC) -> Message | Rejected:
    try:
        return check(payload, keys, topic=topic)
    except Rejected as exc:
        verdict = exc
    assert verdict.reason in REJECT_REASONS
    assert verdict.reason != "seq_conflict"  # needs the database: never raised here
    return verdict


_PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(payload=st.binary(max_size=2000))
def test_property_arbitrary_bytes(fleet: Fleet, payload: bytes) -> None:
    assert isinstance(outcome(payload, fleet.lookup()), Rejected)


@_PROPERTY
@given(payload=ENVELOPES, topic=st.sampled_from([TOPIC, "meters/M2/up"]) | TEXT)
def test_property_arbitrary_envelopes(fleet: Fleet, payload: bytes, topic: str) -> None:
    outcome(payload, fleet.lookup(), topic)


@_PROPERTY
@given(body=BODIES | JSON_VALUES, kid=st.sampled_from(["es-1", "ed-1", "es-2"]))
def test_property_arbitrary_signed_bodies(fleet: Fleet, body: object, kid: str) -> None:
    payload = fleet.signers[kid].sign_body(orjson.dumps(body))
    result = outcome(payload, fleet.lookup())
    if isinstance(result, Message):
        assert result.meter_id == "M1"
        assert result.kid == kid
        assert result.sent - NOW <= SKEW
        assert all(0 <= r.import_wh <= MAX_INT64 for r in result.readings)
