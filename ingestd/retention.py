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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import structlog

from ingestd.config import GapsConfig, IngestConfig
from ingestd.metrics import Metrics
from ingestd.store import CONNECTION_ERRORS, Store

log = structlog.get_logger("ingestd.retention")

PRUNE_EVERY_S: Final = 3600.0


class _Pruner:
    """One pruning task: :meth:`run` calls :meth:`prune` at start-up and every hour."""

    what: str

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    async def prune(self) -> int:
        raise NotImplementedError

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                await self.prune()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Housekeeping: ingestion goes on without it, and the next hour tries again.
                log.warning("prune_failed", what=self.what, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY_S)


class QuarantineRetention(_Pruner):
    """The daemon's quarantine pruning, one task: :meth:`run`."""

    what = "quarantine"

    def __init__(
        self,
        config: IngestConfig,
        *,
        store: Store,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keep = timedelta(days=config.quarantine_retention_days)
        self._store = store
        self._metrics = metrics
        self._now = now

    @property
    def enabled(self) -> bool:
        return self._keep > timedelta(0)

    async def prune(self) -> int:
        """Delete what is older than the retention now; returns how many rows."""
        if not self.enabled:
            return 0
        before = self._now() - self._keep
        deleted = await self._store.prune_quarantine(before)
        self._metrics.quarantine_pruned.inc(deleted)
        if deleted:
            log.info("quarantine_pruned", rows=deleted, before=before.isoformat(timespec="seconds"))
        return deleted


class ClosedGapRetention(_Pruner):
    """The daemon's pruning of closed gaps, one task: :meth:`run`."""

    what = "gaps"

    def __init__(
        self,
        config: GapsConfig,
        *,
        store: Store,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keep = timedelta(days=config.closed_retention_days)
        self._store = store
        self._metrics = metrics
        self._now = now

    @property
    def enabled(self) -> bool:
        return self._keep > timedelta(0)

    async def prune(self) -> int:
        """Delete gaps closed before the retention; returns how many rows."""
        if not self.enabled:
            return 0
        before = self._now() - self._keep
        deleted = await self._store.prune_closed_gaps(before)
        self._metrics.gaps_pruned.inc(deleted)
        if deleted:
            log.info("gaps_pruned", rows=deleted, before=before.isoformat(timespec="seconds"))
        return deleted
