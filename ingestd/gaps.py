"""Sequence gaps: detection at write time, replay requests, fill and loss.

The database is the only state: the ledger ``message_seqs`` says which seqs are held, the
``gaps`` table which ranges are being chased. Detection and filling happen inside the
batch transaction (``track_seqs``); requests are sent by ``GapRequester``, which takes due
gaps with ``FOR UPDATE SKIP LOCKED``, so that with several ingestd instances on one shared
subscription exactly one of them asks for a given gap, and which re-checks the ledger
before every request, so that a gap filled by another instance is never asked for again.

One meter cannot crowd out the others: each round serves meters in turns, a meter has at
most ``gaps.max_outstanding_per_meter`` requests unanswered, and at most
``gaps.max_active_per_meter`` gaps chased (beyond it a new gap is recorded lost at once).

Nor can a backfill storm crowd out live data (admission control): every answer to a
request joins the live messages in the broker's queue and the pipeline, so the head-end
asks for no more than ``gaps.max_outstanding_seqs`` seqs at a time, fleet-wide, and for
nothing while the pipeline holds more than ``gaps.pause_at_pending_share`` of
``ingest.max_pending``. A round's requests are marked in the database and committed
before they are published: a publish that fails (or times out after the broker took it)
then delays that gap's next request by its back-off, and never makes it asked twice.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from ingestd.envelope import format_time
from ingestd.errors import ConfigError, KeyFileError
from ingestd.files import KEY_FILE_MAX, read_bounded
from ingestd.signature import Signer, alg_for_key, load_private_key

if TYPE_CHECKING:
    from ingestd.config import GapsConfig, HeadendConfig
    from ingestd.metrics import Metrics
    from ingestd.store import PoolConnection, Store

log = structlog.get_logger("ingestd.gaps")

REPLAY_UNAVAILABLE: Final = "010"
# A skip of more than this many replay requests' worth of seqs (max_range each) is chased
# only for its newest part; the older part is recorded as lost at once (100,000 seqs by
# default: over two years of 15-minute messages), so that a seq jump to 2^63-1 (a broken
# or stolen meter) costs a bounded number of rows, not 2^63 / max_range of them.
MAX_CHASED_REQUESTS: Final = 100

Range = tuple[int, int]


def missing_ranges(low: int, high: int, present: Iterable[int]) -> list[Range]:
    """The sub-ranges of [low, high] not in ``present``, in order."""
    ranges: list[Range] = []
    start = low
    for seq in sorted({s for s in present if low <= s <= high}):
        if seq > start:
            ranges.append((start, seq - 1))
        start = seq + 1
    if start <= high:
        ranges.append((start, high))
    return ranges


def new_gaps(previous_max: int, seqs: Iterable[int]) -> list[Range]:
    """Ranges skipped by seqs beyond ``previous_max`` (0: nothing seen of this epoch yet)."""
    ranges: list[Range] = []
    expected = previous_max + 1
    for seq in sorted({s for s in seqs if s > previous_max}):
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = seq + 1
    return ranges


def bound_gap(rng: Range, limit: int) -> tuple[Range, Range | None]:
    """``rng`` split into the newest ``limit`` seqs (chased) and what is older (or None)."""
    low, high = rng
    if high - low + 1 <= limit:
        return rng, None
    return (high - limit + 1, high), (low, high - limit)


def chunks(rng: Range, size: int) -> list[Range]:
    """Split a range into ranges of at most ``size`` seqs (one replay request each)."""
    low, high = rng
    return [(a, min(a + size - 1, high)) for a in range(low, high + 1, size)]


def plan_gaps(ranges: Sequence[Range], *, max_range: int, room: int) -> tuple[list[Range], list[Range]]:
    """New gaps of one (meter, epoch), in seq order, as rows: the chunks to chase and the
    ranges given up at once, both in seq order. The newest seqs are chased (the likeliest
    still in the meter's flash): at most ``MAX_CHASED_REQUESTS`` chunks of one skip and
    ``room`` chunks in all. What is not chased of a skip is one range, so each skip costs
    at most one lost row whatever the bounds."""
    chased: list[Range] = []
    lost: list[Range] = []
    for low, high in reversed(ranges):
        newest, _ = bound_gap((low, high), MAX_CHASED_REQUESTS * max_range)
        parts = chunks(newest, max_range)
        take = parts[len(parts) - min(len(parts), max(room, 0)) :]
        room -= len(take)
        chased[:0] = take
        end = take[0][0] - 1 if take else high
        if end >= low:
            lost.insert(0, (low, end))
    return chased, lost


def subtract(rng: Range, remove: Range) -> tuple[list[Range], Range | None]:
    """``rng`` without ``remove``: (what remains, the overlap or None)."""
    low, high = rng
    a, b = max(low, remove[0]), min(high, remove[1])
    if a > b:
        return [rng], None
    rest = [r for r in ((low, a - 1), (b + 1, high)) if r[0] <= r[1]]
    return rest, (a, b)


def backoff(attempts: int, config: GapsConfig, rng: random.Random) -> float:
    """Seconds until the next request: exponential, capped, with jitter (50-100 %)."""
    delay: float = min(config.retry_max_s, config.retry_initial_s * 2 ** max(0, attempts - 1))
    return delay * rng.uniform(0.5, 1.0)


@dataclass(slots=True)
class GapCounts:
    """Transitions made by one transaction, for the metrics after its commit."""

    detected: int = 0
    filled: int = 0
    lost: int = 0
    requests: int = 0
    fill_seconds: list[float] = field(default_factory=list)

    def add_fill(self, seconds: float) -> None:
        self.filled += 1
        self.fill_seconds.append(seconds)

    def plus(self, other: GapCounts) -> GapCounts:
        return GapCounts(
            self.detected + other.detected,
            self.filled + other.filled,
            self.lost + other.lost,
            self.requests + other.requests,
            [*self.fill_seconds, *other.fill_seconds],
        )


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Seen:
    """What one batch tells about one (meter, epoch)."""

    new_seqs: list[int]
    last_seen: datetime
    # Ranges the meter said it no longer holds (event 010), already validated.
    unavailable: list[Range]


async def track_seqs(
    conn: PoolConnection,
    seen: dict[tuple[str, int], Seen],
    *,
    now: datetime,
    config: GapsConfig,
) -> GapCounts:
    """Inside the batch transaction: advance each (meter, epoch)'s high-water mark, open
    gaps for skipped seqs, fill gaps with late arrivals, mark ranges lost on event 010,
    and wake gaps that were waiting to hear from their meter."""
    counts = GapCounts()
    if not seen:
        return counts
    keys = sorted(seen)
    meters = [k[0] for k in keys]
    epochs = [k[1] for k in keys]
    # Placeholders for new epochs, row locks in this sorted order (as in every instance),
    # the high-water marks before this batch, then advanced, and the meters' waiting gaps
    # woken: one call (migration 0004 says why each step is there).
    rows = await conn.fetch(
        "SELECT meter_id, epoch, previous_max FROM ingestd_advance_epochs($1, $2, $3, $4, $5)",
        meters,
        epochs,
        [max(seen[k].new_seqs, default=0) for k in keys],
        [seen[k].last_seen for k in keys],
        now,
    )
    previous = {(r["meter_id"], r["epoch"]): r["previous_max"] for r in rows}
    skipped: dict[tuple[str, int], list[Range]] = {}
    late: dict[tuple[str, int], list[int]] = {}
    for key in keys:
        prev = previous.get(key, 0)
        found = new_gaps(prev, seen[key].new_seqs)
        if found:
            skipped[key] = found
        below = [s for s in seen[key].new_seqs if s <= prev]
        if below:
            late[key] = below
    detected: list[tuple[str, int, int, int]] = []
    given_up: list[tuple[str, int, int, int]] = []
    if skipped:
        room = await _room(conn, sorted({k[0] for k in skipped}), config.max_active_per_meter)
        # A meter's newest epoch first: a reset meter's old epoch is the likelier loss.
        for key in sorted(skipped, reverse=True):
            chased, lost = plan_gaps(skipped[key], max_range=config.max_range, room=room[key[0]])
            room[key[0]] -= len(chased)
            detected.extend((key[0], key[1], a, b) for a, b in chased)
            for low, high in lost:
                given_up.append((key[0], key[1], low, high))
                log.warning("gap_given_up", meter=key[0], epoch=key[1], lost_from=low, lost_to=high)
    if detected:
        await conn.execute(
            """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, next_request_at)
               SELECT m, e, a, b, 'open', $5, $6
               FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(m, e, a, b)""",
            [d[0] for d in detected],
            [d[1] for d in detected],
            [d[2] for d in detected],
            [d[3] for d in detected],
            now,
            now + timedelta(seconds=config.grace_s),
        )
        counts.detected += len(detected)
    if given_up:
        await conn.execute(
            """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at, closed_at)
               SELECT m, e, a, b, 'lost', $5, $5
               FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(m, e, a, b)""",
            [g[0] for g in given_up],
            [g[1] for g in given_up],
            [g[2] for g in given_up],
            [g[3] for g in given_up],
            now,
        )
        counts.detected += len(given_up)
        counts.lost += len(given_up)
    for key, seqs in late.items():
        counts = counts.plus(await _fill(conn, key, seqs, now))
    for key in keys:
        for rng in seen[key].unavailable:
            counts = counts.plus(await _mark_lost(conn, key, rng, now))
    return counts


async def _room(conn: PoolConnection, meters: list[str], limit: int) -> dict[str, int]:
    """How many more gaps each meter may have chased. Under the batch's row locks on its
    (meter, epoch) rows; two instances writing two epochs of one meter at the same moment
    could each use the same room, which the next batch of that meter then finds used."""
    rows = await conn.fetch(
        """SELECT m, (SELECT count(*) FROM gaps g
                      WHERE g.meter_id = m AND g.status IN ('open', 'requested')) AS active
           FROM unnest($1::text[]) AS m""",
        meters,
    )
    return {r["m"]: max(0, limit - r["active"]) for r in rows}


async def _active_overlapping(conn: PoolConnection, key: tuple[str, int], low: int, high: int) -> list[Any]:
    return await conn.fetch(
        """SELECT * FROM gaps
           WHERE meter_id = $1 AND epoch = $2 AND status IN ('open', 'requested')
             AND from_seq <= $4 AND to_seq >= $3
           ORDER BY from_seq FOR UPDATE""",
        key[0],
        key[1],
        low,
        high,
    )


async def _fill(conn: PoolConnection, key: tuple[str, int], seqs: list[int], now: datetime) -> GapCounts:
    """Late arrivals shrink, split or close the gaps that contain them."""
    counts = GapCounts()
    for gap in await _active_overlapping(conn, key, min(seqs), max(seqs)):
        remaining = missing_ranges(gap["from_seq"], gap["to_seq"], seqs)
        if remaining == [(gap["from_seq"], gap["to_seq"])]:
            continue
        if not remaining:
            await _close(conn, gap["id"], "filled", now)
            counts.add_fill((now - gap["detected_at"]).total_seconds())
            continue
        await _reshape(conn, gap, remaining)
    return counts


async def _mark_lost(conn: PoolConnection, key: tuple[str, int], rng: Range, now: datetime) -> GapCounts:
    """The meter no longer holds ``rng``: that part of any gap becomes ``lost`` at once."""
    counts = GapCounts()
    for gap in await _active_overlapping(conn, key, rng[0], rng[1]):
        rest, overlap = subtract((gap["from_seq"], gap["to_seq"]), rng)
        if overlap is None:
            continue
        if rest:
            await _reshape(conn, gap, rest)
            await conn.execute(
                """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at,
                                     last_request_at, attempts, request_id, closed_at)
                   VALUES ($1, $2, $3, $4, 'lost', $5, $6, $7, $8, $9)""",
                gap["meter_id"],
                gap["epoch"],
                overlap[0],
                overlap[1],
                gap["detected_at"],
                gap["last_request_at"],
                gap["attempts"],
                gap["request_id"],
                now,
            )
        else:
            await _close(conn, gap["id"], "lost", now)
        counts.lost += 1
    return counts


async def _close(conn: PoolConnection, gap_id: int, status: str, now: datetime) -> None:
    await conn.execute(
        "UPDATE gaps SET status = $2, closed_at = $3, next_request_at = NULL WHERE id = $1",
        gap_id,
        status,
        now,
    )


async def _reshape(conn: PoolConnection, gap: Any, ranges: Sequence[Range]) -> None:  # noqa: ANN401
    """The gap row keeps the first range; each further range becomes a copy of it."""
    await conn.execute(
        "UPDATE gaps SET from_seq = $2, to_seq = $3 WHERE id = $1", gap["id"], ranges[0][0], ranges[0][1]
    )
    for low, high in ranges[1:]:
        await conn.execute(
            """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at,
                                 last_request_at, next_request_at, attempts, request_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            gap["meter_id"],
            gap["epoch"],
            low,
            high,
            gap["status"],
            gap["detected_at"],
            gap["last_request_at"],
            gap["next_request_at"],
            gap["attempts"],
            gap["request_id"],
        )


def unavailable_ranges(events: Iterable[Any], epoch_of_message: int) -> list[tuple[int, Range]]:
    """(epoch, range) pairs from 010 events; malformed details are ignored (and logged)."""
    found: list[tuple[int, Range]] = []
    for event in events:
        if event.code != REPLAY_UNAVAILABLE:
            continue
        detail = event.detail
        epoch, low, high = detail.get("epoch", epoch_of_message), detail.get("from_seq"), detail.get("to_seq")
        if all(type(v) is int for v in (epoch, low, high)) and epoch >= 0 and 1 <= low <= high:
            found.append((epoch, (low, high)))
        else:
            log.warning("replay_unavailable_malformed", detail=detail)
    return found


def headend_signer(config: HeadendConfig) -> Signer | None:
    """The head-end's signer for replay requests, or None when no key is configured."""
    if not config.key_file:
        return None
    pem = read_bounded(config.key_file, "headend.key_file", KEY_FILE_MAX)
    try:
        key = load_private_key(pem)
    except KeyFileError as exc:
        raise ConfigError("headend.key_file", str(exc)) from None
    return Signer(alg_for_key(key), config.kid, key)


def replay_topic(prefix: str, meter_id: str) -> str:
    return f"{prefix}/{meter_id}/down/replay"


def replay_request(meter_id: str, req: uuid.UUID, epoch: int, rng: Range, sent: datetime) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "meter": meter_id,
            "req": str(req),
            "epoch": epoch,
            "from_seq": rng[0],
            "to_seq": rng[1],
            "sent": format_time(sent),
        }
    )


# The first key of the lock that makes rounds of several instances take turns, so that
# each counts the others' requests against ``gaps.max_outstanding_seqs`` (the second key
# is 0). Apart from METER_LOCK_CLASS, whose second key is a hash that may be 0.
ROUND_LOCK_CLASS: Final = 0x1D6E5B

# Seqs asked for and not yet answered, fleet-wide: requested gaps whose retry is not yet
# due. A request past its retry time no longer counts (its meter is away, or its answer
# was lost), so that silent meters cannot hold the whole fleet's replay back; a gap
# partly answered counts only what is still missing (the fill reshapes it). $1 now.
OUTSTANDING_SEQS: Final = """
SELECT COALESCE(sum(to_seq - from_seq + 1), 0)::bigint FROM gaps
WHERE status = 'requested' AND next_request_at > $1
"""

# The first key of the per-meter advisory locks of a round (the second is the hash of the
# meter id), apart from the single-key lock of migrations. Two meters whose ids hash alike
# only share a turn: one of them may wait a round.
METER_LOCK_CLASS: Final = 0x1D6E5A

# The meters a round serves, those waiting longest first (since their first gap fell due,
# or since they were last asked, if later: a meter just served goes behind those that were
# not): each has a retry due, or an open gap due and room for another request. A meter is
# taken only if this transaction gets its advisory lock, so that with several instances
# each meter is served by one of them per round (and its requests counted by one), while
# the others go on to the next meters instead of finding that meter's gaps locked. The
# lock is tried in the outer query, over the ordered candidates, and LIMIT stops it at the
# round's last meter; OFFSET 0 keeps the planner from moving it into the subquery, where
# it would lock every candidate. Meters with open gaps are found by skipping along the index from one
# meter_id to the next: a meter with 20,000 gaps costs a lookup, not a scan.
# $1 now, $2 max outstanding, $3 meters, $4 the lock class.
ROUND_METERS: Final = """
WITH RECURSIVE open_meters(meter_id) AS (
    (SELECT meter_id FROM gaps WHERE status = 'open' ORDER BY meter_id LIMIT 1)
    UNION ALL
    SELECT (SELECT g.meter_id FROM gaps g
            WHERE g.status = 'open' AND g.meter_id > o.meter_id ORDER BY g.meter_id LIMIT 1)
    FROM open_meters o WHERE o.meter_id IS NOT NULL
), eligible(meter_id, first_due) AS (
    SELECT meter_id, min(next_request_at) FROM gaps
    WHERE status = 'requested' AND next_request_at <= $1
    GROUP BY meter_id
    UNION ALL
    SELECT o.meter_id,
           (SELECT g.next_request_at FROM gaps g
            WHERE g.status = 'open' AND g.meter_id = o.meter_id AND g.next_request_at IS NOT NULL
            ORDER BY g.next_request_at LIMIT 1)
    FROM open_meters o
    WHERE o.meter_id IS NOT NULL
      AND (SELECT count(*) FROM gaps r WHERE r.status = 'requested' AND r.meter_id = o.meter_id) < $2
)
SELECT meter_id FROM (
    SELECT e.meter_id,
           GREATEST(min(e.first_due), (SELECT max(r.last_request_at) FROM gaps r
                                       WHERE r.status = 'requested' AND r.meter_id = e.meter_id)) AS since
    FROM eligible e
    WHERE e.first_due <= $1
    GROUP BY e.meter_id
    ORDER BY since, e.meter_id
    OFFSET 0
) candidates
WHERE pg_try_advisory_xact_lock($4::int, hashtext(meter_id))
LIMIT $3
"""

# The due gaps of the round's meters, taken in turns: every meter's first, then every
# meter's second, and so on, up to the round's size. Per meter its due retries (at most
# max outstanding) and as many due open gaps as it has room for: new requests only while
# fewer than max outstanding are unanswered. Rows locked elsewhere (a batch filling the
# gap) are skipped and come back next round. $1 meters in order, $2 now, $3 max
# outstanding, $4 the round's size.
ROUND_GAPS: Final = """
WITH m AS (
    SELECT u.meter_id, u.ord,
           GREATEST(0, $3 - (SELECT count(*) FROM gaps r
                             WHERE r.status = 'requested' AND r.meter_id = u.meter_id)) AS room
    FROM unnest($1::text[]) WITH ORDINALITY AS u(meter_id, ord)
), picked AS (
    SELECT p.id, p.next_request_at, m.meter_id, m.ord FROM m
    CROSS JOIN LATERAL (
        (SELECT g.id, g.next_request_at FROM gaps g
         WHERE g.status = 'requested' AND g.meter_id = m.meter_id AND g.next_request_at <= $2
         ORDER BY g.next_request_at LIMIT $3)
        UNION ALL
        (SELECT g.id, g.next_request_at FROM gaps g
         WHERE g.status = 'open' AND g.meter_id = m.meter_id AND g.next_request_at <= $2
         ORDER BY g.next_request_at LIMIT m.room)
    ) p
), turns AS (
    SELECT id, ord, ROW_NUMBER() OVER (PARTITION BY meter_id ORDER BY next_request_at, id) AS turn
    FROM picked
    ORDER BY turn, ord
    LIMIT $4
)
SELECT g.* FROM gaps g JOIN turns t ON t.id = g.id
WHERE g.status IN ('open', 'requested') AND g.next_request_at <= $2
ORDER BY t.turn, t.ord
FOR UPDATE OF g SKIP LOCKED
"""


# A round's requests are published this many at a time: not one by one, where each
# waits for its PUBACK (up to aiomqtt's 10 s timeout if the broker is slow), and below
# the 10 publishes in flight past which aiomqtt logs a warning for every further one.
PUBLISHES_AT_ONCE: Final = 8


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A replay request marked in the database, to publish once that is committed."""

    meter_id: str
    epoch: int
    rng: Range
    attempt: int
    topic: str
    payload: bytes


class GapRequester:
    """Sends replay requests for due gaps, fairly across meters and within the admission
    limits; one of the daemon's tasks.

    ``load`` reports the pipeline's load: the messages in hand as a share of
    ``ingest.max_pending`` (0 when idle).
    """

    def __init__(
        self,
        store: Store,
        config: GapsConfig,
        *,
        signer: Signer | None,
        publish: Callable[[str, bytes], Awaitable[Any]],
        topic_prefix: str,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        load: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._store = store
        self._config = config
        self._signer = signer
        self._publish = publish
        self._prefix = topic_prefix
        self._metrics = metrics
        self._now = now
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._load = load

    async def run(self) -> None:
        if self._signer is None:
            log.warning("replay_requests_disabled", reason="headend.key_file is not set")
        while True:
            try:
                await self.run_once()
                await self.refresh_gauges()
            except Exception as exc:  # noqa: BLE001 - keep chasing gaps whatever one round hit
                log.warning("gap_round_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self._config.poll_s)

    async def refresh_gauges(self) -> None:
        async with self._store.connection() as conn:
            row = await conn.fetchrow(
                """SELECT count(*) AS open, COALESCE(sum(to_seq - from_seq + 1), 0) AS missing,
                          min(detected_at) AS oldest
                   FROM gaps WHERE status IN ('open', 'requested')"""
            )
        assert row is not None
        self._metrics.gaps_open.set(row["open"])
        self._metrics.gap_seqs_missing.set(row["missing"])
        oldest = row["oldest"]
        age = (self._now() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.gap_oldest_open_age.set(max(0.0, age))

    async def run_once(self) -> GapCounts:
        """One round: every gap taken is expired, found filled, or asked for; the requests
        are published after the round's commit."""
        outgoing: list[Outgoing] = []
        counts = await self._round(outgoing)
        if outgoing:
            slots = asyncio.Semaphore(PUBLISHES_AT_ONCE)

            async def send(request: Outgoing) -> int:
                async with slots:
                    return await self._send(request)

            counts.requests += sum(await asyncio.gather(*(send(o) for o in outgoing)))
        record_gap_counts(self._metrics, counts)
        return counts

    async def _round(self, outgoing: list[Outgoing]) -> GapCounts:
        now = self._now()
        cfg = self._config
        counts = GapCounts()
        if self._signer is not None and self._load() > cfg.pause_at_pending_share:
            # The pipeline is behind (live data or earlier answers): more answers now would
            # only queue ahead of live messages. The gaps wait; nothing is lost by that.
            self._metrics.replay_held_back.labels(reason="pending").inc()
            return counts
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1::int, 0)", ROUND_LOCK_CLASS)
            outstanding: int = await conn.fetchval(OUTSTANDING_SEQS, now)
            self._metrics.replay_outstanding_seqs.set(outstanding)
            if self._signer is not None and outstanding >= cfg.max_outstanding_seqs:
                self._metrics.replay_held_back.labels(reason="outstanding").inc()
                return counts
            meters = [
                r["meter_id"]
                for r in await conn.fetch(
                    ROUND_METERS,
                    now,
                    cfg.max_outstanding_per_meter,
                    cfg.requests_per_round,
                    METER_LOCK_CLASS,
                )
            ]
            due = (
                await conn.fetch(
                    ROUND_GAPS, meters, now, cfg.max_outstanding_per_meter, cfg.requests_per_round
                )
                if meters
                else []
            )
            retention = timedelta(days=self._config.retention_days)
            for gap in due:
                key = (gap["meter_id"], gap["epoch"])
                if gap["detected_at"] < now - retention:
                    await _close(conn, gap["id"], "lost", now)
                    counts.lost += 1
                    continue
                held = [
                    r["seq"]
                    for r in await conn.fetch(
                        """SELECT seq FROM message_seqs
                           WHERE meter_id = $1 AND epoch = $2 AND seq BETWEEN $3 AND $4""",
                        key[0],
                        key[1],
                        gap["from_seq"],
                        gap["to_seq"],
                    )
                ]
                if held:
                    # Filled meanwhile, perhaps through another instance: never ask twice.
                    counts = counts.plus(await _fill(conn, key, held, now))
                    remaining = missing_ranges(gap["from_seq"], gap["to_seq"], held)
                    if not remaining:
                        continue
                    low, high = remaining[0]
                else:
                    low, high = gap["from_seq"], gap["to_seq"]
                if self._signer is None:
                    continue
                size = high - low + 1
                if outstanding and outstanding + size > cfg.max_outstanding_seqs:
                    # Full (a request larger than the cap goes out alone). The gaps left
                    # keep their turn: the first asked for once answers make room.
                    self._metrics.replay_held_back.labels(reason="outstanding").inc()
                    await _behind(conn, sorted({o.meter_id for o in outgoing}), now)
                    break
                request = await self._mark_requested(conn, gap, (low, high), now)
                if request is not None:
                    outgoing.append(request)
                    outstanding += size
            self._metrics.replay_outstanding_seqs.set(outstanding)
        return counts

    async def _mark_requested(
        self,
        conn: PoolConnection,
        gap: Any,  # noqa: ANN401
        rng: Range,
        now: datetime,
    ) -> Outgoing | None:
        """Mark the gap requested (in the round's transaction) and sign the request; None
        when its meter has not been heard from since it was last asked."""
        assert self._signer is not None
        last_seen = await conn.fetchval(
            "SELECT last_seen_at FROM meter_epochs WHERE meter_id = $1 AND epoch = $2",
            gap["meter_id"],
            gap["epoch"],
        )
        if (
            gap["attempts"] > 0
            and gap["last_request_at"] is not None
            and (last_seen is None or last_seen < gap["last_request_at"])
        ):
            # Not heard from since we last asked: offline, most likely. Wait for it
            # (track_seqs wakes the gap when the meter next speaks) instead of hammering.
            await conn.execute("UPDATE gaps SET next_request_at = NULL WHERE id = $1", gap["id"])
            return None
        req = uuid.uuid4()
        attempts = gap["attempts"] + 1
        # Marked before it is published, and published only after the commit: a publish
        # that fails, or times out after the broker took it, must not roll the mark back,
        # or the next round would ask again at once (the meter would answer twice).
        # A request lost on the way is asked again after its back-off, like an unanswered one.
        await conn.execute(
            """UPDATE gaps SET status = 'requested', attempts = $2, last_request_at = $3,
                               next_request_at = $4, request_id = $5 WHERE id = $1""",
            gap["id"],
            attempts,
            now,
            now + timedelta(seconds=backoff(attempts, self._config, self._rng)),
            req,
        )
        body = replay_request(gap["meter_id"], req, gap["epoch"], rng, now)
        return Outgoing(
            gap["meter_id"],
            gap["epoch"],
            rng,
            attempts,
            replay_topic(self._prefix, gap["meter_id"]),
            self._signer.sign_body(body),
        )

    async def _send(self, request: Outgoing) -> int:
        """Publish one committed request: 1 if the broker took it, 0 if not."""
        try:
            await self._publish(request.topic, request.payload)
        except Exception as exc:  # noqa: BLE001 - one failed publish must not stop the others
            self._metrics.replay_publish_failures.inc()
            log.warning(
                "replay_publish_failed",
                meter=request.meter_id,
                epoch=request.epoch,
                from_seq=request.rng[0],
                to_seq=request.rng[1],
                error=str(exc) or type(exc).__name__,
            )
            return 0
        log.info(
            "replay_requested",
            meter=request.meter_id,
            epoch=request.epoch,
            from_seq=request.rng[0],
            to_seq=request.rng[1],
            attempt=request.attempt,
        )
        return 1


async def _behind(conn: PoolConnection, meters: list[str], now: datetime) -> None:
    """Put meters just served behind those a full round left waiting. A round orders
    meters by how long they have waited, and a meter whose answers all came in before the
    next round has no request left to say it was just served: its other gaps would keep
    their old due time, and it would be served first again, before meters not served at
    all. Its open gaps now fall due from now instead. Rows a batch holds are skipped (it
    is filling them), so that the round never waits on a batch that may wait on it."""
    if meters:
        await conn.execute(
            """UPDATE gaps SET next_request_at = $2
               WHERE id IN (SELECT id FROM gaps
                            WHERE status = 'open' AND meter_id = ANY($1::text[]) AND next_request_at < $2
                            FOR UPDATE SKIP LOCKED)""",
            meters,
            now,
        )


def record_gap_counts(metrics: Metrics, counts: GapCounts) -> None:
    metrics.gaps_detected.inc(counts.detected)
    metrics.gaps_filled.inc(counts.filled)
    metrics.gaps_lost.inc(counts.lost)
    metrics.replay_requests.inc(counts.requests)
    for seconds in counts.fill_seconds:
        metrics.gap_fill_seconds.observe(seconds)


def seen_from(accepted: Iterable[Any], duplicates: Iterable[Any]) -> dict[tuple[str, int], Seen]:
    """Group a batch's valid messages by (meter, epoch) for ``track_seqs``."""
    new: dict[tuple[str, int], list[int]] = defaultdict(list)
    last: dict[tuple[str, int], datetime] = {}
    unavailable: dict[tuple[str, int], list[Range]] = defaultdict(list)
    for accept, is_new in [*((a, True) for a in accepted), *((d, False) for d in duplicates)]:
        m = accept.message
        key = (m.meter_id, m.epoch)
        if is_new:
            new[key].append(m.seq)
            for epoch, rng in unavailable_ranges(m.events, m.epoch):
                unavailable[(m.meter_id, epoch)].append(rng)
        when = accept.received_at
        last[key] = max(last.get(key, when), when)
    keys = set(last) | set(unavailable)
    return {
        k: Seen(new.get(k, []), last.get(k, datetime.min.replace(tzinfo=UTC)), unavailable.get(k, []))
        for k in keys
    }
