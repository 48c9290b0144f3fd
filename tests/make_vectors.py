"""Writes the conformance vectors of docs/vectors/ (run from the repository root:
``python tests/make_vectors.py``). test_vectors.py runs every one of them through
``ingestd check-message`` and through the real daemon and database.

The example keys are made once and kept (docs/vectors/keys/); the messages are signed anew
on every run (ECDSA, DSA and PSS signatures are randomised), so regenerate and commit the
whole directory together.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec

from ingestd.envelope import MAX_PAYLOAD, parse_time
from ingestd.gaps import replay_request
from ingestd.signature import (
    ALGS,
    Alg,
    PrivateKey,
    Signer,
    b64url_decode,
    b64url_encode,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_pem,
)

ROOT: Final = Path(__file__).resolve().parent.parent / "docs" / "vectors"
PREFIX: Final = "meters"
VALID_FROM: Final = "2026-01-01T00:00:00Z"
# The receive time check-message assumes. The daemon's is its own clock: every verdict
# below is the same at any receive time from this one on.
RECEIVED_AT: Final = "2026-11-24T01:00:00Z"
SENT: Final = "2026-11-24T00:15:03Z"
# Late enough to be in the future at any receive time these vectors will see.
FAR_FUTURE: Final = "9000-01-01T00:00:00Z"
HEADEND_KID: Final = "headend-example-1"


@dataclass
class Vectors:
    keys: dict[str, Signer] = field(default_factory=dict)
    registry: list[dict[str, Any]] = field(default_factory=list)
    vectors: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def key(self, name: str, alg: Alg) -> PrivateKey:
        path = ROOT / "keys" / f"{name}.private.pem"
        if path.exists():
            return load_private_key(path.read_bytes())
        private = _new_key(alg)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(private_key_pem(private))
        (ROOT / "keys" / f"{name}.public.pem").write_bytes(public_key_pem(private.public_key()))
        return private

    def register(
        self, meter: str, kid: str, alg: Alg, *, key_name: str, valid_until: str | None = None
    ) -> Signer:
        signer = Signer(alg, kid, self.key(key_name, alg))
        self.keys[kid] = signer
        self.registry.append(
            {
                "meter": meter,
                "kid": kid,
                "alg": alg,
                "key": f"keys/{key_name}.public.pem",
                "valid_from": VALID_FROM,
                "valid_until": valid_until,
            }
        )
        return signer

    def add(
        self,
        name: str,
        payload: bytes,
        *,
        registration: str,
        topic_meter: str,
        verdict: str,
        reason: str | None = None,
        rule: str,
    ) -> None:
        path = ROOT / "messages" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        self.vectors.append(
            {
                "name": name,
                "file": f"messages/{name}.json",
                "topic": f"{PREFIX}/{topic_meter}/up",
                "received_at": RECEIVED_AT,
                "registration": registration,
                "verdict": verdict,
                "reason": reason,
                # What check-message (no stored messages) says: duplicates and conflicts
                # are decided against what is stored.
                "check_message": "rejected"
                if verdict == "rejected" and reason != "seq_conflict"
                else "accepted",
                "rule": rule,
            }
        )


def _new_key(alg: Alg) -> PrivateKey:
    if alg == "DS256":
        return dsa.generate_private_key(key_size=2048)
    return generate_private_key(alg)


def body(meter: str, seq: int, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "v": 1,
        "meter": meter,
        "epoch": 0,
        "seq": seq,
        "sent": SENT,
        "replay": False,
        "readings": [{"t": "2026-11-24T00:15:00Z", "import_wh": 1234567 + seq, "export_wh": 0}],
        "events": [{"t": "2026-11-24T00:14:10Z", "code": "001", "detail": {}}],
    }
    value.update(changes)
    return value


def signed(signer: Signer, value: dict[str, Any] | bytes, *, header: dict[str, Any] | None = None) -> bytes:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    protected = b64url_encode(orjson.dumps(header)) if header is not None else None
    return signer.sign_body(raw, protected)


def envelope(protected: str, payload: str, signature: str) -> bytes:
    return orjson.dumps({"protected": protected, "payload": payload, "signature": signature})


def parts(message: bytes) -> tuple[str, str, str]:
    value = orjson.loads(message)
    return value["protected"], value["payload"], value["signature"]


def padded_to(signer: Signer, meter: str, seq: int, size: int) -> bytes:
    """A heartbeat whose envelope is exactly ``size`` bytes (an ignored member pads it)."""
    pad = 0
    while True:
        message = signed(signer, body(meter, seq, readings=[], events=[], pad="x" * pad))
        if len(message) >= size:
            break
        pad += max(1, (size - len(message)) * 3 // 4)
    while len(message) > size:
        pad -= 1
        message = signed(signer, body(meter, seq, readings=[], events=[], pad="x" * pad))
    assert len(message) == size, (len(message), size)
    return message


def build() -> Vectors:
    v = Vectors()
    meters: dict[Alg, Signer] = {}
    for alg in ALGS:
        meter = f"VEC-{alg.upper()}"
        meters[alg] = v.register(meter, f"{meter}-k1", alg, key_name=alg.lower())
    es, ed = meters["ES256"], meters["EdDSA"]
    rotated = v.register("VEC-ES256", "VEC-ES256-k2", "ES256", key_name="es256-rotated")
    expired = v.register(
        "VEC-EXPIRED", "VEC-EXPIRED-k1", "ES256", key_name="es256-expired", valid_until="2026-06-01T00:00:00Z"
    )

    # -- accepted: one per algorithm --------------------------------------------------
    for alg, signer in meters.items():
        meter = signer.kid[:-3]
        v.add(
            f"accept-{alg.lower()}",
            signed(signer, body(meter, 1)),
            registration=signer.kid,
            topic_meter=meter,
            verdict="accepted",
            rule=f"a valid {alg} message (docs/protocol.md sections 2-4)",
        )

    # -- duplicates and conflicts (after accept-es256: VEC-ES256 epoch 0 seq 1) ---------
    first = orjson.loads(b64url_decode(parts(v_file("accept-es256"))[1]))
    v.add(
        "duplicate-verbatim",
        v_file("accept-es256"),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="duplicate",
        rule="the same bytes again (an MQTT redelivery, or a verbatim resend from flash): a duplicate",
    )
    v.add(
        "duplicate-replay",
        signed(es, dict(first, replay=True, sent="2026-11-24T00:19:00Z")),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="duplicate",
        rule="re-signed with replay true and a new sent, same readings and events: a duplicate (section 7)",
    )
    v.add(
        "duplicate-rotated-key",
        signed(rotated, dict(first, replay=True, sent="2026-11-24T00:19:30Z")),
        registration=rotated.kid,
        topic_meter="VEC-ES256",
        verdict="duplicate",
        rule="re-signed with the meter's next key after a rotation: a duplicate (section 6, Key validity)",
    )
    v.add(
        "conflict-other-reading",
        signed(es, dict(first, readings=[{"t": "2026-11-24T00:15:00Z", "import_wh": 1, "export_wh": 0}])),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="seq_conflict",
        rule="the same (meter, epoch, seq) with other readings: the first stays (section 7)",
    )
    v.add(
        "conflict-unknown-event-member",
        signed(es, dict(first, events=[dict(first["events"][0], note="changed")])),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="seq_conflict",
        rule="an unknown member of an event is signed content: changing it on a resend is a conflict",
    )

    # -- notation that is accepted ------------------------------------------------------
    v.add(
        "accept-lowercase-t-z",
        signed(es, body("VEC-ES256", 2, sent="2026-11-24t00:30:03z", readings=[], events=[])),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="accepted",
        rule="lowercase t and z are accepted (RFC 3339 section 5.6), but meters SHOULD write T and Z",
    )
    v.add(
        "accept-minus-zero-offset",
        signed(
            es,
            body(
                "VEC-ES256",
                3,
                sent="2026-11-24T00:45:03-00:00",
                readings=[{"t": "2026-11-24T00:45:00-00:00", "import_wh": 1234600}],
                events=[],
            ),
        ),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="accepted",
        rule="-00:00 is accepted and means UTC (RFC 3339 section 4.3)",
    )
    v.add(
        "accept-heartbeat",
        signed(es, {"v": 1, "meter": "VEC-ES256", "epoch": 0, "seq": 4, "sent": SENT}),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="accepted",
        rule="no readings, no events, replay absent: a heartbeat (section 4)",
    )
    req = str(uuid.uuid5(uuid.NAMESPACE_URL, "ingestd-vectors/accept-two-010-events"))
    v.add(
        "accept-two-010-events",
        signed(
            es,
            body(
                "VEC-ES256",
                13,
                sent="2026-11-24T00:50:00Z",
                readings=[],
                events=[
                    {
                        "t": "2026-11-24T00:50:00Z",
                        "code": "010",
                        "detail": {"req": req, "epoch": 0, "from_seq": a, "to_seq": b},
                    }
                    for a, b in ((1, 1), (3, 4))
                ],
            ),
        ),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="accepted",
        rule="an answer to a replay request: one new message, one event 010 per missing part, "
        "written at the same instant (section 9)",
    )
    v.add(
        "accept-size-65536",
        padded_to(es, "VEC-ES256", 5, MAX_PAYLOAD),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="accepted",
        rule="an envelope of exactly 65,536 bytes (section 2, Size)",
    )

    # -- one message per rejection reason, and common mistakes ---------------------------
    v.add(
        "reject-too-large",
        padded_to(es, "VEC-ES256", 6, MAX_PAYLOAD + 1),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="too_large",
        rule="an envelope of 65,537 bytes (section 2, Size)",
    )
    v.add(
        "reject-not-json",
        b'{"protected":"eyJhbGciOiJFUzI1NiJ9",',
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_json",
        rule="the payload is not JSON (section 2)",
    )
    protected, payload, signature = parts(signed(es, body("VEC-ES256", 7)))
    v.add(
        "reject-padding",
        envelope(protected, payload, signature + "=="),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_envelope",
        rule="base64url with = padding (section 2, Base64url)",
    )
    stray = signature[:-1] + _with_stray_bits(signature[-1])
    v.add(
        "reject-stray-bits",
        envelope(protected, payload, stray),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_envelope",
        rule="the signature's last character has non-zero unused bits (section 2, Base64url)",
    )
    v.add(
        "reject-unprotected-header",
        orjson.dumps(
            {"protected": protected, "header": {"kid": es.kid}, "payload": payload, "signature": signature}
        ),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_envelope",
        rule="a member other than protected, payload and signature (section 2)",
    )
    v.add(
        "reject-alg-none",
        envelope(b64url_encode(b'{"alg":"none","kid":"VEC-ES256-k1"}'), payload, ""),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_envelope",
        rule="alg none (section 2, Protected header)",
    )
    v.add(
        "reject-unknown-kid",
        signed(es, body("VEC-ES256", 8), header={"alg": "ES256", "kid": "VEC-ES256-k9"}),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="unknown_key",
        rule="a kid nobody registered (section 1, Registration)",
    )
    v.add(
        "reject-expired-key",
        signed(expired, body("VEC-EXPIRED", 1)),
        registration=expired.kid,
        topic_meter="VEC-EXPIRED",
        verdict="rejected",
        reason="revoked_key",
        rule="the key expired (valid_until) before the receive time (section 6, Key validity)",
    )
    v.add(
        "reject-eddsa-header-on-ed25519-key",
        signed(meters["Ed25519"], body("VEC-ED25519", 2), header={"alg": "EdDSA", "kid": "VEC-ED25519-k1"}),
        registration="VEC-ED25519-k1",
        topic_meter="VEC-ED25519",
        verdict="rejected",
        reason="alg_mismatch",
        rule="the header says EdDSA, the key is registered as Ed25519: the names must match (section 3)",
    )
    der_input = f"{protected}.{payload}".encode("ascii")
    assert isinstance(es.key, ec.EllipticCurvePrivateKey)
    der = es.key.sign(der_input, ec.ECDSA(hashes.SHA256()))
    v.add(
        "reject-der-signature",
        envelope(protected, payload, b64url_encode(der)),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_signature",
        rule="an ES256 signature in DER, not r || s (section 3)",
    )
    v.add(
        "reject-body-changed",
        envelope(protected, b64url_encode(orjson.dumps(dict(body("VEC-ES256", 7), seq=70))), signature),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_signature",
        rule="the body was changed after signing (section 2, Signing input)",
    )
    v.add(
        "reject-time-without-offset",
        signed(es, body("VEC-ES256", 9, readings=[{"t": "2026-11-24T00:15:00", "import_wh": 1}])),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_body",
        rule="a time without Z or an offset (section 4)",
    )
    v.add(
        "reject-integer-above-int64",
        signed(es, body("VEC-ES256", 10, readings=[{"t": "2026-11-24T00:15:00Z", "import_wh": 2**63}])),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_body",
        rule="an integer above 2^63-1 (section 4)",
    )
    v.add(
        "reject-float-register",
        signed(
            es, orjson.dumps(body("VEC-ES256", 11)).replace(b'"import_wh":1234578', b'"import_wh":1234578.0')
        ),
        registration=es.kid,
        topic_meter="VEC-ES256",
        verdict="rejected",
        reason="bad_body",
        rule="1234578.0 is not an integer (section 4)",
    )
    v.add(
        "reject-other-meters-topic",
        signed(es, body("VEC-ES256", 12)),
        registration=es.kid,
        topic_meter="VEC-PS256",
        verdict="rejected",
        reason="topic_mismatch",
        rule="published on another meter's uplink topic (section 1, Transport)",
    )
    v.add(
        "reject-sent-in-the-future",
        signed(ed, {"v": 1, "meter": "VEC-EDDSA", "epoch": 0, "seq": 2, "sent": FAR_FUTURE}),
        registration=ed.kid,
        topic_meter="VEC-EDDSA",
        verdict="rejected",
        reason="clock_skew",
        rule="sent more than 5 minutes after the receive time (section 6, Clock skew)",
    )

    # -- replay requests, as a meter must treat them ------------------------------------
    headend = Signer("ES256", HEADEND_KID, v.key("headend", "ES256"))
    v.requests.extend(replay_requests(headend))
    return v


def _with_stray_bits(last: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return alphabet[alphabet.index(last) | 1]


def v_file(name: str) -> bytes:
    return (ROOT / "messages" / f"{name}.json").read_bytes()


def replay_requests(headend: Signer) -> list[dict[str, Any]]:
    """Requests to VEC-ES256, whose state is given: epoch 0, last seq 5, seqs 1 and 2 still
    in flash, 3 to 5 gone; nothing of epoch 1 or later."""
    sent = parse_time("2026-11-24T01:00:00Z")
    out: list[dict[str, Any]] = []

    def request(
        name: str, signer: Signer, rng: tuple[int, int], *, epoch: int = 0, meter: str = "VEC-ES256"
    ) -> str:
        req = uuid.uuid5(uuid.NAMESPACE_URL, f"ingestd-vectors/{name}")
        path = ROOT / "requests" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(signer.sign_body(replay_request(meter, req, epoch, rng, sent)))
        return f"requests/{name}.json"

    def case(
        name: str, file: str, clock: datetime, answer: dict[str, Any] | None, rule: str, *, answered: str = ""
    ) -> None:
        out.append(
            {
                "name": name,
                "file": file,
                "meter_clock": _fmt(clock),
                # Requests the meter answered before (each when it was sent), on top of
                # meter_state; every case starts from meter_state.
                "answered_before": [answered] if answered else [],
                "answer": answer,
                "rule": rule,
            }
        )

    ok = request("request-1-3", headend, (1, 3))
    case(
        "answer",
        ok,
        sent + timedelta(seconds=30),
        {"replay": [1, 2], "unavailable": [[0, 3, 3]]},
        "fresh and genuine: replay seqs 1 and 2, and one new message with event 010 for 3-3",
    )
    case(
        "answered-already", ok, sent + timedelta(minutes=1), None, "the same req again: ignored", answered=ok
    )
    case("stale", ok, sent + timedelta(minutes=15, seconds=1), None, "sent more than 15 minutes ago: ignored")
    case(
        "from-the-future",
        ok,
        sent - timedelta(minutes=5, seconds=1),
        None,
        "sent more than 5 minutes ahead of the meter's clock: ignored",
    )
    case(
        "never-created",
        request("request-4-9", headend, (4, 9)),
        sent + timedelta(seconds=30),
        {"replay": [], "unavailable": [[0, 4, 5]]},
        "seqs 6-9 were never created: no answer for them; 4-5 were, and are gone",
    )
    case(
        "unknown-epoch",
        request("request-epoch-1", headend, (1, 3), epoch=1),
        sent + timedelta(seconds=30),
        None,
        "an epoch the meter has no record of: no answer",
    )
    forger = Signer("ES256", HEADEND_KID, generate_private_key("ES256"))
    case(
        "forged",
        request("request-forged", forger, (1, 3)),
        sent + timedelta(seconds=30),
        None,
        "the head-end's kid, another key: ignored",
    )
    case(
        "other-meter",
        request("request-other-meter", headend, (1, 3), meter="VEC-PS256"),
        sent + timedelta(seconds=30),
        None,
        "addressed to another meter: ignored",
    )
    return out


def _fmt(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def write(v: Vectors) -> None:
    manifest = {
        "about": "Conformance vectors of the meter wire protocol v1 (docs/protocol.md); see README.md here.",
        "topic_prefix": PREFIX,
        "registry": v.registry,
        "vectors": v.vectors,
        "headend": {"kid": HEADEND_KID, "alg": "ES256", "key": "keys/headend.public.pem"},
        "meter_state": {
            "meter": "VEC-ES256",
            "epoch": 0,
            "last_seq": 5,
            "in_flash": [1, 2],
            "request_max_age_s": 900,
            "request_max_ahead_s": 300,
        },
        "replay_requests": v.requests,
    }
    (ROOT / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")


def main() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    for stale in [*ROOT.glob("messages/*.json"), *ROOT.glob("requests/*.json")]:
        stale.unlink()
    vectors = build()
    write(vectors)
    print(f"{len(vectors.vectors)} messages, {len(vectors.requests)} replay request cases in {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
