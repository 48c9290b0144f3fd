"""The daemon's clock: the database's, carried forward between readings by the monotonic clock.

Everything the daemon stamps is compared with the database's ``now()`` somewhere: the
health views flag a meter by ``now() - last_seen_at``, gaps fall due at
``next_request_at``, a key is valid from ``valid_from``, the quarantine is pruned by
``received_at``. A head-end whose system clock jumped (a year ahead for ten seconds) once
left ``last_seen_at`` a year ahead, and silent meters stayed ``ok`` for a year; a clock a
year slow made every honest message a ``clock_skew`` rejection.

So the daemon never reads the host's clock for a timestamp. It reads the database's
(``clock_timestamp()``) every ``SYNC_EVERY_S`` seconds and in between adds the seconds
the monotonic clock has counted, which a step of the system clock does not move. The
host's clock is only compared with it, for ``ingestd_clock_offset_seconds`` and a warning:
it is what the host's other programs, and its logs, go by.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import asyncpg
import structlog

from ingestd.store import CONNECTION_ERRORS

if TYPE_CHECKING:
    from ingestd.metrics import Metrics
    from ingestd.store import Store

log = structlog.get_logger("ingestd.clock")

# Often enough that the monotonic clock's drift (NTP slews it, within a few parts per
# million) never adds up to anything, seldom enough to cost nothing.
SYNC_EVERY_S: Final = 10.0
# The host's clock this far from the database's is worth a warning: NTP keeps both within
# milliseconds, and ingest.max_clock_skew_s (300 s by default) is what meters get.
OFFSET_WARN_S: Final = 2.0


class DbClock:
    """``now()``: the database's time, as of the last ``sync()`` plus monotonic seconds.

    Before the first ``sync()`` it is the host's clock (nothing stamps anything yet then:
    the daemon syncs as soon as the database is reached).
    """

    def __init__(
        self,
        *,
        host: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._host = host
        self._monotonic = monotonic
        self._metrics = metrics
        # The database's time minus the monotonic clock's, in seconds: a float, because
        # now() runs for every message and fromtimestamp() is the cheapest way back to a
        # datetime (a timedelta sum costs twice as much).
        self._base: float | None = None
        self._offset_reported = False

    def now(self) -> datetime:
        base = self._base
        if base is None:
            return self._host()
        return datetime.fromtimestamp(base + self._monotonic(), UTC)

    async def sync(self, store: Store) -> None:
        """Read the database's clock; raises what the connection raises."""
        async with store.connection() as conn:
            before = self._monotonic()
            # clock_timestamp(), not now(): that is when the transaction began.
            db_time: datetime = await conn.fetchval("SELECT clock_timestamp()")
            after = self._monotonic()
        self.set(db_time, (before + after) / 2)

    def set(self, db_time: datetime, at_monotonic: float) -> None:
        """The database's clock read ``db_time`` when the monotonic clock read ``at_monotonic``."""
        self._base = db_time.timestamp() - at_monotonic
        offset = (self._host() - self.now()).total_seconds()
        if self._metrics is not None:
            self._metrics.clock_offset.set(offset)
        if abs(offset) > OFFSET_WARN_S:
            if not self._offset_reported:
                self._offset_reported = True
                log.warning(
                    "clock_offset",
                    offset_s=round(offset, 3),
                    host_time=self._host().isoformat(),
                    database_time=self.now().isoformat(),
                    note="the daemon goes by the database's clock; fix the host's (or the database's)",
                )
        elif self._offset_reported:
            self._offset_reported = False
            log.info("clock_offset_resolved", offset_s=round(offset, 3))

    async def run(self, store: Store) -> None:
        """Sync every ``SYNC_EVERY_S`` until cancelled; while the database is away, the
        monotonic clock carries on from the last reading."""
        while True:
            await asyncio.sleep(SYNC_EVERY_S)
            try:
                await self.sync(store)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("clock_sync_failed", error=str(exc) or type(exc).__name__)
