"""A replay request is never sent twice for one publish.

A request published inside the round's transaction, whose publish timed out after the
broker took it, rolled the round back: the meter was asked again at once. Rounds are
driven one by one with the clock injected; the gaps live in the real database.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiomqtt
import asyncpg
import orjson
import pytest
from test_gaps import CFG, T0, Outbox, accept, write

from ingestd.config import DatabaseConfig, GapsConfig
from ingestd.gaps import GapRequester
from ingestd.metrics import Metrics
from ingestd.signature import Signer, b64url_decode, generate_private_key
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]


@pytest.fixture
async def gstore(db_url: str) -> AsyncIterator[Store]:
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as s:
        yield s


@pytest.fixture(scope="module")
def headend() -> Signer:
    return Signer("ES256", "headend-1", generate_private_key("ES256"))


def requester(
    store: Store,
    publish: Any,
    now: list[datetime],
    signer: Signer,
    config: GapsConfig = CFG,
    metrics: Metrics | None = None,
) -> GapRequester:
    return GapRequester(
        store,
        config,
        signer=signer,
        publish=publish,
        topic_prefix="meters",
        metrics=metrics or Metrics(),
        now=lambda: now[0],
        rng=random.Random(1),
    )


def bodies(outbox: Outbox) -> list[dict[str, Any]]:
    return [orjson.loads(b64url_decode(orjson.loads(p)["payload"])) for _, p in outbox.sent]


class SentThenTimedOut(Outbox):
    """A publish that reaches the broker and then fails for the sender, as aiomqtt's does
    when the PUBACK does not come back within its timeout (intake paused, a slow link):
    the meter gets the request, the head-end an exception."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__()
        self.failing = failing

    async def __call__(self, topic: str, payload: bytes) -> None:
        await super().__call__(topic, payload)
        if topic.split("/")[1] in self.failing:
            self.failing.discard(topic.split("/")[1])
            raise aiomqtt.MqttError("Operation timed out")


async def test_a_publish_that_times_out_after_sending_is_not_asked_again(
    gstore: Store, db: Conn, headend: Signer
) -> None:
    """Before the fix the failed publish rolled the round back: both meters' gaps were
    un-marked although both requests had gone out, and the next round asked again."""
    await write(gstore, accept("M1", 1), accept("M1", 5), accept("M2", 1), accept("M2", 3))
    outbox, now = SentThenTimedOut({"M1"}), [T0 + timedelta(seconds=CFG.grace_s + 1)]
    metrics = Metrics()
    req = requester(gstore, outbox, now, headend, metrics=metrics)
    with contextlib.suppress(Exception):  # (the unfixed round raised)
        await req.run_once()
    for _ in range(5):
        now[0] += timedelta(seconds=CFG.poll_s)
        await req.run_once()
    asked = [(b["meter"], b["from_seq"], b["to_seq"]) for b in bodies(outbox)]
    assert sorted(asked) == [("M1", 2, 4), ("M2", 2, 2)], f"asked twice: {asked}"
    rows = await db.fetch("SELECT meter_id, status, attempts, request_id FROM gaps ORDER BY meter_id")
    sent = {b["meter"]: b["req"] for b in bodies(outbox)}
    assert [(r["meter_id"], r["status"], r["attempts"], str(r["request_id"])) for r in rows] == [
        ("M1", "requested", 1, sent["M1"]),
        ("M2", "requested", 1, sent["M2"]),
    ]
    assert metrics.registry.get_sample_value("ingestd_replay_publish_failures_total") == 1
    assert metrics.registry.get_sample_value("ingestd_replay_requests_total") == 1
    # The failed one is asked again after its back-off, like an unanswered request, with
    # a new req (M1 has spoken since; M2 has not, and waits for that as before).
    now[0] += timedelta(seconds=CFG.retry_initial_s)
    await write(gstore, accept("M1", 6, at=now[0]), now=now[0])
    assert (await req.run_once()).requests == 1
    again = bodies(outbox)[2:]
    assert [(b["meter"], b["from_seq"], b["to_seq"]) for b in again] == [("M1", 2, 4)]
    assert again[0]["req"] != sent["M1"]
