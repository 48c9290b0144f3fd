"""Wire protocol v1: from the bytes of one MQTT message to a verified, validated reading set.

Order matters for security: nothing inside the body is believed before the signature over
it has been checked against a registered, valid key of the meter named in the topic.
Pure: the pipeline runs the signature check (``signature.verify``, most of the cost) in
worker processes (``ingestd.verifier``) and the rest on its event loop.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import orjson

from ingestd.errors import Rejected
from ingestd.signature import Alg, PublicKey, b64url_decode, is_alg, verify

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD: Final = 64 * 1024
MAX_READINGS: Final = 1000
MAX_EVENTS: Final = 100
MAX_INT64: Final = 2**63 - 1
METER_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
KID: Final = re.compile(r"[\x21-\x7e]{1,128}")
EVENT_CODE: Final = re.compile(r"[0-9]{3}")
# RFC 3339 date-time, strictly: datetime.fromisoformat alone accepts dates without a time,
# week dates and naive times, none of which may reach the database as a reading's time.
_RFC3339: Final = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
)
# Meters read on the same interval boundaries and send within the same seconds: most
# time strings were seen moments ago.
_TIME_CACHE_SIZE: Final = 4096
# asyncpg sends these two as -infinity and infinity: the first fails a hypertable insert
# (the whole batch with it), the second would be stored as the time 'infinity'.
_UNREPRESENTABLE: Final = frozenset({datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)})
# \u0000 after an even number of backslashes: an escaped NUL, not the text "\\u0000".
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# Nesting allowed inside a reading's extra fields or an event's detail.
MAX_DEPTH: Final = 32
_HEADER_KEYS: Final = frozenset({"alg", "kid"})
_ENVELOPE_KEYS: Final = frozenset({"protected", "payload", "signature"})
_ENVELOPE_NAMES: Final = (b'"protected"', b'"payload"', b'"signature"')
_READING_KEYS: Final = frozenset({"t", "import_wh", "export_wh"})
_EVENT_KEYS: Final = frozenset({"t", "code", "detail"})
# One JSON string, and the colon after it when there is one (when the string names a member).
_STRING_THEN_COLON: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(?:[ \t\n\r]*(:))?')
# MQTT allows topics of 65,535 bytes, and a rejected message's topic is stored in the
# quarantine and printed in log lines. A valid uplink topic is {prefix}/{meter_id}/up with a
# meter id of at most 64 characters, so a cap of 256 bytes cuts only topics that could never
# be valid (with any topic prefix up to 188 bytes) while keeping enough to tell who sent them.
TOPIC_SHOWN_MAX: Final = 256


@dataclass(frozen=True, slots=True)
class MeterKey:
    """A registered public key, as the verifier needs it."""

    kid: str
    meter_id: str
    alg: Alg
    key: PublicKey
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    revoked_at: datetime | None = None
    # Of the row it was loaded from (``Store.key_fingerprints``): tells a changed row.
    fingerprint: str | None = None

    def usable_at(self, when: datetime) -> str | None:
        """None when the key may sign at ``when``; otherwise why not."""
        if self.revoked_at is not None and self.revoked_at <= when:
            return "key revoked"
        if self.valid_from is not None and when < self.valid_from:
            return "key not yet valid"
        if self.valid_until is not None and when >= self.valid_until:
            return "key expired"
        return None


class KeyLookup(Protocol):
    def get(self, kid: str, /) -> MeterKey | None: ...


@dataclass(frozen=True, slots=True)
class Reading:
    time: datetime
    import_wh: int
    export_wh: int | None
    extra: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Event:
    time: datetime
    code: str
    detail: dict[str, Any]
    # Members of the event object beyond t, code and detail: not stored with the event,
    # but signed content all the same, so part of the digest (a resend that changes one
    # is a seq_conflict, as for a reading's extra fields).
    unknown: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Body:
    """A signed body that passed validation (not yet matched to its key or topic)."""

    meter_id: str
    epoch: int
    seq: int
    sent: datetime
    replay: bool
    readings: tuple[Reading, ...]
    events: tuple[Event, ...]
    # Identifies the content (readings and events), not the bytes: a replay re-signs the
    # same data with a new `sent`, and must be recognised as the same message.
    digest: bytes


@dataclass(frozen=True, slots=True)
class Message(Body):
    """A message that passed every check: signed by a valid key of the meter it names."""

    kid: str


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Header:
    """The part of an envelope readable before any key is consulted."""

    alg: Alg
    kid: str
    signing_input: bytes
    signature: bytes
    body: bytes


def topic_meter(topic: str, prefix: str) -> str | None:
    """The meter id of an uplink topic ``{prefix}/{meter_id}/up``, or None."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/up"):
        return None
    meter = topic[len(head) : -3]
    return meter if METER_ID.fullmatch(meter) else None


def shown_topic(topic: str) -> str:
    """A topic from the wire as it may be stored or logged: at most TOPIC_SHOWN_MAX bytes,
    and when cut, its start and a mark saying so and how long it was.

    What it returns is returned unchanged: cutting twice loses nothing more.
    """
    # Four UTF-8 bytes a character at most: a short topic needs no encoding to know.
    if len(topic) * 4 <= TOPIC_SHOWN_MAX:
        return topic
    raw = topic.encode("utf-8", "surrogatepass")
    if len(raw) <= TOPIC_SHOWN_MAX:
        return topic
    mark = f"[... cut, {len(raw)} bytes]"
    kept = raw[: TOPIC_SHOWN_MAX - len(mark)].decode("utf-8", "ignore")
    return kept + mark


def parse_envelope(payload: bytes) -> Header:
    """Decode the flattened JWS; raise Rejected (too_large, bad_json, bad_envelope)."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected("too_large", f"{len(payload)} bytes, limit {MAX_PAYLOAD}")
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected("bad_json", _json_error(exc)) from None
    if not isinstance(envelope, dict):
        raise Rejected("bad_envelope", "not a JSON object")
    if envelope.keys() != _ENVELOPE_KEYS:
        raise Rejected("bad_envelope", "members must be exactly protected, payload, signature")
    # The JSON parser keeps the last of repeated members; another parser (an auditor's)
    # may keep the first. Our three members hold base64url only, so a valid envelope never
    # needs an escape, and then each member name appears literally, exactly once.
    if b"\\" in payload:
        raise Rejected("bad_envelope", "escape sequences are not allowed (members are plain base64url)")
    if any(payload.count(name) > 1 for name in _ENVELOPE_NAMES):
        raise Rejected("bad_envelope", "a member is repeated")
    protected, body64, sig64 = envelope["protected"], envelope["payload"], envelope["signature"]
    if not (isinstance(protected, str) and isinstance(body64, str) and isinstance(sig64, str)):
        raise Rejected("bad_envelope", "protected, payload and signature must be strings")
    header_raw = _member_b64url("protected", protected)
    body = _member_b64url("payload", body64)
    signature = _member_b64url("signature", sig64)
    try:
        header = orjson.loads(header_raw)
    except orjson.JSONDecodeError:
        raise Rejected("bad_envelope", "protected header is not JSON") from None
    if not isinstance(header, dict):
        raise Rejected("bad_envelope", "protected header is not a JSON object")
    if "crit" in header:
        raise Rejected("bad_envelope", "crit header parameters are not supported")
    if not header.keys() >= _HEADER_KEYS:
        raise Rejected("bad_envelope", "protected header needs alg and kid")
    alg, kid = header["alg"], header["kid"]
    if not is_alg(alg):
        raise Rejected("bad_envelope", f"unsupported alg {_short(alg)}")
    if not isinstance(kid, str) or not KID.fullmatch(kid):
        raise Rejected("bad_envelope", "kid must be 1-128 printable ASCII characters")
    signing_input = f"{protected}.{body64}".encode("ascii")
    return Header(alg, kid, signing_input, signature, body)


def _member_b64url(name: str, value: str) -> bytes:
    try:
        return b64url_decode(value)
    except ValueError as exc:
        # Names the member and the rule: what a firmware engineer needs to fix it.
        raise Rejected("bad_envelope", f"{name} is not strict base64url: {exc}") from None


def check_message(
    topic: str,
    payload: bytes,
    received_at: datetime,
    keys: KeyLookup,
    *,
    topic_prefix: str,
    max_clock_skew: timedelta,
    max_data_age: timedelta,
) -> Message:
    """Every check of wire protocol v1 but the duplicate check (which needs the database).

    Raises Rejected with the first reason that applies. The pipeline runs the same three
    steps apart: ``prepare`` and ``accept_signed`` on the event loop, the signature check
    (the costly one) in the verification worker processes.
    """
    signed = prepare(payload, received_at, keys)
    if not signature_ok(signed):
        raise bad_signature(signed)
    return accept_signed(
        signed,
        topic,
        received_at,
        topic_prefix=topic_prefix,
        max_clock_skew=max_clock_skew,
        max_data_age=max_data_age,
    )


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Signed:
    """An envelope that parsed, with the registered key it names; not yet verified."""

    header: Header
    key: MeterKey


def prepare(payload: bytes, received_at: datetime, keys: KeyLookup) -> Signed:
    """Parse the envelope and find a usable key of the header's algorithm."""
    header = parse_envelope(payload)
    key = keys.get(header.kid)
    if key is None:
        raise Rejected("unknown_key", f"no key {header.kid!r}", kid=header.kid)
    unusable = key.usable_at(received_at)
    if unusable is not None:
        raise Rejected("revoked_key", f"{unusable}: {header.kid!r}", kid=header.kid)
    if header.alg != key.alg:
        raise Rejected(
            "alg_mismatch", f"header alg {header.alg}, key registered for {key.alg}", kid=header.kid
        )
    return Signed(header, key)


def signature_ok(signed: Signed) -> bool:
    return verify(signed.key.alg, signed.key.key, signed.header.signature, signed.header.signing_input)


def bad_signature(signed: Signed) -> Rejected:
    kid = signed.header.kid
    return Rejected("bad_signature", f"signature does not verify with key {kid!r}", kid=kid)


def unverifiable(signed: Signed) -> Rejected:
    """A signature that could not be checked at all (it crashed or hung the verifier): not
    believed, so rejected as a bad signature, saying why."""
    kid = signed.header.kid
    return Rejected("bad_signature", f"it crashed the verifier (key {kid!r})", kid=kid)


def accept_signed(
    signed: Signed,
    topic: str,
    received_at: datetime,
    *,
    topic_prefix: str,
    max_clock_skew: timedelta,
    max_data_age: timedelta,
) -> Message:
    """The checks that read the body: only ever called once its signature verified.

    ``max_data_age`` and ``max_clock_skew`` also bound the times inside the body (see
    ``check_window``), and ``max_data_age`` how long before the receive time ``sent`` may
    be."""
    try:
        body = _signed_body(signed, topic, received_at, topic_prefix, max_clock_skew, max_data_age)
    except Rejected as exc:
        exc.kid = signed.header.kid
        raise
    return Message(
        meter_id=body.meter_id,
        epoch=body.epoch,
        seq=body.seq,
        sent=body.sent,
        replay=body.replay,
        kid=signed.header.kid,
        readings=body.readings,
        events=body.events,
        digest=body.digest,
    )


def _signed_body(
    signed: Signed,
    topic: str,
    received_at: datetime,
    topic_prefix: str,
    max_clock_skew: timedelta,
    max_data_age: timedelta,
) -> Body:
    body = parse_body(signed.header.body)
    check_window(body, max_age=max_data_age, max_ahead=max_clock_skew)
    owner = signed.key.meter_id
    if body.meter_id != owner:
        raise Rejected("topic_mismatch", f"body names {body.meter_id}, key belongs to {owner}")
    if topic_meter(topic, topic_prefix) != body.meter_id:
        raise Rejected("topic_mismatch", f"body names {body.meter_id}, topic is {_short(topic)}")
    if body.sent - received_at > max_clock_skew:
        raise Rejected("clock_skew", f"sent {body.sent.isoformat()} is in the future")
    if received_at - body.sent > max_data_age:
        # The data window follows sent; were sent unbounded in the past, each message could
        # place its window in another era, and a key holder make chunks without end. No
        # honest message is older: a redelivery waits at most the flash retention and the
        # broker's session expiry (the configuration checks), a replay has a fresh sent.
        raise Rejected(
            "clock_skew",
            f"sent {format_time(body.sent)} is more than {_duration(max_data_age)} before the receive time",
        )
    return body


def parse_body(raw: bytes) -> Body:
    """Validate the signed body; raise Rejected("bad_body") naming the first bad field.

    Unknown top-level members are ignored (forward compatibility; the raw message keeps
    them); unknown members of a reading are kept in its ``extra``.
    """
    if b"\\u0000" in raw and _NUL_ESCAPE.search(raw):
        # PostgreSQL's text and jsonb cannot hold NUL: refuse it here, not in a failed batch.
        raise Rejected("bad_body", "NUL characters (\\u0000) are not allowed")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Rejected("bad_body", f"body is not JSON: {_json_error(exc)}") from None
    if not isinstance(body, dict):
        raise Rejected("bad_body", "body is not a JSON object")
    # The parser keeps the last of repeated names; another parser (an auditor's) may keep
    # the first, and then one signed body reads two ways.
    if _repeats_a_name(raw, body):
        raise Rejected("bad_body", "a member name is repeated within one object")
    if body.get("v") != PROTOCOL_VERSION or type(body.get("v")) is not int:
        raise Rejected("bad_body", f"v must be {PROTOCOL_VERSION}")
    meter = body.get("meter")
    if not isinstance(meter, str) or not METER_ID.fullmatch(meter):
        raise Rejected("bad_body", "meter must match [A-Za-z0-9_-]{1,64}")
    epoch = _int_field(body, "epoch", 0)
    seq = _int_field(body, "seq", 1)
    sent = _time_field(body.get("sent"), "sent")
    replay = body.get("replay", False)
    if type(replay) is not bool:
        raise Rejected("bad_body", "replay must be true or false")
    raw_readings = body.get("readings", [])
    if not isinstance(raw_readings, list):
        raise Rejected("bad_body", "readings must be a list")
    if len(raw_readings) > MAX_READINGS:
        raise Rejected("bad_body", f"{len(raw_readings)} readings, limit {MAX_READINGS}")
    raw_events = body.get("events", [])
    if not isinstance(raw_events, list):
        raise Rejected("bad_body", "events must be a list")
    if len(raw_events) > MAX_EVENTS:
        raise Rejected("bad_body", f"{len(raw_events)} events, limit {MAX_EVENTS}")
    readings = tuple(_reading(i, r) for i, r in enumerate(raw_readings))
    events = tuple(_event(i, e) for i, e in enumerate(raw_events))
    return Body(meter, epoch, seq, sent, replay, readings, events, content_digest(readings, events))


def check_window(body: Body, *, max_age: timedelta, max_ahead: timedelta) -> None:
    """Raise Rejected("bad_body") naming the first reading or event whose time is more than
    ``max_age`` before the body's ``sent`` or more than ``max_ahead`` after it.

    Readings and events are stored in hypertables partitioned by their time, one chunk per
    interval: without a window, one signed message with times spread over centuries makes
    a chunk per reading, and every query and plan not narrowed by time then opens all of
    them. Within the window one message touches a fixed number of chunks (docs/security.md).
    Relative to ``sent``, not to the receive time: a replay from flash is re-sent with a
    fresh ``sent`` and its original readings, up to the flash retention old; a redelivery of
    the same bytes keeps the original ``sent``, whenever it arrives (how old ``sent`` may
    be is the clock check's, in ``_signed_body``).
    """
    # Near years 1 and 9999 the window's ends leave what datetime holds: then that end is
    # open, and the times inside are already bounded by parsing.
    try:
        earliest = body.sent - max_age
    except OverflowError:
        earliest = datetime.min.replace(tzinfo=UTC)
    try:
        latest = body.sent + max_ahead
    except OverflowError:
        latest = datetime.max.replace(tzinfo=UTC)
    items: tuple[tuple[str, Sequence[Reading | Event]], ...] = (
        ("readings", body.readings),
        ("events", body.events),
    )
    for name, values in items:
        for index, value in enumerate(values):
            if value.time < earliest:
                where = f"more than {_duration(max_age)} before"
            elif value.time > latest:
                where = f"more than {_duration(max_ahead)} after"
            else:
                continue
            raise Rejected(
                "bad_body",
                f"{name}[{index}].t {format_time(value.time)} is {where} sent {format_time(body.sent)}",
            )


def _duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 86400:g} days"
    return f"{seconds:g} s"


def content_digest(readings: Sequence[Reading], events: Sequence[Event]) -> bytes:
    """SHA-256 of the data a message carries, independent of how its JSON was written
    (time zone, key order, white space), so that a replay re-serialised by a meter is
    still recognised as the same message."""
    # orjson writes an aware datetime exactly as isoformat() does (what earlier versions
    # hashed, so stored digests still match), at a sixth of the cost: a message may hold
    # 1,000 readings. Tuples are written as arrays, like lists.
    canonical = orjson.dumps(
        [
            [(r.time, r.import_wh, r.export_wh, r.extra) for r in readings],
            # An event without unknown members keeps the digest it had before they counted,
            # so that resends of messages stored earlier are still duplicates.
            [
                (e.time, e.code, e.detail) if e.unknown is None else (e.time, e.code, e.detail, e.unknown)
                for e in events
            ],
        ],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


@functools.lru_cache(maxsize=_TIME_CACHE_SIZE)
def parse_time(value: str) -> datetime:
    """An RFC 3339 date-time as an aware UTC datetime; ValueError otherwise.

    Cached: datetimes are immutable, so a hit returns exactly what parsing would, and
    only valid times are kept (a ValueError is not cached).
    """
    return _parse_time(value)


def _parse_time(value: str) -> datetime:
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    date, clock, fraction, offset = match.groups()
    # Python keeps microseconds: finer fractions are truncated, not rejected.
    fraction = (fraction or "")[:7]
    offset = "+00:00" if offset in {"Z", "z"} else offset
    try:
        instant = datetime.fromisoformat(f"{date}T{clock}{fraction}{offset}").astimezone(UTC)
    except OverflowError:
        # A time within years 1-9999 locally but not in UTC.
        raise ValueError("date-time out of range") from None
    if instant in _UNREPRESENTABLE:
        raise ValueError("date-time out of range")
    return instant


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a Z, as meters and the head-end write it."""
    text = value.astimezone(UTC).isoformat(timespec="seconds" if not value.microsecond else "milliseconds")
    return text.replace("+00:00", "Z")


def _reading(index: int, raw: object) -> Reading:
    if not isinstance(raw, dict):
        raise Rejected("bad_body", f"readings[{index}] is not an object")
    time = _time_field(raw.get("t"), f"readings[{index}].t")
    import_wh = _register(raw, "import_wh", index, required=True)
    export_wh = _register(raw, "export_wh", index, required=False)
    extra = {k: v for k, v in raw.items() if k not in _READING_KEYS} or None
    if extra is not None and _too_deep(extra, MAX_DEPTH):
        raise Rejected("bad_body", f"readings[{index}] nests deeper than {MAX_DEPTH} levels")
    assert import_wh is not None
    return Reading(time, import_wh, export_wh, extra)


def _event(index: int, raw: object) -> Event:
    if not isinstance(raw, dict):
        raise Rejected("bad_body", f"events[{index}] is not an object")
    time = _time_field(raw.get("t"), f"events[{index}].t")
    code = raw.get("code")
    if not isinstance(code, str) or not EVENT_CODE.fullmatch(code):
        raise Rejected("bad_body", f"events[{index}].code must be a 3-digit string")
    detail = raw.get("detail", {})
    if not isinstance(detail, dict):
        raise Rejected("bad_body", f"events[{index}].detail must be an object")
    if _too_deep(detail, MAX_DEPTH):
        raise Rejected("bad_body", f"events[{index}].detail nests deeper than {MAX_DEPTH} levels")
    unknown = {k: v for k, v in raw.items() if k not in _EVENT_KEYS} or None
    if unknown is not None and _too_deep(unknown, MAX_DEPTH):
        raise Rejected("bad_body", f"events[{index}] nests deeper than {MAX_DEPTH} levels")
    return Event(time, code, detail, unknown)


def _repeats_a_name(raw: bytes, body: dict[str, Any]) -> bool:
    """True when an object anywhere in ``raw`` (valid JSON, parsed as ``body``) repeats a
    member name.

    The parsed tree holds one member per distinct name, so a repeat leaves more members in
    the text than in the tree. Counts, not names, are compared: a name spelled two ways
    (``"t"`` and ``"\\u0074"``) is caught too.
    """
    # Most bodies have no escape at all, and one byte is found faster than five.
    if b"\\" not in raw or (b"u003a" not in raw and b"u003A" not in raw):
        # Nearly always, and in C. Only the escape \u003a spells a colon otherwise, so here
        # the text has one colon per member plus those of its strings, as they read.
        # orjson writes the tree with the same strings for every member it kept, and never
        # escapes a colon: each member dropped leaves the text at least a colon ahead.
        try:
            canonical = orjson.dumps(body)
        except orjson.JSONEncodeError:
            pass  # nested deeper than orjson writes (254 levels): count exactly below
        else:
            return raw.count(b":") > canonical.count(b":")
    # In valid JSON every quote outside a string opens one, so a scan from the left, string
    # after string, sees exactly the strings; those a colon follows name members.
    named = _STRING_THEN_COLON.findall(raw).count(b":")
    return named > _member_count(body)


def _member_count(value: object) -> int:
    """The members of every object in a parsed JSON value (iterative: no recursion)."""
    count = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _too_deep(value: object, limit: int) -> bool:
    """True when containers nest more than ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _register(raw: dict[str, Any], name: str, index: int, *, required: bool) -> int | None:
    value = raw.get(name)
    if value is None and not required and name not in raw:
        return None
    if type(value) is not int or not 0 <= value <= MAX_INT64:
        raise Rejected("bad_body", f"readings[{index}].{name} must be an integer >= 0")
    return value


def _int_field(body: dict[str, Any], name: str, low: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= MAX_INT64:
        raise Rejected("bad_body", f"{name} must be an integer from {low} to 2^63-1")
    return value


def _time_field(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise Rejected("bad_body", f"{name} must be an RFC 3339 date-time string")
    try:
        return parse_time(value)
    except ValueError:
        raise Rejected("bad_body", f"{name} is not an RFC 3339 date-time: {_short(value)}") from None


def _json_error(exc: orjson.JSONDecodeError) -> str:
    return str(exc).split(":", 1)[0][:120]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
