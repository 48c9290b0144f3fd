"""The conformance vectors of docs/vectors/ (made by tests/make_vectors.py) are what the
code does: every message through ``ingestd check-message`` and, all in one run, through
the real broker, daemon and database; every replay request through a simulated meter.
So the vectors firmware teams run in their own CI can never drift from ingestd."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
import asyncpg
import orjson
import pytest
from test_cli import cli_env, ingestd

from conftest import running_daemon
from helpers import metric, publish, wait_settled
from ingestd.config import Config
from ingestd.envelope import parse_time
from ingestd.errors import REJECT_REASONS
from ingestd.signature import ALGS, Signer, b64url_decode, load_private_key, load_public_key
from ingestd.simulator import HeadendKey, VirtualMeter, check_request
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

ROOT: Final = Path(__file__).resolve().parent.parent / "docs" / "vectors"
MANIFEST: Final[dict[str, Any]] = orjson.loads((ROOT / "manifest.json").read_bytes())
REGISTRY: Final = {r["kid"]: r for r in MANIFEST["registry"]}
VECTORS: Final[list[dict[str, Any]]] = MANIFEST["vectors"]


def test_the_manifest_covers_every_algorithm_and_reason() -> None:
    accepted = {REGISTRY[v["registration"]]["alg"] for v in VECTORS if v["verdict"] == "accepted"}
    assert accepted == set(ALGS)
    assert {v["reason"] for v in VECTORS if v["verdict"] == "rejected"} == set(REJECT_REASONS)
    assert any(v["verdict"] == "duplicate" for v in VECTORS)
    for v in VECTORS:
        assert (ROOT / v["file"]).is_file(), v["name"]
    for r in MANIFEST["registry"]:
        load_public_key((ROOT / r["key"]).read_bytes(), r["alg"])


def check_message_args(vector: dict[str, Any]) -> list[str]:
    reg = REGISTRY[vector["registration"]]
    args = [
        "check-message",
        str(ROOT / vector["file"]),
        "--key",
        str(ROOT / reg["key"]),
        "--alg",
        reg["alg"],
        "--kid",
        reg["kid"],
        "--meter",
        reg["meter"],
        "--topic",
        vector["topic"],
        "--received-at",
        vector["received_at"],
        "--valid-from",
        reg["valid_from"],
    ]
    return args if reg["valid_until"] is None else [*args, "--valid-until", reg["valid_until"]]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_check_message_on_every_vector(vector: dict[str, Any]) -> None:
    proc = ingestd(*check_message_args(vector), env=cli_env(None))
    out = proc.stdout.splitlines()
    assert proc.stderr == ""
    if vector["check_message"] == "accepted":
        assert proc.returncode == 0, out
        assert out[0].startswith("accepted: ")
    else:
        assert proc.returncode == 1, out
        assert out[0].startswith(f"rejected: {vector['reason']}: ")
        assert out[1].startswith("rule: docs/protocol.md section")


async def test_every_vector_through_the_daemon(config: Config, store: Store, db: Conn) -> None:
    """One daemon, every vector in the manifest's order, each verdict as the manifest says,
    at the manifest's receive time."""
    for r in MANIFEST["registry"]:
        await store.add_meter(
            r["meter"],
            alg=r["alg"],
            kid=r["kid"],
            public_key_pem=(ROOT / r["key"]).read_text(),
            site=None,
            interval_s=None,
            valid_from=parse_time(r["valid_from"]),
            valid_until=parse_time(r["valid_until"]) if r["valid_until"] else None,
        )
    received_at = {v["received_at"] for v in VECTORS}
    assert len(received_at) == 1
    clock = parse_time(received_at.pop())
    async with running_daemon(config, now=lambda: clock) as daemon:
        registry = daemon.metrics.registry
        for i, vector in enumerate(VECTORS, start=1):
            before = outcome_counts(registry)
            payload = (ROOT / vector["file"]).read_bytes()
            await publish(config.mqtt.host, config.mqtt.port, [(vector["topic"], payload)])
            await wait_settled(registry, i)
            after = outcome_counts(registry)
            changed = [k for k in after if after[k] != before[k]]
            expected = vector["reason"] if vector["verdict"] == "rejected" else vector["verdict"]
            assert changed == [expected], vector["name"]
        # An uplink at QoS 0 is taken like one at QoS 1 (docs/protocol.md section 1), only
        # without a delivery guarantee.
        qos0 = Signer(
            "ES256", "VEC-ES256-k1", load_private_key((ROOT / "keys/es256.private.pem").read_bytes())
        )
        body = {"v": 1, "meter": "VEC-ES256", "epoch": 0, "seq": 20, "sent": "2026-11-24T00:59:00Z"}
        at_qos0 = qos0.sign_body(orjson.dumps(body))
        async with aiomqtt.Client(config.mqtt.host, config.mqtt.port, identifier="vec-qos0") as client:
            await client.publish("meters/VEC-ES256/up", at_qos0, qos=0)
        await wait_settled(registry, len(VECTORS) + 1)
        assert metric(registry, "ingestd_messages_accepted_total") == 1 + sum(
            v["verdict"] == "accepted" for v in VECTORS
        )
        assert await db.fetchval("SELECT count(*) FROM message_seqs WHERE seq = 20") == 1
    # What was accepted is stored byte for byte; what was rejected is in the quarantine.
    stored = {bytes(r["payload"]) for r in await db.fetch("SELECT payload FROM raw_messages")}
    accepted = {(ROOT / v["file"]).read_bytes() for v in VECTORS if v["verdict"] == "accepted"}
    assert stored == accepted | {at_qos0}
    reasons = sorted(r["reason"] for r in await db.fetch("SELECT reason FROM quarantine"))
    assert reasons == sorted(v["reason"] for v in VECTORS if v["verdict"] == "rejected")


def outcome_counts(registry: Any) -> dict[str, float]:
    counts: dict[str, float] = {
        reason: metric(registry, "ingestd_messages_rejected_total", reason=reason)
        for reason in REJECT_REASONS
    }
    counts["accepted"] = metric(registry, "ingestd_messages_accepted_total")
    counts["duplicate"] = metric(registry, "ingestd_messages_duplicate_total")
    return counts


def meter_in_state(state: dict[str, Any]) -> VirtualMeter:
    reg = next(r for r in MANIFEST["registry"] if r["meter"] == state["meter"] and r["kid"].endswith("-k1"))
    key = load_private_key((ROOT / reg["key"].replace(".public.", ".private.")).read_bytes())
    meter = VirtualMeter(state["meter"], Signer(reg["alg"], reg["kid"], key), site="", interval_s=900)
    meter.epoch, meter.seq = state["epoch"], state["last_seq"]
    created = parse_time("2026-11-23T00:00:00Z")
    for seq in state["in_flash"]:
        meter.flash[(state["epoch"], seq)] = (
            created,
            {"v": 1, "meter": meter.meter_id, "epoch": 0, "seq": seq},
        )
    return meter


def test_every_replay_request_vector_through_a_meter() -> None:
    """The manifest's meter state, and each request in order, as docs/protocol.md section 9
    tells a meter to treat it."""
    head = MANIFEST["headend"]
    headend = [
        HeadendKey(head["kid"], head["alg"], load_public_key((ROOT / head["key"]).read_bytes(), head["alg"]))
    ]
    for case in MANIFEST["replay_requests"]:
        meter = meter_in_state(MANIFEST["meter_state"])
        for file in case["answered_before"]:
            payload = (ROOT / file).read_bytes()
            sent = parse_time(orjson.loads(b64url_decode(orjson.loads(payload)["payload"]))["sent"])
            assert isinstance(check_request(headend, meter, payload, sent), dict)
        clock = parse_time(case["meter_clock"])
        request = check_request(headend, meter, (ROOT / case["file"]).read_bytes(), clock)
        if case["answer"] is None:
            if isinstance(request, dict):
                assert meter.answer_replay(request, clock) == [], case["name"]
            continue
        assert isinstance(request, dict), (case["name"], request)
        answers = meter.answer_replay(request, clock)
        assert [a["seq"] for a in answers if a["replay"]] == case["answer"]["replay"], case["name"]
        unavailable = [
            [e["detail"]["epoch"], e["detail"]["from_seq"], e["detail"]["to_seq"]]
            for a in answers
            if not a["replay"]
            for e in a["events"]
        ]
        assert unavailable == case["answer"]["unavailable"], case["name"]
