"""Retention: the quarantine keeps rejected messages for investigation, not for ever.

Every rejection is stored (up to ``ingest.quarantine_payload_max`` bytes of payload), so
a sustained flood of bad messages would grow the table without end. Rows older than
``ingest.quarantine_retention_days`` are deleted at start-up and every hour after; with
several instances on one database each prunes, harmlessly (a row is deleted once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import structlog

from ingestd.config import IngestConfig
from ingestd.metrics import Metrics
from ingestd.store import CONNECTION_ERRORS, Store

log = structlog.get_logger("ingestd.retention")

PRUNE_EVERY_S: Final = 3600.0


class QuarantineRetention:
    """The daemon's quarantine pruning, one task: :meth:`run`."""

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

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                await self.prune()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Housekeeping: ingestion goes on without it, and the next hour tries again.
                log.warning("quarantine_prune_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY_S)

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
