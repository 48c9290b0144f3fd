"""From deliveries to committed rows to acknowledgements.

    broker --sink()--> pending --[verify: worker processes]--> verified --[write: one txn]--> ack

Two stages, so that the next batch is verified while the last one is being written.
A delivery is acknowledged only after the transaction that stored it (or its rejection)
has committed; until then it counts against ``max_pending`` (messages) and
``max_pending_bytes`` (payload bytes), and past either the broker socket is not read at
all, so memory stays bounded however far the database falls behind. A batch is bounded
in bytes too (``batch_max_bytes``): parsed, a message takes several times its size.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Final, Protocol, Self

import structlog

from ingestd.config import IngestConfig
from ingestd.envelope import (
    MAX_PAYLOAD,
    Signed,
    accept_signed,
    bad_signature,
    prepare,
    shown_topic,
    topic_meter,
    unverifiable,
)
from ingestd.errors import Rejected
from ingestd.faults import Fault, classify, describe, timed_out
from ingestd.gaps import record_gap_counts
from ingestd.keyring import Keyring
from ingestd.metrics import Metrics
from ingestd.mqtt import RECEIVE_MAXIMUM, Delivery
from ingestd.store import Accept, BatchResult, Reject, Store, seq_conflict
from ingestd.verifier import VerifierPool

log = structlog.get_logger("ingestd.pipeline")

# A batch that times out this many times in a row is split: a smaller one may fit in the
# time (``database.command_timeout_s``), and a message slow to write must not hold back
# the others. Not 1: one timeout is as often a passing stall as a batch too big.
SPLIT_AFTER_TIMEOUTS: Final = 2


class Upstream(Protocol):
    """What the pipeline needs of the broker link."""

    def ack_many(self, deliveries: Sequence[Delivery]) -> int: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def receive_maximum(config: IngestConfig) -> int:
    """The MQTT Receive Maximum for these bounds: how many unacknowledged messages the broker
    may send before it waits for an acknowledgement.

    Pausing the socket is the brake (Mosquitto honours Receive Maximum only until the first
    acknowledgements), but it cannot act while the session is being set up, and a
    persistent session's queue arrives right after the CONNACK: this keeps that first
    burst within ``max_pending`` messages, and within ``max_pending_bytes`` even when every
    message is of the largest size.
    """
    by_bytes = config.max_pending_bytes // MAX_PAYLOAD
    return max(1, min(RECEIVE_MAXIMUM, config.max_pending, by_bytes))


@dataclass(slots=True)
class PendingBudget:
    """Deliveries in hand (received, not yet acknowledged), in messages and payload bytes,
    against a bound on each."""

    max_messages: int
    max_bytes: int
    messages: int = 0
    bytes: int = 0

    def take(self, size: int) -> bool:
        """Count one delivery of ``size`` bytes in; True when a bound is now reached.

        Counted whatever its size: a delivery is taken before it is looked at, so one
        larger than the byte bound is taken too, and only then is intake paused.
        """
        self.messages += 1
        self.bytes += size
        return self.messages >= self.max_messages or self.bytes >= self.max_bytes

    def release(self, messages: int, size: int) -> None:
        """Count deliveries out (acknowledged, or dropped with their connection)."""
        self.messages -= messages
        self.bytes -= size

    @property
    def low(self) -> bool:
        """At most half of both bounds in hand: intake may resume. Half, so that reading
        resumes with room for a good many batches, not one message at a time."""
        return self.messages <= self.max_messages // 2 and self.bytes <= self.max_bytes // 2


@dataclass(slots=True)
class Batch:
    deliveries: list[Delivery]
    accepts: list[Accept]
    rejects: list[Reject]
    # Repeats of a (meter, epoch, seq) already in this batch with the same content.
    repeats: int


class Pipeline:
    """Verifies, stores and acknowledges; an async context manager owning its verification
    worker processes."""

    def __init__(
        self,
        config: IngestConfig,
        *,
        topic_prefix: str,
        store: Store,
        keyring: Keyring,
        metrics: Metrics,
        upstream: Upstream,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._prefix = topic_prefix
        self._store = store
        self._keyring = keyring
        self._metrics = metrics
        self._upstream = upstream
        self._now = now
        self._skew = timedelta(seconds=config.max_clock_skew_s)
        self._max_age = timedelta(days=config.max_data_age_days)
        self._pending: collections.deque[Delivery] = collections.deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._verified: asyncio.Queue[Batch] = asyncio.Queue(maxsize=1)
        self._budget = PendingBudget(config.max_pending, config.max_pending_bytes)
        # Payload bytes in self._pending (received, not yet in a batch).
        self._queued_bytes = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused = False
        self._closed = False
        self._verifier = VerifierPool(config.verify_workers, on_restart=metrics.verify_worker_restarts.inc)

    async def __aenter__(self) -> Self:
        await self._verifier.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._verifier.__aexit__(exc_type, exc, tb)

    @property
    def in_hand(self) -> int:
        """Deliveries received and not yet finished (committed and acknowledged)."""
        return self._budget.messages

    # -- intake (called by the broker link, on the event loop) -------------------------

    def submit(self, delivery: Delivery) -> None:
        if self._closed:
            # Shutting down: not taken, not acknowledged; the broker delivers it again to
            # the next session. (Read only to keep the socket empty for a clean close.)
            return
        size = len(delivery.payload)
        self._pending.append(delivery)
        self._queued_bytes += size
        bound_reached = self._budget.take(size)
        self._idle.clear()
        self._metrics.received.inc()
        self._metrics.pending.set(self._budget.messages)
        self._metrics.pending_bytes.set(self._budget.bytes)
        self._arrived.set()
        if len(self._pending) >= self._config.batch_max or self._queued_bytes >= self._config.batch_max_bytes:
            self._full.set()
        if bound_reached and not self._paused:
            self._paused = True
            self._upstream.pause_reading()
            self._metrics.intake_paused.set(1)
            log.warning("intake_paused", pending=self._budget.messages, pending_bytes=self._budget.bytes)

    def close_intake(self) -> None:
        """Take no more deliveries (shutdown); those in hand are still written and acked."""
        self._closed = True
        self._paused = True
        self._upstream.pause_reading()

    async def drain(self, within_s: float) -> bool:
        """Wait until everything in hand is committed and acknowledged; False on timeout."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # -- stage 1: batch and verify ---------------------------------------------------

    async def run_verifier(self) -> None:
        while True:
            deliveries = await self._next_batch()
            batch = await self._verify(deliveries)
            await self._verified.put(batch)

    async def _next_batch(self) -> list[Delivery]:
        cfg = self._config
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._pending) < cfg.batch_max and self._queued_bytes < cfg.batch_max_bytes:
            # Give the batch up to batch_wait_ms to fill: one commit for many messages.
            try:
                async with asyncio.timeout(cfg.batch_wait_ms / 1000):
                    await self._full.wait()
            except TimeoutError:
                pass
        self._full.clear()
        # At least one message, however large; then as many as fit both bounds.
        batch = [self._pending.popleft()]
        size = len(batch[0].payload)
        while self._pending and len(batch) < cfg.batch_max:
            following = len(self._pending[0].payload)
            if size + following > cfg.batch_max_bytes:
                break
            batch.append(self._pending.popleft())
            size += following
        self._queued_bytes -= size
        return batch

    async def _verify(self, deliveries: list[Delivery]) -> Batch:
        results = await self._check_all(deliveries)
        unknown = {r.kid for r in results if isinstance(r, Reject) and r.reason == "unknown_key" and r.kid}
        if unknown and await self._fetch_keys(unknown):
            # Keys registered since the cache was filled: check those messages again.
            again = [i for i, r in enumerate(results) if isinstance(r, Reject) and r.kid in unknown]
            for i, result in zip(again, await self._check_all([deliveries[i] for i in again]), strict=True):
                results[i] = result
        return _assemble(deliveries, results)

    async def _fetch_keys(self, kids: set[str]) -> bool:
        """Look up kids the cache lacks; True when any was found. While the database cannot
        answer, this waits and asks again: a message is ``unknown_key`` only when the
        database says the key does not exist, never because it could not be asked."""
        delay = self._config.db_retry_initial_s
        while True:
            try:
                return await self._keyring.fetch(kids)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                self._metrics.db_up.set(0)
                log.warning("key_lookup_failed", error=describe(exc), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.db_retry_max_s)

    async def _check_all(self, deliveries: Sequence[Delivery]) -> list[Accept | Reject]:
        """Parse on the event loop, verify signatures in the worker processes, then read
        the bodies (of the verified ones only) on the event loop.

        Only the signature check goes to the workers: it is most of the cost, and what
        crosses is small; parsed bodies would cost more to send back than to parse here.
        """
        prepared = [self._prepare(d) for d in deliveries]
        verdicts = iter(await self._verifier.verify([p for p in prepared if isinstance(p, Signed)]))
        results: list[Accept | Reject] = []
        for d, p in zip(deliveries, prepared, strict=True):
            if isinstance(p, Reject):
                results.append(p)
                continue
            verdict = next(verdicts)
            if verdict is None:
                results.append(self._reject(d, unverifiable(p)))
            elif not verdict:
                results.append(self._reject(d, bad_signature(p)))
            else:
                results.append(self._accept(d, p))
        return results

    def _prepare(self, d: Delivery) -> Signed | Reject:
        try:
            return prepare(d.payload, d.received_at, self._keyring)
        except Rejected as exc:
            return self._reject(d, exc)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the others
            return self._internal_error(d, exc)

    def _accept(self, d: Delivery, signed: Signed) -> Accept | Reject:
        try:
            message = accept_signed(
                signed,
                d.topic,
                d.received_at,
                topic_prefix=self._prefix,
                max_clock_skew=self._skew,
                max_data_age=self._max_age,
            )
        except Rejected as exc:
            return self._reject(d, exc)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the others
            return self._internal_error(d, exc)
        return Accept(message, d.topic, d.payload, d.received_at)

    def _reject(self, d: Delivery, exc: Rejected) -> Reject:
        meter = topic_meter(d.topic, self._prefix)
        return Reject(exc.reason, exc.detail, d.topic, d.payload, d.received_at, meter, exc.kid)

    def _internal_error(self, d: Delivery, exc: Exception) -> Reject:
        # A check that fails in a way we did not foresee is our bug, not the meter's:
        # log it loudly and quarantine the message for a human to look at.
        log.error("check_failed", topic=shown_topic(d.topic), exc_info=exc)
        return Reject(
            "bad_body", "internal error while checking", d.topic, d.payload, d.received_at, None, None
        )

    # -- stage 2: write, then acknowledge --------------------------------------------

    async def run_writer(self) -> None:
        while True:
            batch = await self._verified.get()
            result = await self._store_with_retry(batch)
            self._finish(batch, result)

    async def _store_with_retry(self, batch: Batch) -> BatchResult:
        return await self._store_part(batch.accepts, batch.rejects, retry=False)

    async def _store_part(self, accepts: list[Accept], rejects: list[Reject], *, retry: bool) -> BatchResult:
        """Write until committed; what ``faults`` says decides how.

        Never acknowledged meanwhile: only a commit ends this. A batch the server refuses
        for its data, or that keeps timing out, is split in halves (each written the same
        way) until the message at fault is alone; only a message refused alone for its
        data is quarantined. ``retry``: an earlier attempt's commit may have gone through
        (its answer was lost), so the store counts rows it finds of this very delivery as
        accepted, not as duplicates.
        """
        delay = self._config.db_retry_initial_s
        timeouts = 0
        while True:
            try:
                with self._metrics.db_write_seconds.time():
                    result = await self._store.write_batch(accepts, rejects, retry=retry)
            except Exception as exc:
                fault = classify(exc)
                if fault is None:
                    raise
                self._metrics.db_write_errors.inc()
                size = len(accepts) + len(rejects)
                if fault is Fault.DATA and size == 1 and rejects and rejects[0] == _plain(rejects[0]):
                    # Not even a plain quarantine row is taken: a trigger or constraint of
                    # the operator's, not the message, is at fault. Hold it like any outage.
                    fault = Fault.TRANSIENT
                if fault is Fault.DATA:
                    if size == 1:
                        return await self._refused(accepts, rejects, exc, retry=retry)
                    # The cause is in `error`; a traceback would say nothing more.
                    log.error("batch_refused", error=describe(exc), size=size)  # noqa: TRY400
                    return await self._split(accepts, rejects, retry=retry)
                retry = retry or fault is Fault.LOST
                timeouts = timeouts + 1 if timed_out(exc) else 0
                if timeouts >= SPLIT_AFTER_TIMEOUTS and size > 1:
                    # The same batch timed out again: a smaller one may fit in the time,
                    # and a message slow to write must not hold back all the others.
                    log.warning("batch_timed_out", error=describe(exc), size=size, attempts=timeouts)
                    return await self._split(accepts, rejects, retry=retry)
                self._metrics.db_up.set(0)
                log.warning(
                    "db_write_failed",
                    error=describe(exc),
                    fault=fault.value,
                    size=size,
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.db_retry_max_s)
            else:
                self._metrics.db_up.set(1)
                return result

    async def _split(self, accepts: list[Accept], rejects: list[Reject], *, retry: bool) -> BatchResult:
        a, r = (len(accepts) + 1) // 2, (len(rejects) + 1) // 2
        total = BatchResult([], 0, [], 0, collections.Counter())
        for part_accepts, part_rejects in ((accepts[:a], rejects[:r]), (accepts[a:], rejects[r:])):
            if part_accepts or part_rejects:
                total = total.plus(await self._store_part(part_accepts, part_rejects, retry=retry))
        return total

    async def _refused(
        self, accepts: list[Accept], rejects: list[Reject], exc: BaseException, *, retry: bool
    ) -> BatchResult:
        """One message whose data the server refuses, alone: quarantine it instead."""
        if rejects:
            # A quarantine row the server refuses: keep the verdict and the payload, in text
            # it cannot refuse, rather than holding every meter's data behind it.
            log.error("quarantine_row_refused", error=describe(exc), topic=rejects[0].topic[:200])
            await self._store_part([], [_plain(rejects[0])], retry=retry)
            return BatchResult([], 0, [], 0, collections.Counter())
        accept = accepts[0]
        m = accept.message
        log.error("message_refused", meter=m.meter_id, epoch=m.epoch, seq=m.seq, error=describe(exc))
        reject = Reject(
            "bad_body",
            f"database refused it: {describe(exc)}",
            accept.topic,
            accept.payload,
            accept.received_at,
            m.meter_id,
            m.kid,
        )
        await self._store_part([], [reject], retry=retry)
        return BatchResult([], 0, [reject], 0, collections.Counter())

    def _finish(self, batch: Batch, result: BatchResult) -> None:
        self._upstream.ack_many(batch.deliveries)
        m = self._metrics
        committed = self._now()
        m.batch_size.observe(len(batch.deliveries))
        m.accepted.inc(len(result.accepted))
        m.duplicates.inc(result.duplicates + batch.repeats)
        m.readings_stored.inc(result.readings_stored)
        record_gap_counts(m, result.gaps)
        m.count_events(result.events_stored)
        for accept in result.accepted:
            m.commit_delay.observe(max(0.0, (committed - accept.message.sent).total_seconds()))
        for reject in [*batch.rejects, *result.late_rejects]:
            m.rejected.labels(reason=reject.reason).inc()
            log.info(
                "message_rejected",
                reason=reject.reason,
                meter=reject.meter_id,
                topic=reject.topic,
                detail=reject.detail,
            )
        budget = self._budget
        budget.release(len(batch.deliveries), sum(len(d.payload) for d in batch.deliveries))
        if budget.messages == 0:
            self._idle.set()
        if self._paused and not self._closed and budget.low:
            self._paused = False
            self._upstream.resume_reading()
            m.intake_paused.set(0)
            log.info("intake_resumed", pending=budget.messages, pending_bytes=budget.bytes)
        m.pending.set(budget.messages)
        m.pending_bytes.set(budget.bytes)


def _assemble(deliveries: list[Delivery], results: list[Accept | Reject]) -> Batch:
    """Split results into accepts and rejects, resolving repeats of one (meter, epoch, seq)
    within the batch: the first stays; a later one is a repeat or a ``seq_conflict``."""
    accepts: list[Accept] = []
    rejects: list[Reject] = []
    seen: dict[tuple[str, int, int], bytes] = {}
    repeats = 0
    for result in results:
        if isinstance(result, Reject):
            rejects.append(result)
            continue
        m = result.message
        key = (m.meter_id, m.epoch, m.seq)
        first = seen.get(key)
        if first is None:
            seen[key] = m.digest
            accepts.append(result)
        elif first == m.digest:
            repeats += 1
        else:
            rejects.append(seq_conflict(result))
    return Batch(deliveries, accepts, rejects, repeats)


def _plain(reject: Reject) -> Reject:
    """The rejection with its text fields in plain ASCII (non-ASCII escaped)."""

    def plain(text: str) -> str:
        return text.encode("ascii", "backslashreplace").decode("ascii")

    return Reject(
        reject.reason,
        plain(reject.detail),
        plain(reject.topic),
        reject.payload,
        reject.received_at,
        None if reject.meter_id is None else plain(reject.meter_id),
        None if reject.kid is None else plain(reject.kid),
    )
