"""The issue's attack end to end: a stolen meter key jumps its seq 100,000 ahead in 200
messages, through the real broker into a running daemon; then an honest meter loses one
message. Replay requests go out through the real broker to a meter-side subscriber.

Before the fix this made 20,000 gap rows and an honest meter waited 200 rounds (271 s)
for its first request. The requester's rounds are driven one by one with the clock
injected (its grace period passed at once), so "within one round" is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiomqtt
import asyncpg
import orjson

from conftest import running_daemon
from helpers import publish, wait_settled, wait_until
from ingestd.config import Config, GapsConfig
from ingestd.gaps import GapRequester
from ingestd.metrics import Metrics
from ingestd.signature import Signer, b64url_decode, generate_private_key, verify
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

JUMP = 100_000
FLOOD_MESSAGES = 200
# Long enough that the daemon's own requester (real clock) finds nothing due: the test's
# requester, with the clock moved past it, is the only one asking.
GRACE_S = 3600.0


@contextlib.asynccontextmanager
async def meter_side(config: Config, headend: Signer) -> AsyncIterator[list[dict[str, Any]]]:
    """Every replay request the broker delivers downstream, in order, signature checked."""
    received: list[dict[str, Any]] = []
    async with aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        identifier=f"meters-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{config.mqtt.topic_prefix}/+/down/replay", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                envelope = orjson.loads(message.payload)
                signing_input = f"{envelope['protected']}.{envelope['payload']}".encode()
                signature = b64url_decode(envelope["signature"])
                assert verify("ES256", headend.key.public_key(), signature, signing_input)
                received.append(orjson.loads(b64url_decode(envelope["payload"])))

        task = asyncio.create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_flooding_meter_does_not_delay_an_honest_meters_request(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    # The per-meter bound alone: admission control's global cap (tests/test_replay_admission.py)
    # would hold the flood's requests to two.
    cfg = dataclasses.replace(config, gaps=GapsConfig(grace_s=GRACE_S, max_outstanding_seqs=10_000_000))
    flood, honest = build_fleet(2, prefix="FAIR-", algs=("ES256",), interval_s=60, keys=key_factory)
    await register_fleet(store, [flood, honest])
    rng = random.Random(7)
    up = f"{cfg.mqtt.topic_prefix}/{{}}/up"
    async with running_daemon(cfg) as daemon:
        start = datetime.now(UTC)
        flood_messages = []
        for i in range(1, FLOOD_MESSAGES + 1):
            flood.seq = i * JUMP - 1
            body = flood.next_body(start - timedelta(minutes=FLOOD_MESSAGES + 1 - i), rng)
            flood_messages.append((up.format(flood.meter_id), flood.sign(body)))
        await publish(cfg.mqtt.host, cfg.mqtt.port, flood_messages)
        await wait_settled(daemon.metrics.registry, FLOOD_MESSAGES, within_s=120)
        # The honest meter's seq 2 is lost on the way.
        sent = [honest.next_body(datetime.now(UTC), rng) for _ in range(3)]
        await publish(
            cfg.mqtt.host,
            cfg.mqtt.port,
            [(up.format(honest.meter_id), honest.sign(b)) for b in (sent[0], sent[2])],
        )
        await wait_settled(daemon.metrics.registry, FLOOD_MESSAGES + 2)

    headend = Signer("ES256", "headend-1", generate_private_key("ES256"))
    clock = [datetime.now(UTC) + timedelta(seconds=GRACE_S + 60)]
    async with (
        meter_side(cfg, headend) as received,
        aiomqtt.Client(cfg.mqtt.host, cfg.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5) as link,
    ):
        requester = GapRequester(
            store,
            cfg.gaps,
            signer=headend,
            publish=lambda topic, payload: link.publish(topic, payload, qos=1),
            topic_prefix=cfg.mqtt.topic_prefix,
            metrics=Metrics(),
            now=lambda: clock[0],
            rng=random.Random(1),
        )
        first = await requester.run_once()
        await wait_until(lambda: len(received) == first.requests, what="the first round's requests")
        asked = [(r["meter"], r["from_seq"], r["to_seq"]) for r in received]
        flood_asked = sum(1 for a in asked if a[0] == flood.meter_id)
        assert (honest.meter_id, 2, 2) in asked, (
            f"the honest meter was not asked in the first round; the flood got {flood_asked} requests"
        )

        bound = cfg.gaps.max_outstanding_per_meter
        assert flood_asked == bound
        total = first.requests
        for _ in range(10):
            clock[0] += timedelta(seconds=cfg.gaps.poll_s)
            total += (await requester.run_once()).requests
            outstanding = await db.fetchval(
                "SELECT count(*) FROM gaps WHERE meter_id = $1 AND status = 'requested'", flood.meter_id
            )
            assert outstanding == bound
        assert total == first.requests
        await wait_until(lambda: len(received) == total, what="every request delivered")
        assert sum(1 for r in received if r["meter"] == flood.meter_id) == bound

    # The flood's gap rows: the chased ones stop at the per-meter bound, and each skip
    # past it is one lost row (before: 100 open rows a message, 20,000 in all).
    row = await db.fetchrow(
        """SELECT count(*) FILTER (WHERE status IN ('open', 'requested')) AS active,
                  count(*) FILTER (WHERE status = 'lost') AS lost
           FROM gaps WHERE meter_id = $1""",
        flood.meter_id,
    )
    assert row is not None
    per_skip = -(-(JUMP - 1) // cfg.gaps.max_range)
    assert row["active"] == cfg.gaps.max_active_per_meter
    assert row["lost"] == FLOOD_MESSAGES - cfg.gaps.max_active_per_meter // per_skip
