"""The pipeline alone (ingestd.pipeline): batching, the memory bound, acknowledgement only
after a commit, and what a failed write leads to. No broker and no database: the link is
a fake ``Upstream`` that records what it is asked, and the store a ``Store`` whose
``write_batch`` is scripted, raising the driver's own exceptions with their real SQLSTATEs
(what ingestd.faults classifies). Signatures are real, checked by a real worker process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
from structlog.testing import capture_logs

from helpers import metric, wait_until
from ingestd.config import DatabaseConfig, IngestConfig
from ingestd.envelope import MeterKey
from ingestd.keyring import Keyring
from ingestd.metrics import Metrics
from ingestd.mqtt import Delivery
from ingestd.pipeline import SPLIT_AFTER_TIMEOUTS, Pipeline
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet
from ingestd.store import Accept, BatchResult, Reject, Store

WITHIN_S = 10.0
PREFIX = "meters"


class FakeUpstream:
    """The broker link as the pipeline sees it: what was acknowledged, paused, resumed."""

    def __init__(self) -> None:
        self.acks: list[list[Delivery]] = []
        self.calls: list[str] = []

    def ack_many(self, deliveries: Sequence[Delivery]) -> int:
        self.acks.append(list(deliveries))
        self.calls.append("ack")
        return len(deliveries)

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    @property
    def acked(self) -> list[Delivery]:
        return [d for batch in self.acks for d in batch]


@dataclass(slots=True)
class Write:
    """One call of ``write_batch``: what it was given, and how it ended."""

    accepts: list[Accept]
    rejects: list[Reject]
    retry: bool
    error: BaseException | None = None

    @property
    def meters(self) -> list[str]:
        return [a.message.meter_id for a in self.accepts]


# Decides a write's fate: an exception to raise, or None to commit it.
Script = Callable[[Write, int], BaseException | None]


def commit_all(_write: Write, _attempt: int) -> BaseException | None:
    return None


class FakeStore(Store):
    """A store whose writes are scripted and recorded; nothing is connected."""

    def __init__(self, keys: list[MeterKey], script: Script) -> None:
        super().__init__(DatabaseConfig(url="postgresql://nowhere.invalid/none"))
        self.keys = keys
        self.script = script
        self.writes: list[Write] = []
        # Every write waits for it: a commit takes as long as the test wants.
        self.gate = asyncio.Event()
        self.gate.set()

    async def load_keys(self, kids: Sequence[str] | None = None) -> list[MeterKey]:
        return [k for k in self.keys if kids is None or k.kid in kids]

    async def write_batch(
        self,
        accepts: Sequence[Accept],
        rejects: Sequence[Reject],
        *,
        now: datetime | None = None,
        retry: bool = False,
    ) -> BatchResult:
        del now
        write = Write(list(accepts), list(rejects), retry)
        self.writes.append(write)
        await self.gate.wait()
        write.error = self.script(write, len(self.writes))
        if write.error is not None:
            raise write.error
        return BatchResult(list(accepts), 0, [], 0, collections.Counter())


@dataclass(slots=True)
class Harness:
    pipeline: Pipeline
    store: FakeStore
    upstream: FakeUpstream
    metrics: Metrics
    meters: list[VirtualMeter]
    rng: random.Random = field(default_factory=lambda: random.Random(3))
    mid: int = 0

    def delivery(self, meter: int = 0, *, payload: bytes | None = None) -> Delivery:
        """The next message of ``meters[meter]``, signed, as the broker would hand it over."""
        m = self.meters[meter]
        now = datetime.now(UTC)
        if payload is None:
            payload = m.sign(m.next_body(now, self.rng))
        self.mid += 1
        return Delivery(f"{PREFIX}/{m.meter_id}/up", payload, self.mid, 1, now, 1)

    def submit(self, *deliveries: Delivery) -> None:
        for d in deliveries:
            self.pipeline.submit(d)

    async def settled(self, count: int) -> None:
        await wait_until(lambda: len(self.upstream.acked) >= count, within_s=WITHIN_S, what=f"{count} acked")
        assert self.pipeline.in_hand == 0


@pytest.fixture(scope="module")
def meters() -> list[VirtualMeter]:
    return build_fleet(4, prefix="UNIT-", interval_s=60, algs=("ES256", "EdDSA"), keys=KeyFactory())


@contextlib.asynccontextmanager
async def harness(
    meters: list[VirtualMeter],
    *,
    script: Script = commit_all,
    cached: list[VirtualMeter] | None = None,
    **ingest: object,
) -> AsyncIterator[Harness]:
    """A pipeline with its stages running, over a fake store and upstream; the keys of
    ``cached`` (default: every meter's) are in the key cache from the start."""
    # Back-offs short enough not to slow the tests; one verification worker.
    config = dataclasses.replace(
        IngestConfig(batch_wait_ms=1, verify_workers=1, db_retry_initial_s=0.01, db_retry_max_s=0.01),
        **ingest,  # type: ignore[arg-type]
    )
    config.validate()
    store = FakeStore(
        [MeterKey(m.signer.kid, m.meter_id, m.signer.alg, m.signer.key.public_key()) for m in meters], script
    )
    keyring = Keyring(store)
    await keyring.fetch([m.signer.kid for m in (meters if cached is None else cached)])
    metrics = Metrics()
    upstream = FakeUpstream()
    async with Pipeline(
        config, topic_prefix=PREFIX, store=store, keyring=keyring, metrics=metrics, upstream=upstream
    ) as pipeline:
        h = Harness(pipeline, store, upstream, metrics, meters)
        async with asyncio.TaskGroup() as tasks:
            stages = [
                tasks.create_task(pipeline.run_verifier(), name="verifier"),
                tasks.create_task(pipeline.run_writer(), name="writer"),
            ]
            try:
                yield h
            finally:
                for stage in stages:
                    stage.cancel()


def meters_of(writes: list[Write]) -> list[tuple[list[str], int, bool]]:
    """Each write as (meters of its accepts, its rejects, whether it committed)."""
    return [(w.meters, len(w.rejects), w.error is None) for w in writes]


# -- batching, the memory bound, acknowledgement ------------------------------------------


async def test_deliveries_are_acknowledged_only_after_their_batch_commits(meters: list[VirtualMeter]) -> None:
    async with harness(meters) as h:
        h.store.gate.clear()
        deliveries = [h.delivery(i % 4) for i in range(5)]
        h.submit(*deliveries)
        await wait_until(lambda: bool(h.store.writes), within_s=WITHIN_S, what="the write begun")
        # Written, not yet committed: nothing acknowledged, all five held.
        assert h.upstream.acks == []
        assert h.pipeline.in_hand == 5
        assert metric(h.metrics.registry, "ingestd_pending_messages") == 5

        h.store.gate.set()
        await h.settled(5)
    assert h.upstream.acks == [deliveries]
    assert len(h.store.writes) == 1
    assert metric(h.metrics.registry, "ingestd_messages_accepted_total") == 5
    assert metric(h.metrics.registry, "ingestd_pending_messages") == 0


async def test_a_batch_holds_at_most_batch_max_in_arrival_order(meters: list[VirtualMeter]) -> None:
    async with harness(meters, batch_max=3) as h:
        deliveries = [h.delivery(i % 4) for i in range(7)]
        h.submit(*deliveries)
        await h.settled(7)
    assert [len(w.accepts) for w in h.store.writes] == [3, 3, 1]
    assert h.upstream.acks == [deliveries[:3], deliveries[3:6], deliveries[6:]]


async def test_intake_pauses_at_max_pending_and_resumes_at_half(meters: list[VirtualMeter]) -> None:
    async with harness(meters, batch_max=1, max_pending=4) as h:
        h.store.gate.clear()
        h.submit(*(h.delivery(i) for i in range(3)))
        assert h.upstream.calls == []
        h.submit(h.delivery(3))
        # At max_pending, at once: the broker, not our memory, holds the rest.
        assert h.upstream.calls == ["pause"]
        assert metric(h.metrics.registry, "ingestd_intake_paused") == 1

        h.store.gate.set()
        await h.settled(4)
    # Resumed once half of max_pending is left in hand, not at the first commit.
    assert h.upstream.calls == ["pause", "ack", "ack", "resume", "ack", "ack"]
    assert metric(h.metrics.registry, "ingestd_intake_paused") == 0


async def test_a_closed_intake_takes_nothing_new_and_drain_waits_for_what_is_in_hand(
    meters: list[VirtualMeter],
) -> None:
    async with harness(meters) as h:
        h.store.gate.clear()
        held = [h.delivery(0), h.delivery(1)]
        h.submit(*held)
        h.pipeline.close_intake()
        assert h.upstream.calls == ["pause"]
        # Not taken, so never acknowledged: the broker sends it to the next session.
        h.submit(h.delivery(2))
        assert h.pipeline.in_hand == 2
        assert metric(h.metrics.registry, "ingestd_messages_received_total") == 2
        assert await h.pipeline.drain(0) is False

        h.store.gate.set()
        assert await h.pipeline.drain(WITHIN_S) is True
    assert h.upstream.acks == [held]
    # Shutting down: never resumed, though nothing is in hand any more.
    assert "resume" not in h.upstream.calls


async def test_a_key_registered_after_the_cache_was_filled_is_looked_up(meters: list[VirtualMeter]) -> None:
    async with harness(meters, cached=meters[:1]) as h:
        h.submit(h.delivery(1))
        await h.settled(1)
    assert meters_of(h.store.writes) == [([meters[1].meter_id], 0, True)]
    assert metric(h.metrics.registry, "ingestd_messages_accepted_total") == 1


# -- failed writes ------------------------------------------------------------------------


def refusing(meter_id: str) -> Script:
    """The server refuses any write holding ``meter_id``'s message, for its data."""

    def script(write: Write, _attempt: int) -> BaseException | None:
        if meter_id in write.meters:
            return asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence")
        return None

    return script


async def test_a_data_error_splits_the_batch_until_the_message_at_fault_is_alone(
    meters: list[VirtualMeter],
) -> None:
    ids = [m.meter_id for m in meters]
    with capture_logs() as logs:
        async with harness(meters, script=refusing(ids[2])) as h:
            deliveries = [h.delivery(i) for i in range(4)]
            h.submit(*deliveries)
            await h.settled(4)
    assert meters_of(h.store.writes) == [
        (ids, 0, False),
        (ids[:2], 0, True),
        (ids[2:], 0, False),
        ([ids[2]], 0, False),
        ([], 1, True),  # the message at fault, quarantined instead
        ([ids[3]], 0, True),
    ]
    (quarantined,) = h.store.writes[4].rejects
    assert (quarantined.reason, quarantined.meter_id) == ("bad_body", ids[2])
    assert quarantined.detail.startswith("database refused it: 22P05: unsupported Unicode")
    assert quarantined.payload == deliveries[2].payload
    # Every delivery acknowledged once, with its batch, after the last part committed.
    assert h.upstream.acks == [deliveries]
    r = h.metrics.registry
    assert metric(r, "ingestd_messages_accepted_total") == 3
    assert metric(r, "ingestd_messages_rejected_total", reason="bad_body") == 1
    assert metric(r, "ingestd_db_write_errors_total") == 3
    events = [e["event"] for e in logs]
    assert events.count("batch_refused") == 2
    assert events.count("message_refused") == 1


async def test_a_quarantine_row_refused_is_written_again_in_plain_ascii(meters: list[VirtualMeter]) -> None:
    def script(write: Write, _attempt: int) -> BaseException | None:
        if any(not r.topic.isascii() for r in write.rejects):
            return asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence for encoding")
        return None

    async with harness(meters, script=script) as h:
        delivery = Delivery("meters/M\u00dc/up", b"not json", 1, 1, datetime.now(UTC), 1)
        h.submit(delivery)
        await h.settled(1)
    first, second = h.store.writes
    assert (first.error is not None, second.error) == (True, None)
    (plain,) = second.rejects
    assert (plain.reason, plain.topic, plain.payload) == ("bad_json", "meters/M\\xdc/up", b"not json")
    assert h.upstream.acks == [[delivery]]
    assert metric(h.metrics.registry, "ingestd_messages_rejected_total", reason="bad_json") == 1


async def test_a_plain_quarantine_row_refused_is_held_like_an_outage(meters: list[VirtualMeter]) -> None:
    # Not even a plain ASCII row is taken: a trigger or constraint of the operator's is at
    # fault, not the message. It is written again until taken, never dropped.
    def script(_write: Write, attempt: int) -> BaseException | None:
        if attempt <= 2:
            return asyncpg.exceptions.CheckViolationError('new row violates check constraint "ops"')
        return None

    async with harness(meters, script=script) as h:
        garbage = h.delivery(0, payload=b"not json")
        h.submit(garbage)
        await h.settled(1)
    assert meters_of(h.store.writes) == [([], 1, False), ([], 1, False), ([], 1, True)]
    assert h.upstream.acks == [[garbage]]
    assert metric(h.metrics.registry, "ingestd_db_write_errors_total") == 2


async def test_a_serialization_failure_is_written_again_whole(meters: list[VirtualMeter]) -> None:
    # The server rolled the transaction back: the next attempt is not a retry of a commit
    # that may have happened, so the store must not count the batch's rows as its own.
    def script(_write: Write, attempt: int) -> BaseException | None:
        if attempt == 1:
            return asyncpg.exceptions.SerializationError("could not serialize access")
        return None

    with capture_logs() as logs:
        async with harness(meters, script=script) as h:
            deliveries = [h.delivery(i) for i in range(3)]
            h.submit(*deliveries)
            await h.settled(3)
    ids = [m.meter_id for m in meters[:3]]
    assert meters_of(h.store.writes) == [(ids, 0, False), (ids, 0, True)]
    assert [w.retry for w in h.store.writes] == [False, False]
    assert h.upstream.acks == [deliveries]
    assert metric(h.metrics.registry, "ingestd_db_write_errors_total") == 1
    assert metric(h.metrics.registry, "ingestd_db_up") == 1
    (failed,) = [e for e in logs if e["event"] == "db_write_failed"]
    assert (failed["fault"], failed["error"]) == ("transient", "40001: could not serialize access")


async def test_a_lost_connection_is_written_again_counting_its_own_rows(meters: list[VirtualMeter]) -> None:
    # No answer: the commit may have gone through, so the retry recognises its own rows.
    def script(_write: Write, attempt: int) -> BaseException | None:
        if attempt == 1:
            return asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")
        return None

    async with harness(meters, script=script) as h:
        deliveries = [h.delivery(i) for i in range(2)]
        h.submit(*deliveries)
        await h.settled(2)
    assert [(w.retry, w.error is None) for w in h.store.writes] == [(False, False), (True, True)]
    assert h.upstream.acks == [deliveries]


async def test_a_batch_that_keeps_timing_out_is_split(meters: list[VirtualMeter]) -> None:
    def script(write: Write, _attempt: int) -> BaseException | None:
        if len(write.accepts) > 1:
            return asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")
        return None

    async with harness(meters, script=script) as h:
        deliveries = [h.delivery(i) for i in range(4)]
        h.submit(*deliveries)
        await h.settled(4)
    ids = [m.meter_id for m in meters]
    timeouts = SPLIT_AFTER_TIMEOUTS
    assert meters_of(h.store.writes) == [
        *[(ids, 0, False)] * timeouts,
        *[(ids[:2], 0, False)] * timeouts,
        ([ids[0]], 0, True),
        ([ids[1]], 0, True),
        *[(ids[2:], 0, False)] * timeouts,
        ([ids[2]], 0, True),
        ([ids[3]], 0, True),
    ]
    assert h.upstream.acks == [deliveries]
    assert metric(h.metrics.registry, "ingestd_messages_accepted_total") == 4


async def test_an_error_that_is_not_the_databases_stops_the_pipeline(meters: list[VirtualMeter]) -> None:
    def script(_write: Write, _attempt: int) -> BaseException | None:
        return RuntimeError("a bug of ours")

    upstreams: list[FakeUpstream] = []

    async def run() -> None:
        async with harness(meters, script=script) as h:
            upstreams.append(h.upstream)
            h.submit(h.delivery(0))
            # Until the writer's failure cancels the task group, and so this wait.
            await asyncio.Event().wait()

    with pytest.raises(ExceptionGroup) as raised:
        await run()
    assert raised.group_contains(RuntimeError, match="a bug of ours")
    # Nothing acknowledged: the broker delivers it again to the next session.
    assert [u.acks for u in upstreams] == [[]]
