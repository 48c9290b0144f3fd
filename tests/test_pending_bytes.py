"""Pending work is bounded in bytes as well as in messages (``ingest.max_pending_bytes``,
``ingest.batch_max_bytes``): the accounting as unit tests, then a backlog of maximum-size
messages drained through the real broker, daemon and database."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

import asyncpg
import pytest

from conftest import running_daemon, with_ingest
from helpers import FastPublisher, max_size_messages, metric, publish, wait_settled
from ingestd.config import Config, IngestConfig, load_config
from ingestd.envelope import MAX_PAYLOAD, MAX_READINGS
from ingestd.errors import ConfigError
from ingestd.keyring import Keyring
from ingestd.metrics import Metrics
from ingestd.mqtt import Delivery
from ingestd.pipeline import Batch, PendingBudget, Pipeline, receive_maximum
from ingestd.signature import Signer, public_key_pem
from ingestd.simulator import KeyFactory
from ingestd.store import BatchResult, Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

KIB = 1024


# -- the accounting ------------------------------------------------------------------------


def test_budget_reaches_either_bound() -> None:
    by_count = PendingBudget(max_messages=3, max_bytes=1_000_000)
    assert [by_count.take(10) for _ in range(3)] == [False, False, True]
    by_bytes = PendingBudget(max_messages=1000, max_bytes=100)
    assert [by_bytes.take(40) for _ in range(3)] == [False, False, True]
    assert (by_bytes.messages, by_bytes.bytes) == (3, 120)


def test_budget_takes_a_message_larger_than_the_byte_bound() -> None:
    budget = PendingBudget(max_messages=1000, max_bytes=100)
    assert budget.take(500) is True
    assert budget.bytes == 500
    assert not budget.low
    budget.release(1, 500)
    assert budget.low
    assert (budget.messages, budget.bytes) == (0, 0)


def test_budget_is_low_only_below_half_of_both_bounds() -> None:
    budget = PendingBudget(max_messages=10, max_bytes=100)
    for _ in range(6):
        budget.take(5)
    assert not budget.low  # 6 messages: more than half of 10
    budget.release(1, 5)
    assert budget.low  # 5 messages, 25 bytes
    budget.take(40)
    assert not budget.low  # 6 messages, 65 bytes
    budget.release(2, 45)
    assert budget.low  # 4 messages, 20 bytes
    budget.take(31)
    assert not budget.low  # 5 messages, 51 bytes: more than half of 100


def test_byte_bounds_are_settings_with_environment_overrides() -> None:
    config = load_config(
        env={"INGESTD_INGEST_MAX_PENDING_BYTES": "67108864", "INGESTD_INGEST_BATCH_MAX_BYTES": "1048576"}
    )
    assert (config.ingest.max_pending_bytes, config.ingest.batch_max_bytes) == (64 * 2**20, 2**20)
    with pytest.raises(ConfigError) as info:
        load_config(env={"INGESTD_INGEST_MAX_PENDING_BYTES": "1000"})
    assert str(info.value) == "ingest.max_pending_bytes: must be between 4194304 and 1099511627776, got 1000"
    # Below one message of the largest size, or a batch bound above the pending one.
    with pytest.raises(ConfigError, match=r"^ingest\.batch_max_bytes: "):
        load_config(env={"INGESTD_INGEST_BATCH_MAX_BYTES": "65535"})
    with pytest.raises(ConfigError, match=r"^ingest\.max_pending_bytes: "):
        load_config(
            env={"INGESTD_INGEST_BATCH_MAX_BYTES": "8388608", "INGESTD_INGEST_MAX_PENDING_BYTES": "4194304"}
        )


def test_receive_maximum_keeps_the_first_burst_within_both_bounds() -> None:
    # 128 MiB of the largest messages (64 KiB): 2048, fewer than max_pending's 20,000.
    assert receive_maximum(IngestConfig()) == 2048
    assert receive_maximum(IngestConfig(batch_max=100, max_pending=500)) == 500
    assert receive_maximum(IngestConfig(max_pending=10**6, max_pending_bytes=2**40)) == 65535


@dataclasses.dataclass
class FakeLink:
    """The broker link as the pipeline sees it: it records pauses, resumes and acks."""

    paused: bool = False
    pauses: int = 0
    acked: int = 0

    def ack_many(self, deliveries: Sequence[Delivery]) -> int:
        self.acked += len(deliveries)
        return len(deliveries)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


def pipeline(link: FakeLink, metrics: Metrics, **ingest: int) -> Pipeline:
    """A pipeline for its intake and batching only: nothing here reaches the store, the
    key cache or the verification workers (which start only in its context)."""
    config = dataclasses.replace(IngestConfig(batch_wait_ms=1), **ingest)
    config.validate()
    return Pipeline(
        config,
        topic_prefix="meters",
        store=cast(Store, None),
        keyring=cast(Keyring, None),
        metrics=metrics,
        upstream=link,
    )


def delivery(size: int, mid: int = 1) -> Delivery:
    return Delivery("meters/M-1/up", b"x" * size, mid, 1, datetime.now(UTC), 1)


def finish(p: Pipeline, deliveries: list[Delivery]) -> None:
    p._finish(Batch(deliveries, [], [], 0), BatchResult([], 0, [], 0, collections.Counter()))


async def test_intake_pauses_at_the_byte_bound_and_resumes_below_half() -> None:
    link, metrics = FakeLink(), Metrics()
    p = pipeline(link, metrics, max_pending_bytes=256 * KIB, batch_max_bytes=128 * KIB)
    r = metrics.registry
    for mid in range(1, 5):
        p.submit(delivery(60 * KIB, mid))
    # 4 x 60 KiB = 240 KiB: under the bound, still reading.
    assert not link.paused
    assert metric(r, "ingestd_pending_bytes") == 240 * KIB
    p.submit(delivery(60 * KIB, 5))
    assert link.paused
    assert metric(r, "ingestd_intake_paused") == 1
    assert metric(r, "ingestd_pending_bytes") == 300 * KIB
    assert metric(r, "ingestd_pending_messages") == 5
    # Batches of at most batch_max_bytes: two of 60 KiB each, in arrival order.
    first = await p._next_batch()
    assert [d.mid for d in first] == [1, 2]
    finish(p, first)
    # 180 KiB left: more than half of 256 KiB, still paused.
    assert link.paused
    assert metric(r, "ingestd_pending_bytes") == 180 * KIB
    second = await p._next_batch()
    assert [d.mid for d in second] == [3, 4]
    finish(p, second)
    # 60 KiB, 1 message: below half of both bounds.
    assert not link.paused
    assert metric(r, "ingestd_intake_paused") == 0
    assert metric(r, "ingestd_pending_bytes") == 60 * KIB
    finish(p, await p._next_batch())
    assert metric(r, "ingestd_pending_bytes") == 0
    assert metric(r, "ingestd_pending_messages") == 0
    assert link.acked == 5
    assert link.pauses == 1


async def test_a_message_larger_than_the_byte_bound_is_taken_then_intake_pauses() -> None:
    link, metrics = FakeLink(), Metrics()
    p = pipeline(link, metrics, max_pending_bytes=128 * KIB, batch_max_bytes=64 * KIB)
    big = delivery(200 * KIB)
    p.submit(big)
    assert link.paused
    assert p.in_hand == 1
    # Alone in its batch, however large: never stuck waiting for room.
    batch = await p._next_batch()
    assert batch == [big]
    finish(p, batch)
    assert not link.paused
    assert await p.drain(within_s=1)


async def test_the_message_bound_still_applies_to_small_messages() -> None:
    link, metrics = FakeLink(), Metrics()
    p = pipeline(link, metrics, batch_max=10, max_pending=20)
    for mid in range(1, 21):
        p.submit(delivery(300, mid))
    assert link.paused
    assert metric(metrics.registry, "ingestd_pending_bytes") == 20 * 300
    batch = await p._next_batch()
    assert len(batch) == 10
    finish(p, batch)
    assert not link.paused  # 10 of 20: half


async def test_a_batch_is_bounded_in_bytes_and_in_messages() -> None:
    link, metrics = FakeLink(), Metrics()
    p = pipeline(link, metrics, batch_max=3, batch_max_bytes=100 * KIB)
    sizes = [40 * KIB, 40 * KIB, 40 * KIB, 1 * KIB, 1 * KIB, 1 * KIB, 1 * KIB, 150 * KIB, 1 * KIB]
    for mid, size in enumerate(sizes, 1):
        p.submit(delivery(size, mid))
    batches = []
    while p._pending:
        batches.append([d.mid for d in await p._next_batch()])
    # 40+40 (a third would pass 100 KiB); 40+1+1 (three messages); 1+1; 150 alone; 1.
    assert batches == [[1, 2], [3, 4, 5], [6, 7], [8], [9]]


# -- a backlog of maximum-size messages through the real broker, daemon and database --------

METERS = 4
BACKLOG = 48  # about 3 MiB: three times the byte bound below
MAX_PENDING_BYTES = 1024 * KIB
BATCH_MAX_BYTES = 256 * KIB


@dataclasses.dataclass(slots=True)
class Peaks:
    pending_bytes: float = 0.0
    pending_messages: float = 0.0
    paused: bool = False


@contextlib.asynccontextmanager
async def watching(metrics: Metrics) -> AsyncIterator[Peaks]:
    """The highest pending gauges, sampled on the daemon's own event loop between its steps."""
    peaks = Peaks()
    r = metrics.registry

    async def sample() -> None:
        while True:
            peaks.pending_bytes = max(peaks.pending_bytes, metric(r, "ingestd_pending_bytes"))
            peaks.pending_messages = max(peaks.pending_messages, metric(r, "ingestd_pending_messages"))
            peaks.paused |= metric(r, "ingestd_intake_paused") == 1
            await asyncio.sleep(0.002)  # the sampling period

    task = asyncio.create_task(sample(), name="peaks")
    try:
        yield peaks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_backlog_of_maximum_size_messages_is_drained_within_the_byte_bound(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    signers = [Signer("ES256", f"BIG-{i}-k1", key_factory.new("ES256")) for i in range(METERS)]
    for s in signers:
        await store.add_meter(
            s.kid.removesuffix("-k1"),
            alg=s.alg,
            kid=s.kid,
            public_key_pem=public_key_pem(s.key.public_key()).decode(),
            site=None,
            interval_s=60,
        )
    backlog = max_size_messages(signers, BACKLOG, end=datetime.now(UTC), prefix=config.mqtt.topic_prefix)
    largest = max(len(payload) for _, payload in backlog)
    assert largest > MAX_PAYLOAD - 64
    assert sum(len(payload) for _, payload in backlog) > 2 * MAX_PENDING_BYTES
    cfg = with_ingest(
        config, batch_max=100, batch_max_bytes=BATCH_MAX_BYTES, max_pending_bytes=MAX_PENDING_BYTES
    )
    # The persistent session first; the backlog then queues at the broker while ingestd is away.
    async with running_daemon(cfg):
        pass
    publisher = await asyncio.to_thread(FastPublisher, cfg.mqtt.host, cfg.mqtt.port)
    try:
        publisher.publish(backlog)
        await asyncio.to_thread(publisher.wait_acked, BACKLOG)
    finally:
        await asyncio.to_thread(publisher.close)

    # Watched from the start: the broker sends the backlog the moment the daemon subscribes.
    metrics = Metrics()
    async with watching(metrics) as peaks, running_daemon(cfg, metrics=metrics):
        registry = metrics.registry
        await wait_settled(registry, BACKLOG, within_s=120)
        assert metric(registry, "ingestd_messages_accepted_total") == BACKLOG
        assert metric(registry, "ingestd_pending_bytes") == 0
        assert metric(registry, "ingestd_intake_paused") == 0
        batches = metric(registry, "ingestd_batch_size_count")

    # Intake paused on bytes (the message bound, 20,000, was never near), and never held
    # more than the bound plus the one message that reached it. (Paused stays 1 for two
    # batches at least, so the sampler sees it; the moment of the peak it may miss.)
    assert peaks.paused, "intake never paused"
    assert peaks.pending_bytes < MAX_PENDING_BYTES + largest, peaks
    assert peaks.pending_messages * (MAX_PAYLOAD - 64) < MAX_PENDING_BYTES + largest, peaks
    # Batches of at most 256 KiB: four maximum-size messages each.
    assert batches >= BACKLOG / 4
    # Every message stored once.
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == BACKLOG
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == BACKLOG
    assert await db.fetchval("SELECT count(*) FROM readings") == BACKLOG * MAX_READINGS
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
    stored = [r[0] for r in await db.fetch("SELECT payload FROM raw_messages")]
    assert sorted(stored) == sorted(payload for _, payload in backlog)


async def test_a_message_over_the_maximum_packet_size_never_reaches_the_daemon(
    config: Config, db: Conn
) -> None:
    """A PUBLISH may carry 256 MB, read whole before anything can refuse it: the broker is
    told not to send ingestd packets over 1 MiB. Up to that, an oversized message still
    arrives and is quarantined as too_large, so that it is seen."""
    topic = f"{config.mqtt.topic_prefix}/M-1/up"
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        # The last one is the barrier: the broker delivers in order, so once it is in, the
        # 2 MiB message before it was dropped, not delayed.
        messages = [(topic, b"x" * (100 * KIB)), (topic, b"x" * (2048 * KIB)), (topic, b"{")]
        await publish(config.mqtt.host, config.mqtt.port, messages)
        await wait_settled(registry, 2)
        assert metric(registry, "ingestd_messages_rejected_total", reason="too_large") == 1
        assert metric(registry, "ingestd_messages_rejected_total", reason="bad_json") == 1
        assert metric(registry, "ingestd_messages_received_total") == 2
    rows = await db.fetch("SELECT reason, payload_size FROM quarantine ORDER BY id")
    assert [tuple(r) for r in rows] == [("too_large", 100 * KIB), ("bad_json", 1)]
