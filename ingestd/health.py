"""Meter health: flags (ok / gray / red / never), isolated power losses, health metrics.

The flag rule lives in the database (``meter_flag``, ``meter_health_at`` and the
``meter_health`` view, migration 0003), so Grafana, ``ingestd status`` and the
``ingestd_meters{flag}`` gauge agree. Every function here takes ``as_of``: the daemon
passes its clock, tests pass the time they want.

Isolation: a power loss (001) is classified once the isolation window has passed since
it happened and since it was received (a meter without power reports its power loss only
after power returns, and so do its neighbours). It is site-wide when at least
``isolation_share`` of the other meters of its site also reported a power loss within
``isolation_window_s`` of it; otherwise isolated. The verdict goes into the event's
``detail``, in one statement that locks the events it classifies (``SKIP LOCKED``), so
two daemon instances never classify, or count, the same event twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import asyncpg
import structlog

from ingestd import billing
from ingestd.config import BillingConfig, DatabaseConfig, FlagsConfig
from ingestd.events import BY_CODE
from ingestd.metrics import LastSeenCollector, Metrics
from ingestd.store import CONNECTION_ERRORS, Store, connect_kwargs

if TYPE_CHECKING:
    from ingestd.store import PoolConnection

    # Whatever runs queries: a pool connection, or a test's plain connection.
    Conn = PoolConnection | asyncpg.Connection[asyncpg.Record]

log = structlog.get_logger("ingestd.health")

Flag = Literal["ok", "gray", "red", "never"]
FLAGS: Final[tuple[Flag, ...]] = ("ok", "gray", "red", "never")
# Most severe first: the order of `ingestd status`.
SEVERITY: Final[dict[str, int]] = {"red": 0, "gray": 1, "never": 2, "ok": 3}
# Power losses classified per transaction: bounds the locks held and the statement's time
# when a backlog (an upgrade, a long outage of ours) is worked off.
CLASSIFY_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class MeterHealth:
    meter_id: str
    site: str | None
    last_seen: datetime | None
    flag: Flag
    open_gaps: int
    missing_seqs: int
    last_tamper_code: str | None
    last_tamper_at: datetime | None


def _interval(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


async def fetch_health(
    conn: Conn,
    as_of: datetime,
    flags: FlagsConfig,
    *,
    site: str | None = None,
    flag: str | None = None,
    attention: bool = False,
) -> list[MeterHealth]:
    """Every registered meter (of ``site``, with ``flag``, or only those that need
    attention: not ok, or a tamper event within red_after) as of ``as_of``, by meter id.
    Filtered in SQL: at 100,000 meters the few that need attention cross the wire, not all."""
    rows = await conn.fetch(
        _ATTENTION if attention and flag is None else _HEALTH,
        as_of,
        _interval(flags.gray_after_s),
        _interval(flags.red_after_s),
        site,
        flag,
    )
    return [MeterHealth(**dict(r)) for r in rows]


_HEALTH: Final = """
SELECT * FROM meter_health_at($1, $2, $3)
WHERE ($4::text IS NULL OR site = $4) AND ($5::text IS NULL OR flag = $5)
ORDER BY meter_id
"""
# The few meters that need attention, found first: silent past gray_after or never heard
# (one pass over meter_epochs, no lookup per meter), or with a tamper event within
# red_after (a range of the events_code_time index); only they get meter_health_at's
# per-meter lookups. At 100,000 meters that is the difference between a few thousand
# index probes and 300,000. The tamper codes are meter_health_at's (migration 0011).
_ATTENTION: Final = """
WITH seen AS (
    SELECT meter_id, max(last_seen_at) AS last_seen FROM meter_epochs GROUP BY meter_id
), candidates AS (
    SELECT m.meter_id FROM meters m LEFT JOIN seen s USING (meter_id)
    WHERE s.last_seen IS NULL OR s.last_seen < $1::timestamptz - $2::interval
    UNION
    SELECT e.meter_id FROM events e
    WHERE e.code IN ('003', '005', '007', '011', '013', '014', '015')
      AND e.time <= $1::timestamptz AND e.time > $1::timestamptz - $3::interval
)
SELECT h.* FROM meter_health_at($1, $2, $3) h
WHERE h.meter_id IN (SELECT meter_id FROM candidates)
  AND ($4::text IS NULL OR h.site = $4) AND ($5::text IS NULL OR h.flag = $5)
  AND (h.flag <> 'ok' OR h.last_tamper_at IS NOT NULL)
ORDER BY h.meter_id
"""


async def flag_counts(
    conn: Conn, as_of: datetime, flags: FlagsConfig, *, site: str | None = None
) -> dict[Flag, int]:
    """Meters (of ``site``) per flag, every flag present. One aggregate over ``meters``
    and the ``meter_epochs`` index: no per-meter lookups, so it stays cheap at 100,000
    meters."""
    rows = await conn.fetch(
        """SELECT meter_flag(s.last_seen, $1, $2, $3) AS flag, count(*) AS n
           FROM meters m
           LEFT JOIN (SELECT meter_id, max(last_seen_at) AS last_seen
                      FROM meter_epochs GROUP BY meter_id) s USING (meter_id)
           WHERE $4::text IS NULL OR m.site = $4
           GROUP BY 1""",
        as_of,
        _interval(flags.gray_after_s),
        _interval(flags.red_after_s),
        site,
    )
    counts: dict[Flag, int] = dict.fromkeys(FLAGS, 0)
    for r in rows:
        counts[r["flag"]] = r["n"]
    return counts


async def last_seen_all(conn: Conn) -> list[tuple[str, datetime]]:
    rows = await conn.fetch(
        "SELECT meter_id, max(last_seen_at) AS seen FROM meter_epochs GROUP BY meter_id ORDER BY meter_id"
    )
    return [(r["meter_id"], r["seen"]) for r in rows]


async def store_thresholds(conn: Conn, flags: FlagsConfig) -> None:
    """Make the ``meter_health`` view use this configuration's thresholds."""
    await conn.execute(
        """INSERT INTO health_settings (id, gray_after, red_after, updated_at) VALUES (true, $1, $2, now())
           ON CONFLICT (id) DO UPDATE
           SET gray_after = EXCLUDED.gray_after, red_after = EXCLUDED.red_after, updated_at = now()
           WHERE (health_settings.gray_after, health_settings.red_after)
                 IS DISTINCT FROM (EXCLUDED.gray_after, EXCLUDED.red_after)""",
        _interval(flags.gray_after_s),
        _interval(flags.red_after_s),
    )


# Code 001 (events.POWER_LOSS) is written out: the partial index
# events_unclassified_power_loss serves only a query with the same literal predicate.
_CLASSIFY: Final = """
WITH candidates AS (
    SELECT e.meter_id, e.time, e.epoch, e.seq, e.idx
    FROM events e
    WHERE e.code = '001' AND NOT (e.detail ? 'isolated')
      AND e.time < $1::timestamptz - $2::interval
      AND e.received_at < $1::timestamptz - $2::interval
    ORDER BY e.time
    LIMIT $4
    FOR UPDATE OF e SKIP LOCKED
),
verdicts AS (
    SELECT c.*, peers.n AS site_meters, losses.n AS site_power_losses
    FROM candidates c
    LEFT JOIN meters m ON m.meter_id = c.meter_id
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM meters o WHERE o.site = m.site AND o.meter_id <> c.meter_id
    ) peers
    CROSS JOIN LATERAL (
        -- Per peer, by the events_power_loss index: the site's size bounds the work, not
        -- the fleet's power losses in the window.
        SELECT count(*) AS n FROM meters om
        WHERE om.site = m.site AND om.meter_id <> c.meter_id
          AND EXISTS (SELECT FROM events o
                      WHERE o.meter_id = om.meter_id AND o.code = '001'
                        AND o.time BETWEEN c.time - $2::interval AND c.time + $2::interval)
    ) losses
)
UPDATE events e
SET detail = e.detail || jsonb_build_object(
    'isolated', v.site_meters = 0 OR v.site_power_losses < $3::float8 * v.site_meters,
    'site_meters', v.site_meters,
    'site_power_losses', v.site_power_losses)
FROM verdicts v
WHERE (e.meter_id, e.epoch, e.seq, e.idx, e.time) = (v.meter_id, v.epoch, v.seq, v.idx, v.time)
  AND NOT (e.detail ? 'isolated')
RETURNING e.meter_id, e.time, (e.detail ->> 'isolated')::boolean AS isolated
"""


@dataclass(frozen=True, slots=True)
class Classified:
    meter_id: str
    time: datetime
    isolated: bool


async def classify_power_losses(
    conn: Conn, as_of: datetime, flags: FlagsConfig, *, limit: int = CLASSIFY_BATCH
) -> list[Classified]:
    """Classify up to ``limit`` power losses whose window has passed; returns those this
    call classified (none that another session classified or is classifying)."""
    rows = await conn.fetch(
        _CLASSIFY, as_of, _interval(flags.isolation_window_s), flags.isolation_share, limit
    )
    return [Classified(r["meter_id"], r["time"], r["isolated"]) for r in rows]


class HealthMonitor:
    """The daemon's periodic health work, as an async context manager (it owns the
    per-meter collector's registration) with one task, :meth:`run`."""

    def __init__(
        self,
        config: FlagsConfig,
        *,
        store: Store,
        metrics: Metrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        billing: BillingConfig | None = None,
        retention_days: float = 90.0,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._now = now
        self._last_seen = LastSeenCollector() if config.per_meter_metrics else None
        self._billing = billing
        self._retention = timedelta(days=retention_days)
        self._billing_due: datetime | None = None
        # Periods with series in the billing gauges, so that old ones can be removed.
        self._billing_periods: set[str] = set()

    async def __aenter__(self) -> Self:
        if self._last_seen is not None:
            self._metrics.registry.register(self._last_seen)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._last_seen is not None:
            self._metrics.registry.unregister(self._last_seen)

    async def run(self) -> None:
        stored = False
        while True:
            try:
                if not stored:
                    async with self._store.connection() as conn:
                        await store_thresholds(conn, self._config)
                    stored = True
                await self.refresh()
                await self.classify()
                if self._billing is not None and (
                    self._billing_due is None or self._now() >= self._billing_due
                ):
                    await self.refresh_billing()
                    self._billing_due = self._now() + timedelta(seconds=self._billing.refresh_s)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Health is a view on what was stored; ingestion must go on without it.
                log.warning("health_refresh_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(self._config.refresh_s)

    async def refresh(self) -> dict[Flag, int]:
        """Update the gauges: meters by flag and (if enabled) last seen. (The gap gauges
        belong to ingestd.gaps.)"""
        as_of = self._now()
        async with self._store.connection() as conn:
            counts = await flag_counts(conn, as_of, self._config)
            seen = await last_seen_all(conn) if self._last_seen is not None else None
        for flag, count in counts.items():
            self._metrics.meters.labels(flag=flag).set(count)
        self._metrics.health_refreshed.set(as_of.timestamp())
        if self._last_seen is not None and seen is not None:
            self._last_seen.snapshot = tuple((meter, at.timestamp()) for meter, at in seen)
        return counts

    async def refresh_billing(self) -> dict[str, dict[str, int]]:
        """Meters by billing status for the current and the previous period, and the
        adjustments of closed periods (recorded here as well as by the CLI, so that the
        re-bill list grows without anyone running a report)."""
        assert self._billing is not None
        config = self._billing
        as_of = self._now()
        current = billing.period_containing(as_of, config)
        periods = (billing.previous_period(current, config), current)
        counts: dict[str, dict[str, int]] = {}
        computed: dict[str, list[billing.Statement]] = {}
        async with self._store.connection() as conn:
            for period in periods:
                computed[period.name] = await billing.compute_statements(
                    conn, period, as_of=as_of, retention=self._retention
                )
                counts[period.name] = billing.totals(computed[period.name]).by_status
            # The previous period is usually the one closed last: its statements are at hand.
            added = await billing.check_adjustments(
                conn, config, as_of=as_of, retention=self._retention, computed=computed
            )
            unbilled = await billing.unbilled_adjustments(conn)
        if added:
            log.warning("billing_adjustments_recorded", count=added)
        for stale in self._billing_periods - set(counts):
            for status in billing.STATUSES:
                self._metrics.billing_meters.remove(stale, status)
            self._metrics.billing_period_end.remove(stale)
            self._metrics.billing_cutoff.remove(stale)
        for period in periods:
            for name, n in counts[period.name].items():
                self._metrics.billing_meters.labels(period=period.name, status=name).set(n)
            self._metrics.billing_period_end.labels(period=period.name).set(period.end.timestamp())
            self._metrics.billing_cutoff.labels(period=period.name).set(
                billing.cutoff(period, config).timestamp()
            )
        self._billing_periods = set(counts)
        self._metrics.billing_adjustments_pending.set(unbilled)
        return counts

    async def classify(self) -> Sequence[Classified]:
        """Classify every power loss that is due, in batches; count the isolated ones."""
        done: list[Classified] = []
        as_of = self._now()
        while True:
            async with self._store.connection() as conn:
                batch = await classify_power_losses(conn, as_of, self._config)
            isolated = [c for c in batch if c.isolated]
            self._metrics.isolated_power_loss.inc(len(isolated))
            for c in isolated:
                log.info("isolated_power_loss", meter=c.meter_id, time=c.time.isoformat())
            done.extend(batch)
            if len(batch) < CLASSIFY_BATCH:
                return done


class DatabaseProbe:
    """Checks the database every ``database.probe_s`` for ``ingestd_db_up``: batch writes
    set it too, but a quiet fleet writes nothing, and an outage must show all the same.

    A connection of its own, not the pool's: a probe cut off by its timeout on a silent
    server is terminated at once, where a pooled one would hold a pool slot until the
    server confirmed the cancellation."""

    def __init__(self, config: DatabaseConfig, *, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._up = True

    async def run(self) -> None:
        try:
            while True:
                self._metrics.db_up.set(1 if await self.probe() else 0)
                await asyncio.sleep(self._config.probe_s)
        finally:
            if self._conn is not None:
                self._conn.terminate()

    async def probe(self) -> bool:
        """True when the server answered a query within ``probe_s``."""
        try:
            async with asyncio.timeout(self._config.probe_s):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(**connect_kwargs(self._config))
                await self._conn.fetchval("SELECT 1")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            if self._up:  # once per outage, not every probe_s
                log.warning("db_probe_failed", error=str(exc) or type(exc).__name__)
            self._up = False
            return False
        if not self._up:
            log.info("db_probe_ok")
        self._up = True
        return True


# -- `ingestd status` --------------------------------------------------------------------


def by_severity(meters: Sequence[MeterHealth]) -> list[MeterHealth]:
    """red, gray, never, then the rest (tamper events), each by meter id."""
    return sorted(meters, key=lambda m: (SEVERITY[m.flag], m.meter_id))


def status_json(
    meters: Sequence[MeterHealth], counts: Mapping[Flag, int], as_of: datetime
) -> dict[str, object]:
    return {
        "as_of": as_of.isoformat(),
        "meters_by_flag": counts,
        "meters": [
            {
                "meter_id": m.meter_id,
                "site": m.site,
                "flag": m.flag,
                "last_seen": m.last_seen.isoformat() if m.last_seen else None,
                "open_gaps": m.open_gaps,
                "missing_seqs": m.missing_seqs,
                "last_tamper_code": m.last_tamper_code,
                "last_tamper_at": m.last_tamper_at.isoformat() if m.last_tamper_at else None,
            }
            for m in meters
        ],
    }


def status_table(meters: Sequence[MeterHealth], as_of: datetime) -> list[str]:
    """Lines of a plain table (no colour: it goes to cron mails and pipes as often as to
    terminals)."""
    rows = [("METER", "SITE", "FLAG", "LAST SEEN", "GAPS", "MISSING", "LAST TAMPER EVENT")]
    for m in meters:
        seen = f"{_ago(as_of - m.last_seen)} ago" if m.last_seen else "never"
        tamper = "-"
        if m.last_tamper_code is not None and m.last_tamper_at is not None:
            known = BY_CODE.get(m.last_tamper_code)
            name = known.name if known else "unknown"
            tamper = f"{m.last_tamper_code} {name}, {_ago(as_of - m.last_tamper_at)} ago"
        rows.append((m.meter_id, m.site or "-", m.flag, seen, str(m.open_gaps), str(m.missing_seqs), tamper))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  "
        f"{r[4]:>{widths[4]}}  {r[5]:>{widths[5]}}  {r[6]}".rstrip()
        for r in rows
    ]


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {rest // 60}m"
    return f"{rest // 60}m {rest % 60}s"
