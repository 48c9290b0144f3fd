"""Billing periods: per meter and period, the billed energy, how complete and trustworthy
it is, and a frozen statement.

Registers are cumulative, so a period's energy is the register at its end minus the one at
its start: a lost interval inside the period changes the profile, not the bill; a missing
*boundary* reading changes the bill. The statement makes that visible.

Period arithmetic is pure (``zoneinfo``) and takes no clock: callers pass ``as_of``. The
statement is computed in one SQL pass over the period's readings (it must stay fast for
10,000 meters and a month of 15-minute readings); what it returns is combined here into
counts, flags and a status. Nothing here writes to ``readings`` or ``events``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from ingestd.config import BillingConfig
from ingestd.errors import UsageError

if TYPE_CHECKING:
    from ingestd.store import PoolConnection

    Conn: TypeAlias = PoolConnection | asyncpg.Connection[asyncpg.Record]

Status = Literal["ready", "estimated", "pending", "review"]
STATUSES: Final[tuple[Status, ...]] = ("pending", "review", "estimated", "ready")
# Most urgent first: a pending meter can still be helped before the cut-off; a review
# needs a person; an estimate can be billed but may be re-billed.
URGENCY: Final[dict[str, int]] = {s: i for i, s in enumerate(STATUSES)}
# Flags that need a person before the invoice goes out.
REVIEW_FLAGS: Final = ("rollback", "spike", "tamper", "profile_mismatch")
FLAG_NAMES: Final = ("rollback", "spike", "tamper", "clock", "profile_mismatch", "power_loss")
# A whole fleet's statements are one long read (a minute for 10,000 meters on a small
# server), not a stuck batch write: database.command_timeout_s is not meant for it.
REPORT_TIMEOUT_S: Final = 3600.0
_PERIOD = re.compile(r"(\d{4})-(\d{2})")


# -- periods -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """A billing period: local calendar boundaries, as UTC instants."""

    year: int
    month: int
    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def period_of(year: int, month: int, config: BillingConfig) -> Period:
    """The period named ``year-month``: from 00:00 local time on ``cycle_day`` of that
    month to the same of the next. A local midnight that does not exist (a DST jump at
    midnight) is taken with the offset before the jump, i.e. the first instant of the day."""
    zone = ZoneInfo(config.timezone)
    nyear, nmonth = (year + 1, 1) if month == 12 else (year, month + 1)
    start = datetime(year, month, config.cycle_day, tzinfo=zone).astimezone(UTC)
    end = datetime(nyear, nmonth, config.cycle_day, tzinfo=zone).astimezone(UTC)
    return Period(year, month, start, end)


def parse_period(text: str, config: BillingConfig) -> Period:
    """``YYYY-MM`` as a period; UsageError naming what was wrong otherwise."""
    match = _PERIOD.fullmatch(text)
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1970:
        raise UsageError(f"--period {text!r}: expected YYYY-MM, e.g. 2026-11")
    return period_of(int(match[1]), int(match[2]), config)


def period_containing(instant: datetime, config: BillingConfig) -> Period:
    """The period in which ``instant`` falls (start inclusive, end exclusive)."""
    local = instant.astimezone(ZoneInfo(config.timezone))
    year, month = local.year, local.month
    candidate = period_of(year, month, config)
    if instant < candidate.start:
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
        candidate = period_of(year, month, config)
    return candidate


def previous_period(period: Period, config: BillingConfig) -> Period:
    year, month = (period.year - 1, 12) if period.month == 1 else (period.year, period.month - 1)
    return period_of(year, month, config)


def cutoff(period: Period, config: BillingConfig) -> datetime:
    """When the invoice run for ``period`` happens: ``cutoff_days`` local calendar days
    after it ends (so at local midnight again, whatever DST did in between)."""
    zone = ZoneInfo(config.timezone)
    local_end = period.end.astimezone(zone)
    day = local_end.date() + timedelta(days=config.cutoff_days)
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def grid_after(instant: datetime, interval_s: int) -> datetime:
    """The first interval end strictly after ``instant`` on the meter's grid (multiples of
    ``interval_s`` since the Unix epoch, as meters stamp them)."""
    stamp = int(instant.timestamp()) // interval_s * interval_s + interval_s
    return datetime.fromtimestamp(stamp, UTC)


def expected_intervals(start: datetime, end: datetime, interval_s: int) -> int:
    """Interval ends on the grid in (start, end]: those the period should have readings for."""
    if end <= start:
        return 0
    return int(end.timestamp()) // interval_s - int(start.timestamp()) // interval_s


def check_reportable(period: Period, as_of: datetime) -> None:
    if period.start > as_of:
        raise UsageError(f"--period {period.name}: in the future (it starts {period.start.isoformat()})")


# -- statements ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Boundary:
    """A register value at a period boundary and where it came from."""

    kind: Literal["read", "estimated", "first_read", "missing"]
    import_wh: int | None
    export_wh: int | None
    # The readings used: one (read, first_read) or the two bracketing ones (estimated).
    readings: tuple[Mapping[str, Any], ...]

    def source(self) -> dict[str, Any]:
        return {"kind": self.kind, "readings": list(self.readings)}


@dataclass(frozen=True, slots=True)
class Statement:
    period: str
    meter_id: str
    site: str | None
    start: datetime
    end: datetime
    status: Status
    open: Boundary
    close: Boundary
    consumption_import_wh: int | None
    consumption_export_wh: int | None
    expected: int
    actual: int
    replayed: int
    missing_recoverable: int
    missing_lost: int
    power_off: int
    flags: Mapping[str, Any]

    @property
    def completeness(self) -> float:
        """Share of the expected intervals read (live or replayed), or excused by a power
        outage, in percent."""
        if self.expected == 0:
            return 100.0
        return min(100.0, 100.0 * (self.actual + self.replayed + self.power_off) / self.expected)

    def figures(self) -> dict[str, Any]:
        """What an adjustment compares: the billed figures and the status."""
        return {
            "open_import_wh": self.open.import_wh,
            "close_import_wh": self.close.import_wh,
            "consumption_import_wh": self.consumption_import_wh,
            "open_export_wh": self.open.export_wh,
            "close_export_wh": self.close.export_wh,
            "consumption_export_wh": self.consumption_export_wh,
            "status": self.status,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "meter_id": self.meter_id,
            "site": self.site,
            "period_start": self.start.isoformat(),
            "period_end": self.end.isoformat(),
            "status": self.status,
            **{k: v for k, v in self.figures().items() if k != "status"},
            "open_source": self.open.source(),
            "close_source": self.close.source(),
            "expected": self.expected,
            "actual": self.actual,
            "replayed": self.replayed,
            "missing_recoverable": self.missing_recoverable,
            "missing_lost": self.missing_lost,
            "power_off": self.power_off,
            "completeness_pct": round(self.completeness, 2),
            "flags": dict(self.flags),
        }

    def canonical(self) -> bytes:
        """The bytes the digest covers: sorted keys, no whitespace."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS)

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()


def interpolate(t: datetime, before: tuple[datetime, int], after: tuple[datetime, int]) -> int:
    """The register at ``t`` on the straight line between two readings, to the nearest Wh
    (halves away from zero), in exact integer arithmetic (no float rounding in a bill)."""
    (t0, v0), (t1, v1) = before, after
    span = round((t1 - t0).total_seconds() * 1_000_000)
    part = round((t - t0).total_seconds() * 1_000_000)
    num = (v1 - v0) * part
    q, r = divmod(abs(num), span)
    q += 2 * r >= span
    return v0 + (q if num >= 0 else -q)


def _reading(r: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    if r[f"{prefix}_time"] is None:
        return None
    return {
        "time": r[f"{prefix}_time"].isoformat(),
        "import_wh": r[f"{prefix}_import"],
        "export_wh": r[f"{prefix}_export"],
        "epoch": r[f"{prefix}_epoch"],
        "seq": r[f"{prefix}_seq"],
    }


def boundary(r: Mapping[str, Any], at: datetime, exact: str, before: str, after: str) -> Boundary:
    """The register at ``at``: the reading there, else interpolated between the nearest on
    either side, else missing (pending)."""
    found = _reading(r, exact)
    if found is not None:
        return Boundary("read", found["import_wh"], found["export_wh"], (found,))
    low, high = _reading(r, before), _reading(r, after)
    if low is None or high is None:
        return Boundary("missing", None, None, tuple(x for x in (low, high) if x is not None))
    t0, t1 = r[f"{before}_time"], r[f"{after}_time"]
    imp = interpolate(at, (t0, low["import_wh"]), (t1, high["import_wh"]))
    exp = None
    if low["export_wh"] is not None and high["export_wh"] is not None:
        exp = interpolate(at, (t0, low["export_wh"]), (t1, high["export_wh"]))
    return Boundary("estimated", imp, exp, (low, high))


def status_of(open_: Boundary, close: Boundary, flags: Mapping[str, Any]) -> Status:
    if open_.kind == "missing" or close.kind == "missing":
        return "pending"
    if any(f in flags for f in REVIEW_FLAGS):
        return "review"
    if "estimated" in (open_.kind, close.kind):
        return "estimated"
    return "ready"


def _diff(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


# The statement of every meter of a period, in one pass. Parameters: $1 period start,
# $2 period end, $3 as_of, $4 flash retention, $5 site or NULL.
#
# m: the meters, with the instant their period starts (a meter registered mid-period
#    starts at its first interval end after registration).
# b: per meter, the readings at and around both boundaries (index look-ups).
# agg: per meter, one pass over its readings of the period, each with the one before it:
#    counts, flag inputs, and the holes (runs of missing interval ends between two
#    consecutive readings, with the (epoch, seq) on either side).
# holes/points: every missing interval end, classified: inside a power outage, or
#    recoverable (an open or requested gap lies between the readings around it and it is
#    within the flash retention; or nothing was heard after it yet), or lost.
_STATEMENTS: Final = """
WITH m AS (
    SELECT mt.meter_id, mt.site, mt.interval_s, mt.max_power_w, mt.registered_at,
           make_interval(secs => mt.interval_s) AS step,
           GREATEST($1::timestamptz, to_timestamp(
               ceil(extract(epoch FROM mt.registered_at) / mt.interval_s) * mt.interval_s)) AS start_at
    FROM meters mt
    WHERE mt.registered_at < $2 AND ($5::text IS NULL OR mt.site = $5)
),
b AS (
    SELECT m.*,
           a.time AS anchor_time, a.import_wh AS anchor_import, a.export_wh AS anchor_export,
           a.epoch AS anchor_epoch, a.seq AS anchor_seq,
           n.time AS onext_time, n.import_wh AS onext_import, n.export_wh AS onext_export,
           n.epoch AS onext_epoch, n.seq AS onext_seq,
           c.time AS cprev_time, c.import_wh AS cprev_import, c.export_wh AS cprev_export,
           c.epoch AS cprev_epoch, c.seq AS cprev_seq,
           x.time AS cnext_time, x.import_wh AS cnext_import, x.export_wh AS cnext_export,
           x.epoch AS cnext_epoch, x.seq AS cnext_seq
    FROM m
    LEFT JOIN LATERAL (SELECT * FROM readings r WHERE r.meter_id = m.meter_id AND r.time <= m.start_at
                       ORDER BY r.time DESC LIMIT 1) a ON true
    LEFT JOIN LATERAL (SELECT * FROM readings r WHERE r.meter_id = m.meter_id AND r.time > m.start_at
                       ORDER BY r.time LIMIT 1) n ON true
    LEFT JOIN LATERAL (SELECT * FROM readings r WHERE r.meter_id = m.meter_id AND r.time <= $2
                       ORDER BY r.time DESC LIMIT 1) c ON true
    LEFT JOIN LATERAL (SELECT * FROM readings r WHERE r.meter_id = m.meter_id AND r.time > $2
                       ORDER BY r.time LIMIT 1) x ON true
),
-- The replayed messages of the period, per meter (a few: read through a partial index).
replayed AS (
    SELECT rm.meter_id, array_agg(rm.epoch) AS epochs, array_agg(rm.seq) AS seqs
    FROM raw_messages rm
    WHERE rm.replay AND rm.received_at >= $1::timestamptz - interval '1 day'
    GROUP BY rm.meter_id
),
-- Per meter, one ordered pass over its readings of the period (the (meter_id, time)
-- index gives them in order: no sort of the whole period's readings).
agg AS (
    SELECT b.meter_id, s.*
    FROM b
    LEFT JOIN replayed rp ON rp.meter_id = b.meter_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE on_grid AND NOT from_flash) AS actual,
               count(*) FILTER (WHERE on_grid AND from_flash) AS replayed,
               count(*) FILTER (WHERE NOT on_grid) AS off_grid,
               min(w.time) FILTER (WHERE NOT on_grid) AS first_off_grid,
               count(*) FILTER (WHERE rollback) AS rollbacks,
               min(w.time) FILTER (WHERE rollback) AS first_rollback,
               count(*) FILTER (WHERE spike) AS spikes,
               min(w.time) FILTER (WHERE spike) AS first_spike,
               max(w.import_wh - w.p_import) FILTER (WHERE spike) AS largest_spike_wh,
               sum(w.import_wh - w.p_import)
                   FILTER (WHERE on_grid AND w.p_time = w.time - b.step) AS profile_wh,
               max(w.time) AS last_time,
               -- Each hole is classified on its own: the arrays need no order, only the
               -- same one, which one aggregation pass gives them.
               array_agg(w.p_time) FILTER (WHERE hole) AS h_after,
               array_agg(w.time) FILTER (WHERE hole) AS h_before,
               array_agg(w.p_epoch) FILTER (WHERE hole) AS h_pe,
               array_agg(w.p_seq) FILTER (WHERE hole) AS h_ps,
               array_agg(w.epoch) FILTER (WHERE hole) AS h_ne,
               array_agg(w.seq) FILTER (WHERE hole) AS h_ns
        FROM (
            SELECT w.*,
                   date_part('epoch', w.time)::bigint % b.interval_s = 0 AS on_grid,
                   rp.seqs IS NOT NULL AND w.seq = ANY (rp.seqs)
                       AND EXISTS (SELECT FROM unnest(rp.epochs, rp.seqs) AS u(e, s)
                                   WHERE u.e = w.epoch AND u.s = w.seq) AS from_flash,
                   w.import_wh < w.p_import OR w.export_wh < w.p_export AS rollback,
                   b.max_power_w IS NOT NULL AND w.p_time IS NOT NULL
                       AND (w.import_wh - w.p_import) * 3600
                           > b.max_power_w * date_part('epoch', w.time - w.p_time) AS spike,
                   w.time > GREATEST(w.p_time, b.start_at) + b.step AS hole
            FROM (
                SELECT r.time, r.import_wh, r.export_wh, r.epoch, r.seq,
                       COALESCE(lag(r.time) OVER win, b.anchor_time) AS p_time,
                       COALESCE(lag(r.import_wh) OVER win, b.anchor_import) AS p_import,
                       CASE WHEN lag(r.time) OVER win IS NULL THEN b.anchor_export
                            ELSE lag(r.export_wh) OVER win END AS p_export,
                       COALESCE(lag(r.epoch) OVER win, b.anchor_epoch) AS p_epoch,
                       COALESCE(lag(r.seq) OVER win, b.anchor_seq) AS p_seq
                FROM readings r
                WHERE r.meter_id = b.meter_id AND r.time > b.start_at AND r.time <= $2::timestamptz
                WINDOW win AS (ORDER BY r.time)
            ) w
        ) w
    ) s
),
holes AS (
    SELECT b.meter_id, b.interval_s, b.start_at, h.after, h.before, h.pe, h.ps, h.ne, h.ns
    FROM b JOIN agg USING (meter_id),
         unnest(agg.h_after, agg.h_before, agg.h_pe, agg.h_ps, agg.h_ne, agg.h_ns)
             AS h(after, before, pe, ps, ne, ns)
    UNION ALL
    -- After the last reading of the period (or before the first, when there is none).
    SELECT b.meter_id, b.interval_s, b.start_at,
           CASE WHEN agg.last_time IS NOT NULL THEN b.cprev_time ELSE b.anchor_time END,
           b.cnext_time,
           CASE WHEN agg.last_time IS NOT NULL THEN b.cprev_epoch ELSE b.anchor_epoch END,
           CASE WHEN agg.last_time IS NOT NULL THEN b.cprev_seq ELSE b.anchor_seq END,
           b.cnext_epoch, b.cnext_seq
    FROM b LEFT JOIN agg USING (meter_id)
),
points AS (
    SELECT h.meter_id, t,
           EXISTS (SELECT FROM gaps g
                   WHERE g.meter_id = h.meter_id AND g.status IN ('open', 'requested')
                     AND (h.pe IS NULL OR (g.epoch, g.to_seq) > (h.pe, h.ps))
                     AND (h.ne IS NULL OR (g.epoch, g.from_seq) < (h.ne, h.ns))) AS gap_active,
           h.ne IS NULL AS nothing_after
    FROM holes h,
         generate_series(
             to_timestamp((floor(extract(epoch FROM GREATEST(h.after, h.start_at)) / h.interval_s) + 1)
                          * h.interval_s),
             LEAST(to_timestamp((ceil(extract(epoch FROM COALESCE(h.before, 'infinity'::timestamptz))
                                      / h.interval_s) - 1) * h.interval_s),
                   to_timestamp(floor(extract(epoch FROM $2::timestamptz) / h.interval_s) * h.interval_s)),
             make_interval(secs => h.interval_s)) AS t
    WHERE h.before IS NULL OR h.before > GREATEST(h.after, h.start_at)
),
outages AS (
    SELECT e.meter_id, e.time AS lost_at, COALESCE(rs.time, $3::timestamptz) AS restored_at,
           e.detail ->> 'isolated' AS isolated
    FROM events e
    JOIN m ON m.meter_id = e.meter_id
    LEFT JOIN LATERAL (SELECT min(x.time) AS time FROM events x
                       WHERE x.meter_id = e.meter_id AND x.code = '002' AND x.time >= e.time) rs ON true
    WHERE e.code = '001' AND e.time < $2::timestamptz AND e.time > $1::timestamptz - $4::interval
),
missing AS (
    SELECT p.meter_id,
           count(*) FILTER (WHERE off) AS power_off,
           count(*) FILTER (WHERE NOT off AND may_come) AS recoverable,
           count(*) FILTER (WHERE NOT off AND NOT may_come) AS lost
    FROM (
        SELECT points.*,
               EXISTS (SELECT FROM outages o WHERE o.meter_id = points.meter_id
                         AND o.lost_at < points.t AND points.t <= o.restored_at) AS off,
               points.t > $3::timestamptz OR (points.t > $3::timestamptz - $4::interval
                                              AND (points.gap_active OR points.nothing_after)) AS may_come
        FROM points
    ) p
    GROUP BY p.meter_id
),
power AS (
    SELECT o.meter_id,
           count(*) FILTER (WHERE o.lost_at > m.start_at) AS losses,
           sum(extract(epoch FROM LEAST(o.restored_at, $2::timestamptz, $3::timestamptz)
                                  - GREATEST(o.lost_at, m.start_at))) / 60 AS minutes,
           count(*) FILTER (WHERE o.lost_at > m.start_at AND o.isolated = 'true') AS isolated,
           count(*) FILTER (WHERE o.lost_at > m.start_at AND o.isolated = 'false') AS site_wide
    FROM outages o JOIN m USING (meter_id)
    WHERE o.restored_at > m.start_at
    GROUP BY o.meter_id
),
notable AS (
    SELECT e.meter_id,
           jsonb_agg(jsonb_build_object('code', e.code, 'time', e.time) ORDER BY e.time)
               FILTER (WHERE ec.tamper) AS tamper,
           jsonb_agg(e.time ORDER BY e.time) FILTER (WHERE e.code = '009') AS clock_adjusted
    FROM events e
    JOIN m ON m.meter_id = e.meter_id AND e.time > m.start_at
    LEFT JOIN event_codes ec ON ec.code = e.code
    WHERE e.time > $1::timestamptz AND e.time <= $2::timestamptz AND (ec.tamper OR e.code = '009')
    GROUP BY e.meter_id
)
SELECT b.meter_id, b.site, b.interval_s, b.max_power_w, b.start_at,
       CASE WHEN b.anchor_time = b.start_at THEN b.anchor_time END AS open_time,
       b.anchor_import AS open_import, b.anchor_export AS open_export,
       b.anchor_epoch AS open_epoch, b.anchor_seq AS open_seq,
       b.anchor_time AS oprev_time, b.anchor_import AS oprev_import, b.anchor_export AS oprev_export,
       b.anchor_epoch AS oprev_epoch, b.anchor_seq AS oprev_seq,
       b.onext_time, b.onext_import, b.onext_export, b.onext_epoch, b.onext_seq,
       CASE WHEN b.cprev_time = $2::timestamptz THEN b.cprev_time END AS close_time,
       b.cprev_import AS close_import, b.cprev_export AS close_export,
       b.cprev_epoch AS close_epoch, b.cprev_seq AS close_seq,
       b.cprev_time, b.cprev_import, b.cprev_export, b.cprev_epoch, b.cprev_seq,
       b.cnext_time, b.cnext_import, b.cnext_export, b.cnext_epoch, b.cnext_seq,
       COALESCE(agg.actual, 0) AS actual, COALESCE(agg.replayed, 0) AS replayed,
       COALESCE(agg.off_grid, 0) AS off_grid, agg.first_off_grid,
       COALESCE(agg.rollbacks, 0) AS rollbacks, agg.first_rollback,
       COALESCE(agg.spikes, 0) AS spikes, agg.first_spike, agg.largest_spike_wh,
       agg.profile_wh,
       COALESCE(missing.power_off, 0) AS power_off,
       COALESCE(missing.recoverable, 0) AS recoverable, COALESCE(missing.lost, 0) AS lost,
       COALESCE(power.losses, 0) AS power_losses, COALESCE(power.minutes, 0)::float8 AS power_minutes,
       COALESCE(power.isolated, 0) AS power_isolated, COALESCE(power.site_wide, 0) AS power_site_wide,
       notable.tamper, notable.clock_adjusted
FROM b
LEFT JOIN agg USING (meter_id)
LEFT JOIN missing USING (meter_id)
LEFT JOIN power USING (meter_id)
LEFT JOIN notable USING (meter_id)
ORDER BY b.meter_id
"""


def _flags(r: Mapping[str, Any], open_: Boundary, close: Boundary, missing: int) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if r["rollbacks"]:
        flags["rollback"] = {"count": r["rollbacks"], "first": r["first_rollback"].isoformat()}
    if r["spikes"]:
        flags["spike"] = {
            "count": r["spikes"],
            "first": r["first_spike"].isoformat(),
            "largest_wh": r["largest_spike_wh"],
            "max_power_w": r["max_power_w"],
        }
    if r["tamper"]:
        flags["tamper"] = [{"code": e["code"], "time": _iso(e["time"])} for e in _json(r["tamper"])]
    if r["clock_adjusted"] or r["off_grid"]:
        clock: dict[str, Any] = {}
        if r["clock_adjusted"]:
            clock["adjusted"] = [_iso(t) for t in _json(r["clock_adjusted"])]
        if r["off_grid"]:
            clock["off_grid"] = r["off_grid"]
            clock["first_off_grid"] = r["first_off_grid"].isoformat()
        flags["clock"] = clock
    # With cumulative registers the interval deltas add up to close - open exactly when
    # the profile is complete and on the grid; when they do not, a reading is off the
    # grid or the register jumped in a way the deltas hide.
    complete = missing == 0 and r["power_off"] == 0 and open_.kind == "read" and close.kind == "read"
    if complete and open_.import_wh is not None and close.import_wh is not None:
        profile = int(r["profile_wh"] or 0)
        if profile != close.import_wh - open_.import_wh:
            flags["profile_mismatch"] = {
                "profile_wh": profile,
                "register_wh": close.import_wh - open_.import_wh,
            }
    if r["power_losses"] or r["power_off"]:
        flags["power_loss"] = {
            "count": r["power_losses"],
            "minutes": round(r["power_minutes"], 1),
            "isolated": r["power_isolated"],
            "site_wide": r["power_site_wide"],
        }
    return flags


def _json(value: Any) -> Any:  # noqa: ANN401 - whatever the JSON holds
    """A jsonb value: decoded by the pool's codec (ingestd.store), text on a plain connection."""
    return orjson.loads(value) if isinstance(value, str) else value


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    # jsonb gives times back as text, in PostgreSQL's notation: normalise to ISO 8601.
    return datetime.fromisoformat(str(value)).astimezone(UTC).isoformat()


def build_statement(r: Mapping[str, Any], period: Period) -> Statement:
    start: datetime = r["start_at"]
    open_ = boundary(r, start, "open", "oprev", "onext")
    if open_.kind == "missing" and start > period.start and r["onext_time"] is not None:
        # Installed during the period: nothing was metered before, and its first reading
        # is where its billing starts.
        first = _reading(r, "onext")
        assert first is not None
        open_ = Boundary("first_read", first["import_wh"], first["export_wh"], (first,))
    close = boundary(r, period.end, "close", "cprev", "cnext")
    missing = int(r["recoverable"]) + int(r["lost"])
    flags = _flags(r, open_, close, missing)
    return Statement(
        period=period.name,
        meter_id=r["meter_id"],
        site=r["site"],
        start=start,
        end=period.end,
        status=status_of(open_, close, flags),
        open=open_,
        close=close,
        consumption_import_wh=_diff(open_.import_wh, close.import_wh),
        consumption_export_wh=_diff(open_.export_wh, close.export_wh),
        expected=expected_intervals(start, period.end, r["interval_s"]),
        actual=int(r["actual"]),
        replayed=int(r["replayed"]),
        missing_recoverable=int(r["recoverable"]),
        missing_lost=int(r["lost"]),
        power_off=int(r["power_off"]),
        flags=flags,
    )


async def compute_statements(
    conn: Conn,
    period: Period,
    *,
    as_of: datetime,
    retention: timedelta,
    site: str | None = None,
) -> list[Statement]:
    """The live statement of every meter registered before the period ended (of ``site``)."""
    async with conn.transaction():
        # The plan is large and its estimates high, which makes PostgreSQL compile it
        # (JIT): measured here, 7 s of compiling for a 70 ms query.
        await conn.execute("SET LOCAL jit = off")
        rows = await conn.fetch(
            _STATEMENTS, period.start, period.end, as_of, retention, site, timeout=REPORT_TIMEOUT_S
        )
    return [build_statement(dict(r), period) for r in rows]


def by_urgency(statements: Iterable[Statement]) -> list[Statement]:
    return sorted(statements, key=lambda s: (URGENCY[s.status], s.site or "", s.meter_id))


# -- closing and adjustments ---------------------------------------------------------------


async def close_period(conn: Conn, period: Period, statements: Sequence[Statement]) -> int:
    """Freeze ``statements`` (one transaction, all or nothing); returns how many."""
    async with conn.transaction():
        # Two closes at once: the second waits here and then finds the first's rows.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ingestd_billing_close'), $1)", _key(period)
        )
        if await conn.fetchval(
            "SELECT EXISTS (SELECT FROM billing_statements WHERE period = $1)", period.name
        ):
            raise UsageError(
                f"--period {period.name}: already closed (closed statements are never rewritten)"
            )
        # Not COPY: the pool's jsonb codec is text only (ingestd.store), and COPY is binary.
        # The JSON goes in as text, cast by the server, so that any connection will do.
        columns = ", ".join(_STATEMENT_COLUMNS)
        values = ", ".join(
            f"${i}::text::jsonb" if c in _JSON_COLUMNS else f"${i}"
            for i, c in enumerate(_STATEMENT_COLUMNS, 1)
        )
        await conn.executemany(
            f"INSERT INTO billing_statements ({columns}) VALUES ({values})",  # noqa: S608 - our own names
            [_statement_record(s) for s in statements],
        )
    return len(statements)


def _key(period: Period) -> int:
    return period.year * 100 + period.month


_STATEMENT_COLUMNS: Final = (
    "period",
    "meter_id",
    "site",
    "period_start",
    "period_end",
    "status",
    "open_import_wh",
    "close_import_wh",
    "consumption_import_wh",
    "open_export_wh",
    "close_export_wh",
    "consumption_export_wh",
    "expected",
    "actual",
    "replayed",
    "missing_recoverable",
    "missing_lost",
    "power_off",
    "flags",
    "open_source",
    "close_source",
    "statement",
    "digest",
)


_JSON_COLUMNS: Final = frozenset({"flags", "open_source", "close_source", "statement"})


def _statement_record(s: Statement) -> tuple[Any, ...]:
    f = s.figures()
    return (
        s.period,
        s.meter_id,
        s.site,
        s.start,
        s.end,
        s.status,
        f["open_import_wh"],
        f["close_import_wh"],
        f["consumption_import_wh"],
        f["open_export_wh"],
        f["close_export_wh"],
        f["consumption_export_wh"],
        s.expected,
        s.actual,
        s.replayed,
        s.missing_recoverable,
        s.missing_lost,
        s.power_off,
        orjson.dumps(dict(s.flags)).decode(),
        orjson.dumps(s.open.source()).decode(),
        orjson.dumps(s.close.source()).decode(),
        s.canonical().decode(),
        s.digest(),
    )


async def is_closed(conn: Conn, period: Period) -> bool:
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT FROM billing_statements WHERE period = $1)", period.name)
    )


@dataclass(frozen=True, slots=True)
class Adjustment:
    id: int
    period: str
    meter_id: str
    field: str
    old_value: str | None
    new_value: str | None
    caused_by: list[dict[str, Any]]
    detected_at: datetime
    billed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "period": self.period,
            "meter_id": self.meter_id,
            "field": self.field,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "caused_by": self.caused_by,
            "detected_at": self.detected_at.isoformat(),
            "billed_at": self.billed_at.isoformat() if self.billed_at else None,
        }


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _cause(s: Statement, field: str) -> list[dict[str, Any]]:
    """The messages whose readings gave a figure: (meter, epoch, seq) of each."""
    sides = (
        [s.open]
        if field.startswith("open")
        else [s.close]
        if field.startswith("close")
        else [s.open, s.close]
    )
    return [
        {"meter": s.meter_id, "epoch": r["epoch"], "seq": r["seq"], "time": r["time"]}
        for side in sides
        for r in side.readings
    ]


async def record_adjustments(conn: Conn, period: Period, live: Sequence[Statement]) -> int:
    """Compare the live statements with the closed ones (and the adjustments since) and
    append one row per figure that changed; returns how many. Safe to run concurrently
    and repeatedly: a difference already recorded is not recorded again."""
    added = 0
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ingestd_billing_adjust'), $1)", _key(period)
        )
        rows = await conn.fetch(
            """SELECT s.meter_id, s.status, s.open_import_wh, s.close_import_wh, s.consumption_import_wh,
                      s.open_export_wh, s.close_export_wh, s.consumption_export_wh,
                      COALESCE(a.latest, '{}'::jsonb) AS latest
               FROM billing_statements s
               LEFT JOIN LATERAL (
                   SELECT jsonb_object_agg(x.field, x.new_value) AS latest FROM (
                       SELECT DISTINCT ON (field) field, new_value FROM billing_adjustments ba
                       WHERE ba.period = s.period AND ba.meter_id = s.meter_id
                       ORDER BY field, id DESC) x
               ) a ON true
               WHERE s.period = $1""",
            period.name,
        )
        current = {s.meter_id: s for s in live}
        new: list[tuple[str, str, str, str | None, str | None, str]] = []
        for row in rows:
            s = current.get(row["meter_id"])
            if s is None:
                continue
            latest = _json(row["latest"])
            for field, value in s.figures().items():
                before = latest[field] if field in latest else _text(row[field])
                after = _text(value)
                if before != after:
                    cause = orjson.dumps(_cause(s, field)).decode()
                    new.append((period.name, s.meter_id, field, before, after, cause))
        if new:
            await conn.executemany(
                """INSERT INTO billing_adjustments (period, meter_id, field, old_value, new_value, caused_by)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
                new,
            )
            added = len(new)
    return added


async def list_adjustments(conn: Conn, period: Period | None = None) -> list[Adjustment]:
    rows = await conn.fetch(
        """SELECT id, period, meter_id, field, old_value, new_value, caused_by, detected_at, billed_at
           FROM billing_adjustments WHERE ($1::text IS NULL OR period = $1) ORDER BY period, meter_id, id""",
        period.name if period else None,
    )
    return [
        Adjustment(
            r["id"],
            r["period"],
            r["meter_id"],
            r["field"],
            r["old_value"],
            r["new_value"],
            list(_json(r["caused_by"])),
            r["detected_at"],
            r["billed_at"],
        )
        for r in rows
    ]


async def mark_billed(conn: Conn, ids: Sequence[int], at: datetime) -> int:
    status = await conn.execute(
        "UPDATE billing_adjustments SET billed_at = $2 WHERE id = ANY($1) AND billed_at IS NULL",
        list(ids),
        at,
    )
    return int(status.split()[-1])


async def closed_periods(conn: Conn, since: datetime) -> list[str]:
    """Closed periods that ended after ``since``: data may still arrive for them."""
    rows = await conn.fetch(
        "SELECT DISTINCT period FROM billing_statements WHERE period_end > $1 ORDER BY period", since
    )
    return [r["period"] for r in rows]


async def unbilled_adjustments(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM billing_adjustments WHERE billed_at IS NULL"))


async def check_adjustments(
    conn: Conn,
    config: BillingConfig,
    *,
    as_of: datetime,
    retention: timedelta,
    computed: Mapping[str, Sequence[Statement]] | None = None,
) -> int:
    """Record adjustments for every closed period data may still arrive for (within the
    meters' flash retention of its end); returns how many rows were added. ``computed``:
    live statements the caller already has (as of ``as_of``), by period, not computed again."""
    added = 0
    for name in await closed_periods(conn, as_of - retention):
        period = parse_period(name, config)
        live = (computed or {}).get(name)
        if live is None:
            live = await compute_statements(conn, period, as_of=as_of, retention=retention)
        added += await record_adjustments(conn, period, live)
    return added


async def site_exists(conn: Conn, site: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM meters WHERE site = $1)", site))


async def set_max_power(conn: Conn, meter_id: str, max_power_w: int | None) -> bool:
    status = await conn.execute(
        "UPDATE meters SET max_power_w = $2 WHERE meter_id = $1", meter_id, max_power_w
    )
    return status.endswith(" 1")


# -- output --------------------------------------------------------------------------------

# The CSV a billing system imports: names and order are a contract (README, "Billing").
CSV_COLUMNS: Final = (
    "period",
    "site",
    "meter_id",
    "status",
    "period_start",
    "period_end",
    "open_import_wh",
    "close_import_wh",
    "consumption_import_wh",
    "open_export_wh",
    "close_export_wh",
    "consumption_export_wh",
    "open_kind",
    "close_kind",
    "expected",
    "actual",
    "replayed",
    "missing_recoverable",
    "missing_lost",
    "power_off",
    "completeness_pct",
    "flags",
    "open_messages",
    "close_messages",
)


def _messages(b: Boundary) -> str:
    return " ".join(f"{r['epoch']}:{r['seq']}" for r in b.readings)


def csv_rows(statements: Sequence[Statement]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in statements:
        f = s.figures()
        writer.writerow(
            (
                s.period,
                s.site or "",
                s.meter_id,
                s.status,
                s.start.isoformat(),
                s.end.isoformat(),
                *("" if f[k] is None else f[k] for k in _FIGURE_COLUMNS),
                s.open.kind,
                s.close.kind,
                s.expected,
                s.actual,
                s.replayed,
                s.missing_recoverable,
                s.missing_lost,
                s.power_off,
                f"{s.completeness:.2f}",
                ";".join(k for k in FLAG_NAMES if k in s.flags),
                _messages(s.open),
                _messages(s.close),
            )
        )
    return out.getvalue()


_FIGURE_COLUMNS: Final = (
    "open_import_wh",
    "close_import_wh",
    "consumption_import_wh",
    "open_export_wh",
    "close_export_wh",
    "consumption_export_wh",
)


@dataclass(frozen=True, slots=True)
class Totals:
    meters: int
    by_status: dict[str, int]
    expected: int
    read: int
    consumption_import_wh: int

    @property
    def completeness(self) -> float:
        return 100.0 if self.expected == 0 else 100.0 * self.read / self.expected

    def to_json(self) -> dict[str, Any]:
        return {
            "meters": self.meters,
            "by_status": self.by_status,
            "expected": self.expected,
            "read": self.read,
            "completeness_pct": round(self.completeness, 2),
            "consumption_import_wh": self.consumption_import_wh,
        }


def totals(statements: Iterable[Statement]) -> Totals:
    items = list(statements)
    by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for s in items:
        by_status[s.status] += 1
    return Totals(
        meters=len(items),
        by_status=by_status,
        expected=sum(s.expected for s in items),
        read=sum(min(s.expected, s.actual + s.replayed + s.power_off) for s in items),
        consumption_import_wh=sum(s.consumption_import_wh or 0 for s in items),
    )


def report_json(period: Period, statements: Sequence[Statement], as_of: datetime) -> dict[str, Any]:
    sites = sorted({s.site or "" for s in statements})
    return {
        "period": period.name,
        "period_start": period.start.isoformat(),
        "period_end": period.end.isoformat(),
        "as_of": as_of.isoformat(),
        "statements": [s.to_json() for s in statements],
        "totals": {
            "overall": totals(statements).to_json(),
            "sites": {
                site: totals(s for s in statements if (s.site or "") == site).to_json() for site in sites
            },
        },
    }


def _kwh(wh: int | None) -> str:
    return "-" if wh is None else f"{wh / 1000:.3f}"


def _mark(b: Boundary) -> str:
    return {"read": "", "estimated": "~", "first_read": "^", "missing": "?"}[b.kind]


def report_table(statements: Sequence[Statement]) -> list[str]:
    """Lines of a plain table: one row per meter, then per-site and overall totals."""
    header = (
        "SITE", "METER", "STATUS", "OPEN kWh", "CLOSE kWh", "USED kWh",
        "EXP", "READ", "REPL", "RECOV", "LOST", "POFF", "FLAGS",
    )  # fmt: skip
    rows = [header]
    rows.extend(
        (
            s.site or "-",
            s.meter_id,
            s.status,
            _kwh(s.open.import_wh) + _mark(s.open),
            _kwh(s.close.import_wh) + _mark(s.close),
            _kwh(s.consumption_import_wh),
            str(s.expected),
            str(s.actual),
            str(s.replayed),
            str(s.missing_recoverable),
            str(s.missing_lost),
            str(s.power_off),
            ",".join(k for k in FLAG_NAMES if k in s.flags) or "-",
        )
        for s in statements
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    right = {3, 4, 5, 6, 7, 8, 9, 10, 11}
    lines = [
        "  ".join(
            [
                *(
                    c.rjust(w) if i in right else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=False))
                ),
                r[-1],
            ]
        ).rstrip()
        for r in rows
    ]
    lines.extend(
        _totals_line(f"site {site}", totals(s for s in statements if (s.site or "-") == site))
        for site in sorted({s.site or "-" for s in statements})
    )
    lines.append(_totals_line("all", totals(statements)))
    lines.append("~ estimated (interpolated)  ^ first reading (installed in the period)  ? missing")
    return lines


def _totals_line(label: str, t: Totals) -> str:
    counts = ", ".join(f"{t.by_status[s]} {s}" for s in STATUSES)
    return (
        f"{label}: {t.meters} meters ({counts}), {t.completeness:.2f}% complete, "
        f"{t.consumption_import_wh / 1000:.3f} kWh"
    )
