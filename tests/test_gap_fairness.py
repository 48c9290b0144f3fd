"""Replay requests shared fairly across meters, and what one meter's gaps can cost.

A stolen key that jumps its seq far ahead in message after message once made 20,000 gap
rows and 20,000 requests sent 100 a round, oldest first, so that an honest meter's gap
waited 271 s for its first request. Now each round serves meters in turns, a meter has at
most ``gaps.max_outstanding_per_meter`` requests unanswered, and at most
``gaps.max_active_per_meter`` gaps chased. Rounds are driven one by one with the clock
injected; the requests travel through the real broker, the gaps through the real database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
from test_gaps import CFG, T0, Outbox, accept, write

from ingestd.config import DatabaseConfig, GapsConfig
from ingestd.gaps import (
    MAX_CHASED_REQUESTS,
    METER_LOCK_CLASS,
    ROUND_GAPS,
    ROUND_METERS,
    GapRequester,
    plan_gaps,
)
from ingestd.metrics import Metrics
from ingestd.signature import Signer, b64url_decode, generate_private_key, verify
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

# The defaults; the tests below use them, so they hold for what ships.
OUTSTANDING = GapsConfig().max_outstanding_per_meter
ACTIVE = GapsConfig().max_active_per_meter


# -- which new gaps are chased (pure) ----------------------------------------------------


def test_plan_gaps_chases_the_newest_within_room() -> None:
    # Room for everything: each skip in chunks of max_range.
    assert plan_gaps([(2, 4), (10, 25)], max_range=10, room=5) == ([(2, 4), (10, 19), (20, 25)], [])
    # Room for two chunks: the newest two; the rest of the skips is lost, one range each.
    assert plan_gaps([(2, 4), (10, 35)], max_range=10, room=2) == ([(20, 29), (30, 35)], [(2, 4), (10, 19)])
    # No room: every skip lost whole.
    assert plan_gaps([(2, 4), (10, 35)], max_range=10, room=0) == ([], [(2, 4), (10, 35)])
    assert plan_gaps([(2, 4)], max_range=10, room=-3) == ([], [(2, 4)])


def test_plan_gaps_one_lost_range_per_skip_however_far_the_jump() -> None:
    top = 2**63 - 2
    chased, lost = plan_gaps([(2, top)], max_range=1000, room=ACTIVE)
    assert len(chased) == MAX_CHASED_REQUESTS
    assert chased[-1] == (top - 999, top)
    assert lost == [(2, top - MAX_CHASED_REQUESTS * 1000)]
    # Room for fewer than a jump's worth: the older part and the unchased chunks are one range.
    chased, lost = plan_gaps([(2, top)], max_range=1000, room=3)
    assert chased == [(top - 2999, top - 2000), (top - 1999, top - 1000), (top - 999, top)]
    assert lost == [(2, top - 3000)]


# -- the per-meter bound on gap rows -------------------------------------------------------


@pytest.fixture
async def gstore(db_url: str) -> AsyncIterator[Store]:
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as s:
        yield s


async def active_and_lost(db: Conn, meter: str) -> tuple[int, int]:
    row = await db.fetchrow(
        """SELECT count(*) FILTER (WHERE status IN ('open', 'requested')) AS active,
                  count(*) FILTER (WHERE status = 'lost') AS lost
           FROM gaps WHERE meter_id = $1""",
        meter,
    )
    assert row is not None
    return row["active"], row["lost"]


async def test_seq_jumps_cannot_grow_a_meters_gaps_without_bound(gstore: Store, db: Conn) -> None:
    """Message after message jumping 100,000 seqs: the meter's chased gaps stop at the
    bound, and every further skip costs one lost row, not a hundred open ones."""
    jump = MAX_CHASED_REQUESTS * CFG.max_range
    per_skip = MAX_CHASED_REQUESTS
    messages = ACTIVE // per_skip + 5
    for i in range(1, messages + 1):
        await write(gstore, accept("FLOOD", i * jump))
    active, lost = await active_and_lost(db, "FLOOD")
    assert active == ACTIVE
    assert lost == messages - ACTIVE // per_skip
    assert await db.fetchval("SELECT count(*) FROM gaps WHERE meter_id = 'FLOOD'") == active + lost
    # The skips past the bound are lost whole, each as one range between two held seqs.
    newest = await db.fetchrow(
        "SELECT from_seq, to_seq, closed_at FROM gaps WHERE meter_id = 'FLOOD' AND status = 'lost'"
        " ORDER BY from_seq DESC LIMIT 1"
    )
    assert newest is not None
    assert (newest["from_seq"], newest["to_seq"], newest["closed_at"]) == (
        (messages - 1) * jump + 1,
        messages * jump - 1,
        T0,
    )
    # Another meter is not affected, nor is a new epoch given room the meter does not have.
    await write(gstore, accept("HONEST", 1), accept("HONEST", 5))
    assert await active_and_lost(db, "HONEST") == (1, 0)
    await write(gstore, accept("FLOOD", 7, epoch=1))
    assert await active_and_lost(db, "FLOOD") == (ACTIVE, lost + 1)


async def test_a_batch_gives_the_room_left_to_the_newest_skips(gstore: Store, db: Conn) -> None:
    # Fill the meter up to three chunks short of the bound.
    top = 1 + 2 * (ACTIVE - 3)
    await write(gstore, *(accept("M1", s) for s in range(1, top + 1, 2)))
    assert await active_and_lost(db, "M1") == (ACTIVE - 3, 0)
    # One batch, two skips of two chunks each: the newer skip whole, one chunk of the older.
    low = top + 1
    await write(gstore, accept("M1", low + 2 * CFG.max_range), accept("M1", low + 4 * CFG.max_range + 1))
    rows = await db.fetch(
        "SELECT from_seq, to_seq, status FROM gaps WHERE meter_id = 'M1' AND from_seq > $1 ORDER BY from_seq",
        top,
    )
    older_end = low + 2 * CFG.max_range - 1
    assert [(r["from_seq"], r["to_seq"], r["status"]) for r in rows] == [
        (low, low + CFG.max_range - 1, "lost"),
        (low + CFG.max_range, older_end, "open"),
        (older_end + 2, older_end + 1 + CFG.max_range, "open"),
        (older_end + 2 + CFG.max_range, older_end + 1 + 2 * CFG.max_range, "open"),
    ]


# -- fair rounds ---------------------------------------------------------------------------


def requester(
    store: Store, outbox: Any, now: list[datetime], signer: Signer, config: GapsConfig = CFG
) -> GapRequester:
    return GapRequester(
        store,
        config,
        signer=signer,
        publish=outbox,
        topic_prefix="meters",
        metrics=Metrics(),
        now=lambda: now[0],
        rng=random.Random(1),
    )


@pytest.fixture(scope="module")
def headend() -> Signer:
    return Signer("ES256", "headend-1", generate_private_key("ES256"))


def request_body(headend: Signer, payload: bytes) -> dict[str, Any]:
    """A replay request's body, as a meter accepts it: only with the head-end's signature."""
    envelope = orjson.loads(payload)
    signing_input = f"{envelope['protected']}.{envelope['payload']}".encode()
    assert verify("ES256", headend.key.public_key(), b64url_decode(envelope["signature"]), signing_input)
    body = orjson.loads(b64url_decode(envelope["payload"]))
    assert isinstance(body, dict)
    return body


async def legacy_flood(db: Conn, meter: str, count: int, detected: datetime) -> None:
    """``count`` open gaps of one meter, all due, as an older ingestd (no per-meter bound)
    left them: the state the issue found, 20,000 rows of one meter."""
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, next_request_at)
           SELECT $1, 0, s * 1000 + 1, s * 1000 + 999, 'open',
                  $2::timestamptz, $2::timestamptz + s * interval '1 ms'
           FROM generate_series(0, $3 - 1) AS s""",
        meter,
        detected,
        count,
    )


async def requested(db: Conn, meter: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM gaps WHERE meter_id = $1 AND status = 'requested'", meter
    )
    return count


async def test_rounds_take_meters_in_turns_and_bound_outstanding(
    gstore: Store, db: Conn, headend: Signer
) -> None:
    """20,000 due gaps of one meter ahead of an honest meter's one: the honest meter is asked
    in the first round, and the flooding meter never has more than the bound unanswered."""
    await legacy_flood(db, "FLOOD", 20_000, T0)
    await write(gstore, accept("HONEST", 1), accept("HONEST", 3), now=T0 + timedelta(seconds=1))
    outbox, now = Outbox(), [T0 + timedelta(seconds=CFG.grace_s + 2)]
    req = requester(gstore, outbox, now, headend)
    first = await req.run_once()
    bodies = [request_body(headend, p) for _, p in outbox.sent]
    asked = [b["meter"] for b in bodies]
    assert ("HONEST", 2, 2) in {(b["meter"], b["from_seq"], b["to_seq"]) for b in bodies}, (
        f"the honest meter was not asked in the first round: {asked.count('FLOOD')} requests for FLOOD"
    )
    assert asked.count("FLOOD") == OUTSTANDING
    assert first.requests == OUTSTANDING + 1
    for _ in range(5):
        now[0] += timedelta(seconds=1)
        await req.run_once()
        assert await requested(db, "FLOOD") == OUTSTANDING
    assert len(outbox.sent) == OUTSTANDING + 1
    # Answers make room: two of the flood's requests filled, two new ones next round.
    await db.execute(
        """UPDATE gaps SET status = 'filled', closed_at = $1, next_request_at = NULL
           WHERE id IN (SELECT id FROM gaps WHERE meter_id = 'FLOOD' AND status = 'requested' LIMIT 2)""",
        now[0],
    )
    now[0] += timedelta(seconds=1)
    assert (await req.run_once()).requests == 2
    assert await requested(db, "FLOOD") == OUTSTANDING


async def test_a_round_shares_its_size_among_meters(gstore: Store, headend: Signer) -> None:
    """More meters due than a round takes: each gets one before any gets a second, and the
    meters left over are the first served next round."""
    config = dataclasses.replace(CFG, requests_per_round=7)
    for i in range(10):
        await write(gstore, accept(f"M{i}", 1), *(accept(f"M{i}", s) for s in (3, 5, 7)))
    outbox, now = Outbox(), [T0 + timedelta(seconds=CFG.grace_s + 1)]
    req = requester(gstore, outbox, now, headend, config)
    await req.run_once()
    first = [request_body(headend, p)["meter"] for _, p in outbox.sent]
    assert len(first) == len(set(first)) == 7
    await req.run_once()
    second = [request_body(headend, p)["meter"] for _, p in outbox.sent[7:]]
    assert set(second[:3]) == {f"M{i}" for i in range(10)} - set(first)
    assert len(second) == 7


async def test_two_instances_keep_a_meters_bound_exactly(
    gstore: Store, db_url: str, db: Conn, headend: Signer
) -> None:
    """Rounds of two instances at once: each meter is served by one of them per round, so
    the bound on unanswered requests holds across instances and no gap is asked twice."""
    await legacy_flood(db, "FLOOD", 500, T0)
    for meter in range(20):
        await write(gstore, accept(f"H{meter}", 1), accept(f"H{meter}", 3))
    outbox, now = Outbox(), [T0 + timedelta(seconds=CFG.grace_s + 1)]
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as other:
        a = requester(gstore, outbox, now, headend)
        b = requester(other, outbox, now, headend)
        for _ in range(4):
            await asyncio.gather(a.run_once(), b.run_once())
            assert await requested(db, "FLOOD") <= OUTSTANDING
    bodies = [request_body(headend, p) for _, p in outbox.sent]
    keys = [(b["meter"], b["from_seq"], b["to_seq"]) for b in bodies]
    assert len(keys) == len(set(keys)) == OUTSTANDING + 20
    assert await requested(db, "FLOOD") == OUTSTANDING


def scanned(plan: dict[str, Any]) -> tuple[int, list[str]]:
    """Rows the nodes reading table gaps produced or filtered out, and those nodes' types."""
    rows, kinds = 0, []
    if plan.get("Relation Name") == "gaps":
        loops = plan.get("Actual Loops", 1)
        rows += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * loops
        kinds.append(plan["Node Type"])
    for child in plan.get("Plans", []):
        r, k = scanned(child)
        rows += r
        kinds += k
    return rows, kinds


async def test_a_round_reads_a_few_rows_of_20000(gstore: Store, db: Conn) -> None:
    """The round's two queries read index ranges of the meters they serve: a meter with
    20,000 due gaps costs them about what one with ten does (migration 0007's indexes)."""
    await legacy_flood(db, "FLOOD", 20_000, T0)
    for meter in range(30):
        await write(gstore, accept(f"H{meter}", 1), accept(f"H{meter}", 3), now=T0 + timedelta(seconds=1))
    # Five of the flood's gaps asked for and due again: retries and new requests both.
    await db.execute(
        """UPDATE gaps SET status = 'requested', attempts = 1, last_request_at = $1, next_request_at = $1
           WHERE meter_id = 'FLOOD' AND from_seq <= 5000""",
        T0,
    )
    await db.execute("ANALYZE gaps")
    now = T0 + timedelta(seconds=CFG.grace_s + 2)
    args = (now, OUTSTANDING, CFG.requests_per_round)
    explain = "EXPLAIN (ANALYZE, FORMAT JSON) "
    # As the round runs them, in one transaction (the advisory locks are this session's).
    transaction = db.transaction()
    await transaction.start()
    try:
        meters_plan = orjson.loads(await db.fetchval(explain + ROUND_METERS, *args, METER_LOCK_CLASS))
        meters = [r["meter_id"] for r in await db.fetch(ROUND_METERS, *args, METER_LOCK_CLASS)]
        gaps_plan = orjson.loads(await db.fetchval(explain + ROUND_GAPS, meters, *args))
        due = await db.fetch(ROUND_GAPS, meters, *args)
    finally:
        await transaction.rollback()
    assert meters[0] == "FLOOD"
    assert len(meters) == 31
    assert len(due) == OUTSTANDING + 30
    for plan in (meters_plan[0]["Plan"], gaps_plan[0]["Plan"]):
        rows, kinds = scanned(plan)
        assert "Seq Scan" not in kinds, kinds
        assert rows < 500, (rows, kinds)
    # A round of three meters locks three, not every candidate.
    async with db.transaction():
        assert len(await db.fetch(ROUND_METERS, now, OUTSTANDING, 3, METER_LOCK_CLASS)) == 3
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        assert held == 3
