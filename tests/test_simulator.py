"""The simulator behaves as meters do: sequence state survives a clean restart, and an
unclean one starts a new epoch rather than reusing seqs; replay requests are answered
only when genuine, fresh and new, and only for seqs the meter created."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
from test_gaps import CFG, T0, Outbox, accept, requester, write

from helpers import wait_until
from ingestd.config import DatabaseConfig
from ingestd.gaps import replay_request
from ingestd.signature import Signer, generate_private_key
from ingestd.simulator import (
    REQUEST_MAX_AGE,
    REQUEST_MAX_AHEAD,
    Faults,
    Fleet,
    HeadendKey,
    KeyFactory,
    VirtualMeter,
    build_fleet,
    check_request,
    save_state,
)
from ingestd.store import Store
from services import MosquittoServer


def test_clean_restart_continues_the_sequence(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq, fleet[1].seq = 7, 9
    save_state(fleet, tmp_path, clean=True)
    again = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert [(m.epoch, m.seq) for m in again] == [(0, 7), (0, 9)]
    assert again[0].signer.key.public_key() == fleet[0].signer.key.public_key()  # same key from disk


def test_unclean_stop_starts_a_new_epoch(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq = 7
    save_state(fleet, tmp_path)  # as at start-up; the run then died
    again = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert (again[0].epoch, again[0].seq) == (1, 0)
    assert again[0].next_body(datetime.now(UTC), random.Random(1))["seq"] == 1


async def test_tamper_opens_then_closes_the_cover(broker: MosquittoServer, key_factory: KeyFactory) -> None:
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        fleet = Fleet(client, meters, topic_prefix="meters", headend=None, faults=Faults(tamper=1.0))
        for _ in range(3):
            await fleet.tick(meters[0])
    codes = [[e["code"] for e in body.get("events", [])] for _, body in meters[0].flash.values()]
    assert codes == [["003"], ["004"], ["003"]]
    assert fleet.stats.published == 3


# -- replay requests, as a meter checks them (docs/protocol.md section 9) ------------------


HEADEND = Signer("ES256", "headend-1", generate_private_key("ES256"))
NEXT_HEADEND = Signer("EdDSA", "headend-2", generate_private_key("EdDSA"))


def provisioned(signer: Signer) -> HeadendKey:
    return HeadendKey(signer.kid, signer.alg, signer.key.public_key())


def request_payload(
    meter: str, *, sent: datetime, req: uuid.UUID | None = None, rng: tuple[int, int] = (2, 4), epoch: int = 0
) -> bytes:
    body = replay_request(meter, req or uuid.uuid4(), epoch, rng, sent)
    return HEADEND.sign_body(body)


def check(meter: VirtualMeter, payload: bytes, now: datetime, *keys: Signer) -> dict[str, Any] | str:
    """What a meter provisioned with ``keys`` (default: HEADEND) makes of a request."""
    return check_request([provisioned(k) for k in keys or (HEADEND,)], meter, payload, now)


def test_request_older_than_the_limit_or_from_the_future_is_refused(key_factory: KeyFactory) -> None:
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    meter = meters[0]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    old = request_payload(meter.meter_id, sent=now - REQUEST_MAX_AGE - timedelta(seconds=1))
    ahead = request_payload(meter.meter_id, sent=now + REQUEST_MAX_AHEAD + timedelta(seconds=1))
    assert check(meter, old, now) == "stale"
    assert check(meter, ahead, now) == "stale"
    # At the limits themselves: answered.
    at_age = request_payload(meter.meter_id, sent=now - REQUEST_MAX_AGE)
    at_ahead = request_payload(meter.meter_id, sent=now + REQUEST_MAX_AHEAD)
    assert isinstance(check(meter, at_age, now), dict)
    assert isinstance(check(meter, at_ahead, now), dict)


def test_a_request_is_answered_once(key_factory: KeyFactory) -> None:
    """A captured genuine request re-published: refused while fresh (already answered),
    and refused as stale after that; the meter forgets answered reqs it no longer needs."""
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    meter = meters[0]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    captured = request_payload(meter.meter_id, sent=now)
    assert isinstance(check(meter, captured, now), dict)
    assert check(meter, captured, now + timedelta(minutes=1)) == "answered"
    assert check(meter, captured, now + REQUEST_MAX_AGE + timedelta(seconds=1)) == "stale"
    later = now + REQUEST_MAX_AGE + timedelta(minutes=1)
    assert isinstance(check(meter, request_payload(meter.meter_id, sent=later), later), dict)
    assert len(meter.answered) == 1  # the first req aged out


def test_malformed_or_unsigned_requests_are_refused(key_factory: KeyFactory) -> None:
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    meter = meters[0]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    good = orjson.loads(replay_request(meter.meter_id, uuid.uuid4(), 0, (1, 1), now))
    for change in (
        {"v": True},
        {"req": 7},
        {"sent": "yesterday"},
        {"epoch": -1},
        {"from_seq": 0},
        {"to_seq": 1000 + 1},  # 1,001 seqs: more than a request may ask for
        {"meter": "someone-else"},
    ):
        assert check(meter, HEADEND.sign_body(orjson.dumps(good | change)), now) == "forged"
    assert isinstance(check(meter, HEADEND.sign_body(orjson.dumps(good | {"to_seq": 1000})), now), dict)
    stranger = Signer("ES256", HEADEND.kid, generate_private_key("ES256"))
    assert check(meter, stranger.sign_body(orjson.dumps(good)), now) == "forged"


def test_two_head_end_keys_are_valid_at_once(key_factory: KeyFactory) -> None:
    """Rotation of the head-end key: meters hold the old and the new key for a while."""
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    meter = meters[0]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    for signer in (HEADEND, NEXT_HEADEND):
        body = replay_request(meter.meter_id, uuid.uuid4(), 0, (1, 1), now)
        assert isinstance(check(meter, signer.sign_body(body), now, HEADEND, NEXT_HEADEND), dict)
    # A key of the right algorithm under the other key's kid is still refused.
    swapped = Signer("EdDSA", HEADEND.kid, NEXT_HEADEND.key)
    body = replay_request(meter.meter_id, uuid.uuid4(), 0, (1, 1), now)
    assert check(meter, swapped.sign_body(body), now, HEADEND, NEXT_HEADEND) == "forged"


def test_seqs_the_meter_never_created_get_no_answer(key_factory: KeyFactory) -> None:
    meter = build_fleet(1, algs=("EdDSA",), keys=key_factory)[0]
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    rng = random.Random(1)
    for _ in range(3):
        meter.next_body(now, rng)
    meter.reset_epoch()  # epoch 0 ended at seq 3
    for _ in range(5):
        meter.next_body(now, rng)
    del meter.flash[(1, 2)]

    def ask(epoch: int, low: int, high: int) -> list[dict[str, Any]]:
        request = {"req": "r", "epoch": epoch, "from_seq": low, "to_seq": high}
        return meter.answer_replay(request, now)

    assert ask(1, 6, 10) == []  # beyond the last seq of the current epoch
    assert ask(2, 1, 5) == []  # an epoch it never had
    assert ask(7, 1, 5) == []
    assert meter.seq == 5  # and no new message was made for any of them
    answers = ask(1, 1, 9)  # 1, 3, 4, 5 replayed; 2 lost (010); 6-9 never created
    assert [a["seq"] for a in answers if a["replay"]] == [1, 3, 4, 5]
    (lost,) = [a for a in answers if not a["replay"]]
    assert [e["detail"] for e in lost["events"]] == [{"req": "r", "epoch": 1, "from_seq": 2, "to_seq": 2}]
    # An earlier epoch it remembers: answered up to that epoch's last seq only.
    assert [(a["epoch"], a["seq"], a["replay"]) for a in ask(0, 2, 9)] == [(0, 2, True), (0, 3, True)]
    del meter.flash[(0, 3)]
    (*_, lost_old) = ask(0, 2, 9)
    assert [e["detail"]["to_seq"] for e in lost_old["events"]] == [3]


async def test_head_end_retries_are_fresh_requests_the_meter_answers(
    db_url: str, key_factory: KeyFactory
) -> None:
    """The head-end's first request and its retry are each answered: every request carries
    the time it was sent and a req of its own. A copy of the first re-published later is
    refused."""
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    meter = meters[0]
    name = meter.meter_id
    outbox, now = Outbox(), [T0 + timedelta(seconds=61)]
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as store:
        await write(store, accept(name, 1), accept(name, 5))
        req = requester(store, outbox, now, HEADEND)
        assert (await req.run_once()).requests == 1
        # The meter speaks again (it is online), and the retry falls due.
        now[0] += timedelta(hours=1)
        await write(store, accept(name, 6, at=now[0]), now=now[0])
        assert (await req.run_once()).requests == 1
    (_, first), (_, retry) = outbox.sent
    arrival = T0 + timedelta(seconds=62)
    answered_first = check(meter, first, arrival)
    answered_retry = check(meter, retry, now[0] + timedelta(seconds=1))
    assert isinstance(answered_first, dict)
    assert isinstance(answered_retry, dict)
    assert answered_first["req"] != answered_retry["req"]
    assert check(meter, first, now[0] + timedelta(seconds=2)) == "stale"


async def test_a_retained_request_is_ignored(broker: MosquittoServer, key_factory: KeyFactory) -> None:
    """The head-end never retains a request: a retained one, even genuinely signed, is
    ignored; the same request published normally is taken."""
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    topic = f"meters/{meters[0].meter_id}/down/replay"
    now = datetime.now(UTC)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as head:
        await head.publish(topic, request_payload(meters[0].meter_id, sent=now), qos=1, retain=True)
        async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            fleet = Fleet(client, meters, topic_prefix="meters", headend=provisioned(HEADEND))
            serving = asyncio.create_task(fleet.serve_replays())
            try:
                await wait_until(lambda: fleet.stats.forged_requests == 1, what="the retained request")
                await head.publish(topic, request_payload(meters[0].meter_id, sent=now), qos=1)
                await wait_until(lambda: fleet.stats.requests == 1, what="the request")
            finally:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
    assert fleet.stats.forged_requests == 1


async def test_simulate_reconnects_when_the_broker_goes_away(broker: MosquittoServer, tmp_path: Path) -> None:
    """`ingestd simulate` is a fleet of meters: a broker restart must not end it (nor print
    an ExceptionGroup traceback); it reconnects and publishes on, and every line it logs is
    JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env |= {
        "INGESTD_MQTT_URL": broker.url,
        "INGESTD_MQTT_RECONNECT_INITIAL_S": "0.1",
        "INGESTD_MQTT_RECONNECT_MAX_S": "0.5",
        "INGESTD_LOG_FORMAT": "json",
    }
    args = ["--meters", "2", "--interval", "0.2", "--algs", "EdDSA", "--no-register"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd.cli", "simulate", *args, "--state", str(tmp_path / "state"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert await heard_from_fleet(broker), "the fleet published nothing"
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(0.5)  # the broker is away for a while; meters keep trying
        assert proc.returncode is None, "simulate exited when the broker went away"
        await asyncio.to_thread(broker.start)
        assert await heard_from_fleet(broker), "the fleet did not publish again after the restart"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    for line in lines:
        orjson.loads(line)  # JSON, every one: no traceback
    events = [orjson.loads(line)["event"] for line in lines]
    assert "simulator_broker_lost" in events
    assert events[-1] == "simulator_done"


async def heard_from_fleet(broker: MosquittoServer) -> bool:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("meters/+/up", qos=1)
        try:
            async with asyncio.timeout(10):
                await anext(client.messages)
        except TimeoutError:
            return False
    return True
