"""What one meter's gaps can cost: a stolen key that jumps its seq far ahead in message
after message once made a hundred gap rows a message, 20,000 for 200 messages. Now a meter
has at most ``gaps.max_active_per_meter`` gaps chased, and every skip past it is one lost
row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
import pytest
from test_gaps import CFG, T0, accept, write

from ingestd.config import DatabaseConfig, GapsConfig
from ingestd.gaps import MAX_CHASED_REQUESTS, plan_gaps
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

# The default; the tests below use it, so it holds for what ships.
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
