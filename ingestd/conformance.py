"""``ingestd check-message``: would the head-end accept this message? For firmware teams.

It runs the daemon's own checks (``envelope.check_message``, every step of
docs/protocol.md section 6 but the last), with one public key from a file standing in for
the registry: no database, no broker. So it cannot disagree with the daemon on a message;
only the duplicate and ``seq_conflict`` check, which needs the messages already stored, is
left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import orjson

from ingestd.envelope import Message, MeterKey, check_message, parse_envelope, topic_meter
from ingestd.errors import KeyFileError, Rejected, RejectReason
from ingestd.signature import ALGS, Alg, is_alg, load_public_key

# Where docs/protocol.md states the rule behind each reason.
RULES: Final[dict[RejectReason, str]] = {
    "too_large": "docs/protocol.md section 2 (Size)",
    "bad_json": "docs/protocol.md section 2 (Message format)",
    "bad_envelope": "docs/protocol.md section 2 (Message format, Base64url, Protected header)",
    "unknown_key": "docs/protocol.md section 1 (Registration)",
    "revoked_key": "docs/protocol.md section 6 (Key validity)",
    "alg_mismatch": "docs/protocol.md section 3 (Algorithms)",
    "bad_signature": "docs/protocol.md sections 2 (Signing input) and 3 (Algorithms)",
    "bad_body": "docs/protocol.md section 4 (Body)",
    "topic_mismatch": "docs/protocol.md section 1 (Transport)",
    "clock_skew": "docs/protocol.md section 6 (Clock skew)",
    "seq_conflict": "docs/protocol.md section 7 (Conflicts)",
}


@dataclass(frozen=True, slots=True)
class Registration:
    """The key as the operator would register it (``ingestd meter add``). None: as the
    message says (its header's kid and alg; the topic's meter, else the body's)."""

    pem: bytes
    alg: Alg | None = None
    kid: str | None = None
    meter: str | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class _OneKey:
    key: MeterKey

    def get(self, kid: str, /) -> MeterKey | None:
        return self.key if kid == self.key.kid else None


def check_offline(
    payload: bytes,
    registration: Registration,
    *,
    topic: str | None,
    received_at: datetime,
    topic_prefix: str,
    max_clock_skew: timedelta,
    max_data_age: timedelta,
) -> Message:
    """The message if the head-end would accept it; Rejected (with the daemon's reason and
    detail) if not; KeyFileError when the key cannot be registered for its algorithm."""
    claimed = _claims(payload)
    alg = registration.alg or _alg_for(registration.pem, claimed.alg)
    public = load_public_key(registration.pem, alg)
    topic_owner = topic_meter(topic, topic_prefix) if topic is not None else None
    meter = registration.meter or topic_owner or claimed.meter or ""
    kid = registration.kid or claimed.kid or ""
    key = MeterKey(kid, meter, alg, public, registration.valid_from, registration.valid_until)
    return check_message(
        topic if topic is not None else f"{topic_prefix}/{meter}/up",
        payload,
        received_at,
        _OneKey(key),
        topic_prefix=topic_prefix,
        max_clock_skew=max_clock_skew,
        max_data_age=max_data_age,
    )


def accepted_line(message: Message) -> str:
    return (
        f"accepted: meter {message.meter_id}, epoch {message.epoch}, seq {message.seq}: "
        f"{len(message.readings)} reading(s), {len(message.events)} event(s), key {message.kid}"
    )


def rejected_lines(exc: Rejected) -> list[str]:
    return [f"rejected: {exc.reason}: {exc.detail}", f"rule: {RULES[exc.reason]}"]


@dataclass(frozen=True, slots=True)
class _Claims:
    alg: object = None
    kid: str | None = None
    meter: str | None = None


def _claims(payload: bytes) -> _Claims:
    """What the message says of itself, unverified: only to stand in for the registry
    (which key, for which meter) when the command line does not say."""
    try:
        header = parse_envelope(payload)
        body = orjson.loads(header.body)
    except (Rejected, orjson.JSONDecodeError):
        return _Claims()
    meter = body.get("meter") if isinstance(body, dict) else None
    return _Claims(header.alg, header.kid, meter if isinstance(meter, str) else None)


def _alg_for(pem: bytes, claimed: object) -> Alg:
    """The header's alg when the key suits it, else the first algorithm that suits the key."""
    candidates: list[Alg] = [claimed] if is_alg(claimed) else []
    candidates += [a for a in ALGS if a not in candidates]
    first: KeyFileError | None = None
    for alg in candidates:
        try:
            load_public_key(pem, alg)
        except KeyFileError as exc:
            first = first or exc
            continue
        return alg
    assert first is not None
    raise first
