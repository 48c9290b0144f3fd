"""Retention: what is kept for investigation, not for ever.

- The quarantine: every rejection is stored (up to ``ingest.quarantine_payload_max``
  bytes of payload), so a sustained flood of bad messages would grow the table without
  end. Rows older than ``ingest.quarantine_retention_days`` are deleted.
- Closed gaps (filled or lost): one row per range ever chased, a million a year at
  100,000 meters. Those closed more than ``gaps.closed_retention_days`` ago are deleted
  (a billing period's lost intervals are read long before that).

Each prunes at start-up and every hour after; with several instances on one database
each prunes, harmlessly (a row is deleted once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import structlog
from prometheus_client import Counter

from ingestd.config import GapsConfig, IngestConfig
from ingestd.metrics import Metrics
from ingestd.store import CONNECTION_ERRORS, Store

log = structlog.get_logger("ingestd.retention")

PRUNE_EVERY_S: Final = 3600.0


class _Pruner:
    """Deletes rows older than a retention: at start-up and every hour, in :meth:`run`."""

    def __init__(
        self,
        what: str,
        keep_days: float,
        delete_before: Callable[[datetime], Awaitable[int]],
        counter: Counter,
        now: Callable[[], datetime],
    ) -> None:
        self._what = what
        self._keep = timedelta(days=keep_days)
        self._delete_before = delete_before
        self._counter = counter
        self._now = now

    @property
    def enabled(self) -> bool:
        return self._keep > timedelta(0)

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                await self.prune()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Housekeeping: ingestion goes on without it, and the next hour tries again.
                log.warning("prune_failed", what=self._what, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def prune(self) -> int:
        """Delete what is older than the retention now; returns how many rows."""
        if not self.enabled:
            return 0
        before = self._now() - self._keep
        deleted = await self._delete_before(before)
        self._counter.inc(deleted)
        if deleted:
            log.info("pruned", what=self._what, rows=deleted, before=before.isoformat(timespec="seconds"))
        return deleted


class QuarantineRetention(_Pruner):
    """Quarantine rows older than ``ingest.quarantine_retention_days``."""

    def __init__(
        self,
        config: IngestConfig,
        *,
        store: Store,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            "quarantine",
            config.quarantine_retention_days,
            store.prune_quarantine,
            metrics.quarantine_pruned,
            now,
        )


class ClosedGapRetention(_Pruner):
    """Gaps filled or lost more than ``gaps.closed_retention_days`` ago."""

    def __init__(
        self,
        config: GapsConfig,
        *,
        store: Store,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            "gaps", config.closed_retention_days, store.prune_closed_gaps, metrics.gaps_pruned, now
        )
