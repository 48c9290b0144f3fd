"""Gap detection, fill, loss and replay requests, on the real database with time injected."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest

from ingestd.config import DatabaseConfig, GapsConfig
from ingestd.envelope import Message, format_time, parse_body
from ingestd.gaps import (
    MAX_CHASED_REQUESTS,
    GapRequester,
    backoff,
    bound_gap,
    chunks,
    missing_ranges,
    new_gaps,
    subtract,
)
from ingestd.metrics import Metrics
from ingestd.signature import Signer, b64url_decode, generate_private_key, verify
from ingestd.store import Accept, Store

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
# Admission control's global cap out of the way: tests/test_replay_admission.py tests it.
CFG = GapsConfig(
    grace_s=60,
    max_range=1000,
    retry_initial_s=60,
    retry_max_s=3600,
    retention_days=90,
    max_outstanding_seqs=10_000_000,
)

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]


# -- pure range arithmetic ------------------------------------------------------------


def test_new_gaps() -> None:
    assert new_gaps(0, [1, 2, 3]) == []
    assert new_gaps(0, [5]) == [(1, 4)]
    assert new_gaps(2, [3, 7, 8, 10]) == [(4, 6), (9, 9)]
    assert new_gaps(10, [4, 5]) == []  # late arrivals open nothing


def test_missing_ranges() -> None:
    assert missing_ranges(1, 10, []) == [(1, 10)]
    assert missing_ranges(1, 10, [1, 10]) == [(2, 9)]
    assert missing_ranges(1, 10, [5]) == [(1, 4), (6, 10)]
    assert missing_ranges(1, 3, [1, 2, 3, 99]) == []


def test_chunks_and_subtract() -> None:
    assert chunks((1, 2500), 1000) == [(1, 1000), (1001, 2000), (2001, 2500)]
    assert chunks((5, 5), 1000) == [(5, 5)]
    assert subtract((1, 10), (4, 6)) == ([(1, 3), (7, 10)], (4, 6))
    assert subtract((1, 10), (0, 20)) == ([], (1, 10))
    assert subtract((1, 10), (11, 20)) == ([(1, 10)], None)


def test_bound_gap() -> None:
    assert bound_gap((1, 10), 10) == ((1, 10), None)
    assert bound_gap((1, 11), 10) == ((2, 11), (1, 1))
    assert bound_gap((1, 2**63 - 2), 1000) == ((2**63 - 1001, 2**63 - 2), (1, 2**63 - 1002))


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(3)
    for attempts, base in ((1, 60), (2, 120), (3, 240), (10, 3600)):
        delays = [backoff(attempts, CFG, rng) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays), attempts
        assert max(delays) - min(delays) > base * 0.3  # jittered, not constant


# -- detection and fill in the batch transaction ------------------------------------------


def accept(
    meter: str,
    seq: int,
    *,
    epoch: int = 0,
    events: list[dict[str, Any]] | None = None,
    at: datetime = T0,
) -> Accept:
    body = {
        "v": 1,
        "meter": meter,
        "epoch": epoch,
        "seq": seq,
        "sent": format_time(T0),
        "readings": [
            # (modulo: any seq up to 2^63-1 gets a representable interval)
            {
                "t": format_time(T0 - timedelta(days=30) + timedelta(minutes=15 * (seq % 10**6))),
                "import_wh": seq,
            }
        ],
        "events": events or [],
    }
    b = parse_body(orjson.dumps(body))
    message = Message(b.meter_id, b.epoch, b.seq, b.sent, b.replay, b.readings, b.events, b.digest, kid="k")
    return Accept(message, f"meters/{meter}/up", orjson.dumps(body), at)


async def write(store: Store, *items: Accept, now: datetime = T0) -> Any:
    return await store.write_batch(list(items), [], now=now)


async def gaps(db: Conn, meter: str = "M1") -> list[tuple[int, int, int, str]]:
    rows = await db.fetch(
        "SELECT epoch, from_seq, to_seq, status FROM gaps WHERE meter_id = $1"
        " ORDER BY epoch, from_seq, status",
        meter,
    )
    return [(r["epoch"], r["from_seq"], r["to_seq"], r["status"]) for r in rows]


@pytest.fixture
async def gstore(db_url: str) -> Any:
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as s:
        yield s


async def test_gap_opens_shrinks_and_fills(gstore: Store, db: Conn) -> None:
    result = await write(gstore, accept("M1", 1), accept("M1", 2), accept("M1", 5))
    assert result.gaps.detected == 1
    assert await gaps(db) == [(0, 3, 4, "open")]
    due = await db.fetchval("SELECT next_request_at FROM gaps")
    assert due == T0 + timedelta(seconds=CFG.grace_s)
    later = T0 + timedelta(minutes=5)
    await write(gstore, accept("M1", 3), now=later)
    assert await gaps(db) == [(0, 4, 4, "open")]
    result = await write(gstore, accept("M1", 4), now=later)
    assert result.gaps.filled == 1
    assert result.gaps.fill_seconds == [300.0]
    assert await gaps(db) == [(0, 4, 4, "filled")]
    assert await db.fetchval("SELECT closed_at FROM gaps") == later


async def test_late_arrival_in_the_middle_splits_the_gap(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 10))
    await write(gstore, accept("M1", 5))
    assert await gaps(db) == [(0, 2, 4, "open"), (0, 6, 9, "open")]
    detected = {r["detected_at"] for r in await db.fetch("SELECT detected_at FROM gaps")}
    assert detected == {T0}


async def test_first_sight_of_an_epoch_counts_from_seq_1(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 4))
    assert await gaps(db) == [(0, 1, 3, "open")]


async def test_new_epoch_neither_opens_nor_closes_old_gaps(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 3))
    await write(gstore, accept("M1", 1, epoch=1), accept("M1", 2, epoch=1))
    assert await gaps(db) == [(0, 2, 2, "open")]
    rows = await db.fetch("SELECT epoch, max_seq FROM meter_epochs WHERE meter_id = 'M1' ORDER BY epoch")
    assert [(r["epoch"], r["max_seq"]) for r in rows] == [(0, 3), (1, 2)]


async def test_long_outage_is_split_at_max_range(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 2502))
    assert await gaps(db) == [(0, 2, 1001, "open"), (0, 1002, 2001, "open"), (0, 2002, 2501, "open")]


async def test_seq_jump_to_the_largest_seq_costs_a_bounded_number_of_rows(gstore: Store, db: Conn) -> None:
    """A broken or stolen meter that jumps to seq 2^63-1: only the newest part of the skip is
    chased (MAX_CHASED_REQUESTS requests' worth), the rest is lost at once; before, the
    batch write tried to build 2^63 / max_range gap rows and hung the daemon."""
    top = 2**63 - 1
    chased = MAX_CHASED_REQUESTS * CFG.max_range
    result = await asyncio.wait_for(write(gstore, accept("M1", 1), accept("M1", top)), timeout=30)
    assert result.gaps.detected == MAX_CHASED_REQUESTS + 1
    assert result.gaps.lost == 1
    found = await gaps(db)
    assert found[0] == (0, 2, top - chased - 1, "lost")
    assert found[1:] == [
        (0, low, low + CFG.max_range - 1, "open") for low in range(top - chased, top - 1, CFG.max_range)
    ]
    assert await db.fetchval("SELECT closed_at FROM gaps WHERE status = 'lost'") == T0
    # A skip just within the bound is chased whole.
    await write(gstore, accept("M2", 1), accept("M2", chased + 2))
    assert [g[3] for g in await gaps(db, "M2")] == ["open"] * MAX_CHASED_REQUESTS


async def test_event_010_marks_the_range_lost_at_once(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 20))
    unavailable = {
        "t": format_time(T0),
        "code": "010",
        "detail": {"req": "r", "epoch": 0, "from_seq": 5, "to_seq": 9},
    }
    result = await write(gstore, accept("M1", 21, events=[unavailable]))
    assert result.gaps.lost == 1
    assert await gaps(db) == [(0, 2, 4, "open"), (0, 5, 9, "lost"), (0, 10, 19, "open")]


async def test_duplicates_do_not_open_gaps_but_mark_the_meter_heard(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 2))
    later = T0 + timedelta(hours=1)
    result = await write(gstore, accept("M1", 1), now=later)
    assert result.duplicates == 1
    assert await gaps(db) == []
    # last heard from is the message's arrival time (the duplicate's, T0 here)
    assert await db.fetchval("SELECT last_seen_at FROM meter_epochs WHERE meter_id = 'M1'") == T0


# -- requests ---------------------------------------------------------------------


class Outbox:
    """Stands in for the broker link's publish (the broker tests cover the real one)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


def requester(store: Store, outbox: Outbox, now: list[datetime], signer: Signer | None) -> GapRequester:
    return GapRequester(
        store,
        CFG,
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


async def test_request_after_grace_signed_and_backed_off(gstore: Store, db: Conn, headend: Signer) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 5))
    outbox, now = Outbox(), [T0 + timedelta(seconds=30)]
    req = requester(gstore, outbox, now, headend)
    assert (await req.run_once()).requests == 0  # still in grace
    now[0] = T0 + timedelta(seconds=61)
    assert (await req.run_once()).requests == 1
    topic, payload = outbox.sent[0]
    assert topic == "meters/M1/down/replay"
    envelope = orjson.loads(payload)
    signing_input = f"{envelope['protected']}.{envelope['payload']}".encode()
    assert verify("ES256", headend.key.public_key(), b64url_decode(envelope["signature"]), signing_input)
    body = orjson.loads(b64url_decode(envelope["payload"]))
    assert (body["v"], body["meter"], body["epoch"], body["from_seq"], body["to_seq"]) == (1, "M1", 0, 2, 4)
    row = await db.fetchrow("SELECT * FROM gaps")
    assert row is not None
    assert (row["status"], row["attempts"], str(row["request_id"])) == ("requested", 1, body["req"])
    wait = (row["next_request_at"] - now[0]).total_seconds()
    assert CFG.retry_initial_s * 0.5 <= wait <= CFG.retry_initial_s
    assert (await req.run_once()).requests == 0  # not due again yet


async def test_silent_meter_is_not_hammered_until_heard_from(
    gstore: Store, db: Conn, headend: Signer
) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 5))
    outbox, now = Outbox(), [T0 + timedelta(seconds=61)]
    req = requester(gstore, outbox, now, headend)
    await req.run_once()
    now[0] += timedelta(hours=1)
    await req.run_once()  # due, but the meter said nothing since it was asked
    assert len(outbox.sent) == 1
    assert await db.fetchval("SELECT next_request_at FROM gaps") is None
    # The meter speaks again: the gap is due at once, and asked for.
    await write(gstore, accept("M1", 6, at=now[0]), now=now[0])
    await write(gstore, accept("M1", 6, at=now[0]), now=now[0])
    assert await db.fetchval("SELECT next_request_at FROM gaps WHERE status = 'requested'") == now[0]
    # (the second write is a duplicate: heard from all the same)
    assert (await req.run_once()).requests == 1


async def test_gap_filled_meanwhile_is_closed_not_requested(gstore: Store, db: Conn, headend: Signer) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 4))
    # Another instance stored seq 2 and 3 (as far as this one can tell: only the ledger).
    await db.execute(
        "INSERT INTO message_seqs VALUES ('M1', 0, 2, '\\x00', now()), ('M1', 0, 3, '\\x00', now())"
    )
    outbox, now = Outbox(), [T0 + timedelta(seconds=61)]
    counts = await requester(gstore, outbox, now, headend).run_once()
    assert (counts.requests, counts.filled) == (0, 1)
    assert outbox.sent == []
    assert await gaps(db) == [(0, 2, 3, "filled")]


async def test_gap_older_than_flash_retention_is_lost(gstore: Store, db: Conn, headend: Signer) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 3))
    outbox, now = Outbox(), [T0 + timedelta(days=91)]
    counts = await requester(gstore, outbox, now, headend).run_once()
    assert (counts.lost, counts.requests) == (1, 0)
    assert await gaps(db) == [(0, 2, 2, "lost")]


async def test_two_requesters_never_ask_for_the_same_gap(gstore: Store, db_url: str, headend: Signer) -> None:
    for meter in range(30):
        await write(gstore, accept(f"M{meter}", 1), accept(f"M{meter}", 5), accept(f"M{meter}", 9))
    outbox, now = Outbox(), [T0 + timedelta(seconds=61)]
    async with Store(DatabaseConfig(url=db_url), gaps=CFG) as other:
        a = requester(gstore, outbox, now, headend)
        b = requester(other, outbox, now, headend)
        results = await asyncio.gather(*(r.run_once() for r in (a, b, a, b)))
    assert sum(r.requests for r in results) == 60
    ranges = [orjson.loads(b64url_decode(orjson.loads(p)["payload"])) for _, p in outbox.sent]
    keys = [(r["meter"], r["from_seq"], r["to_seq"]) for r in ranges]
    assert len(keys) == len(set(keys)) == 60


async def test_gap_gauges(gstore: Store, headend: Signer) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 5), accept("M2", 1), accept("M2", 3))
    metrics = Metrics()
    req = GapRequester(
        gstore,
        CFG,
        signer=headend,
        publish=Outbox(),
        topic_prefix="meters",
        metrics=metrics,
        now=lambda: T0 + timedelta(hours=5),
    )
    await req.refresh_gauges()
    r = metrics.registry
    assert r.get_sample_value("ingestd_gaps_open") == 2
    assert r.get_sample_value("ingestd_gap_seqs_missing") == 4
    assert r.get_sample_value("ingestd_gap_oldest_open_age_seconds") == 5 * 3600


async def test_no_head_end_key_no_requests(gstore: Store, db: Conn) -> None:
    await write(gstore, accept("M1", 1), accept("M1", 5))
    outbox, now = Outbox(), [T0 + timedelta(seconds=61)]
    counts = await requester(gstore, outbox, now, None).run_once()
    assert counts.requests == 0
    assert outbox.sent == []
    assert await gaps(db) == [(0, 2, 4, "open")]


async def test_a_batch_retried_after_its_commit_counts_as_accepted_once(gstore: Store, db: Conn) -> None:
    """The commit went through but its answer was lost: the retry finds its own rows."""
    batch = [accept("M1", 1), accept("M1", 2)]
    first = await write(gstore, *batch)
    retry = await gstore.write_batch(batch, [], now=T0, retry=True)
    assert (len(first.accepted), first.duplicates) == (2, 0)
    assert (len(retry.accepted), retry.duplicates) == (2, 0)
    assert retry.readings_stored == 0
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == 2
    # The same message delivered again (another arrival) is a duplicate.
    again = await gstore.write_batch([accept("M1", 1, at=T0 + timedelta(seconds=5))], [], retry=True)
    assert (len(again.accepted), again.duplicates) == (0, 1)
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == 2
