"""``ingestd audit verify``: the stored data checked again against the meters' signatures.

Every ``raw_messages`` row is parsed again (``ingestd.envelope``) and its signature checked
in the verification worker processes (``ingestd.verifier``) with the key its ``kid``
names as registered now; the readings and events its signed body carries are compared
with the rows of ``readings`` and ``events`` stored under its (meter, epoch, seq), the
ledger's digest with the signed content, and every row with no signed message behind it
is reported. Nothing here trusts what the daemon decided when it stored the data.

One query joins the four tables by (meter, epoch, seq) and is read through a server-side
cursor in a read-only, repeatable-read transaction (one consistent snapshot), a chunk at
a time: memory stays bounded for any range. The signatures of one chunk are checked in
the workers while the next chunk is read and parsed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from ingestd.envelope import Body, MeterKey, Signed, format_time, parse_body, parse_envelope, topic_meter
from ingestd.errors import Rejected
from ingestd.events import POWER_LOSS

if TYPE_CHECKING:
    from ingestd.store import Store
    from ingestd.verifier import VerifierPool

    _Conn = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# What each finding means; the order is the order of the summary. A second stored copy of
# a message is compared like the first: an identical one changes nothing and is no
# finding, another one differs from the rows and is reported as what differs.
FINDING_KINDS: Final = {
    "unparseable": "a stored message no longer parses as a signed message",
    "unknown_key": "its kid is not registered (or to another meter, or for another alg)",
    "key_not_valid": "its key was revoked before it was received, or was not valid then",
    "bad_signature": "its signature does not verify with the key its kid names",
    "header_mismatch": "the raw_messages row says other than the signed body (meter, seq, kid, sent)",
    "ledger_missing": "no message_seqs row for a stored message",
    "digest_mismatch": "the message_seqs digest is not that of the signed content",
    "ledger_unsigned": "a message_seqs row with no signed message",
    "reading_missing": "a signed reading is not in readings",
    "reading_altered": "a readings row differs from what was signed",
    "reading_unsigned": "a readings row no signed message carries",
    "event_missing": "a signed event is not in events",
    "event_altered": "an events row differs from what was signed",
    "event_unsigned": "an events row no signed message carries",
}
# Messages read from the cursor at a time, and handed to the workers at once.
CHUNK: Final = 2000
# Keys the daemon adds to a power loss's detail when it classifies it (ingestd/health.py
# _CLASSIFY): the only change to a stored row the daemon makes, so not a finding.
_CLASSIFIER_KEYS: Final = frozenset({"isolated", "site_meters", "site_power_losses"})
# Events of one message by their position, or by (time, code): time, code, detail.
_Events = dict[Any, tuple[datetime, str, dict[str, Any]]]

# {events} is the events part: by position once the table has events.idx (migration
# 0005), else by (time, code), the identity the unique index of migration 0001 keeps.
_QUERY: Final = """
WITH raw AS (
    SELECT meter_id, epoch, seq, received_at, sent, replay, kid, topic, payload FROM raw_messages
    WHERE ($1::text IS NULL OR meter_id = $1)
      AND ($2::timestamptz IS NULL OR received_at >= $2) AND ($3::timestamptz IS NULL OR received_at < $3)),
ms AS (
    SELECT meter_id, epoch, seq, digest FROM message_seqs
    WHERE ($1::text IS NULL OR meter_id = $1)
      AND ($2::timestamptz IS NULL OR received_at >= $2) AND ($3::timestamptz IS NULL OR received_at < $3)),
rd AS (
    SELECT meter_id, epoch, seq,
           array_agg(time ORDER BY time) AS r_time, array_agg(import_wh ORDER BY time) AS r_import,
           array_agg(export_wh ORDER BY time) AS r_export, array_agg(extra ORDER BY time) AS r_extra
    FROM readings
    WHERE ($1::text IS NULL OR meter_id = $1)
      AND ($2::timestamptz IS NULL OR received_at >= $2) AND ($3::timestamptz IS NULL OR received_at < $3)
    GROUP BY meter_id, epoch, seq),
ev AS (
    SELECT meter_id, epoch, seq, {events}
    FROM events
    WHERE ($1::text IS NULL OR meter_id = $1)
      AND ($2::timestamptz IS NULL OR received_at >= $2) AND ($3::timestamptz IS NULL OR received_at < $3)
    GROUP BY meter_id, epoch, seq)
SELECT meter_id, epoch, seq, raw.received_at, raw.sent, raw.replay, raw.kid, raw.topic, raw.payload,
       ms.digest, rd.r_time, rd.r_import, rd.r_export, rd.r_extra, ev.e_idx, ev.e_time, ev.e_code, ev.e_detail
FROM raw
FULL JOIN ms USING (meter_id, epoch, seq)
FULL JOIN rd USING (meter_id, epoch, seq)
FULL JOIN ev USING (meter_id, epoch, seq)
"""
_EVENTS_BY_POSITION: Final = (
    "array_agg(idx ORDER BY idx) AS e_idx, array_agg(time ORDER BY idx) AS e_time, "
    "array_agg(code ORDER BY idx) AS e_code, array_agg(detail ORDER BY idx) AS e_detail"
)
_EVENTS_BY_IDENTITY: Final = (
    "NULL::integer[] AS e_idx, array_agg(time ORDER BY time, code) AS e_time, "
    "array_agg(code ORDER BY time, code) AS e_code, array_agg(detail ORDER BY time, code) AS e_detail"
)
_HAS_EVENT_IDX: Final = """
SELECT EXISTS (SELECT FROM pg_attribute
               WHERE attrelid = 'events'::regclass AND attname = 'idx' AND NOT attisdropped)
"""
# Readings a message signed that are not stored under its own seq: the unique index on
# (meter_id, time) keeps the first message's reading of an interval, so another
# message's row may hold it.
_READINGS_AT: Final = """
SELECT meter_id, time, import_wh, export_wh, extra, epoch, seq FROM readings
WHERE (meter_id, time) IN (SELECT * FROM unnest($1::text[], $2::timestamptz[]))
"""


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    meter_id: str
    epoch: int
    seq: int
    detail: str

    def line(self) -> str:
        return f"{self.kind}: meter {self.meter_id} epoch {self.epoch} seq {self.seq}: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "meter_id": self.meter_id,
            "epoch": self.epoch,
            "seq": self.seq,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Summary:
    messages: int = 0
    readings: int = 0
    events: int = 0
    findings: collections.Counter[str] = field(default_factory=collections.Counter)
    # Messages signed by a key revoked after they were received: they verify, and stay valid.
    revoked_after: collections.Counter[str] = field(default_factory=collections.Counter)
    # Signed readings whose interval another message's reading holds (the first one stored).
    held_by_other_message: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.findings

    def as_json(self) -> dict[str, Any]:
        return {
            "messages_checked": self.messages,
            "readings_checked": self.readings,
            "events_checked": self.events,
            "findings": sum(self.findings.values()),
            "findings_by_kind": {k: self.findings[k] for k in FINDING_KINDS if self.findings[k]},
            "keys_revoked_after_receipt": dict(sorted(self.revoked_after.items())),
            "readings_held_by_another_message": self.held_by_other_message,
            "seconds": round(self.seconds, 3),
            "messages_per_s": round(self.messages / self.seconds) if self.seconds > 0 else None,
            "clean": self.clean,
        }

    def lines(self) -> list[str]:
        rate = f" ({self.messages / self.seconds:,.0f} msg/s)" if self.seconds > 0 else ""
        total = sum(self.findings.values())
        out = [
            f"{self.messages:,} messages checked ({self.readings:,} readings, {self.events:,} events) "
            f"in {self.seconds:.1f} s{rate}: "
            + ("clean" if self.clean else f"{total:,} finding{'s' if total != 1 else ''}")
        ]
        out.extend(
            f"  {kind:<18} {self.findings[kind]:>8,}  {meaning}"
            for kind, meaning in FINDING_KINDS.items()
            if self.findings[kind]
        )
        for kid, count in sorted(self.revoked_after.items()):
            out.append(
                f"  note: key {kid} was revoked after {count:,} message(s) it signed were received; "
                "they verify and stay valid"
            )
        if self.held_by_other_message:
            out.append(
                f"  note: {self.held_by_other_message:,} signed reading(s) are stored under another "
                "message of the same meter and interval (the first one received is kept)"
            )
        return out


@dataclass(slots=True)
class _Row:
    """One (meter, epoch, seq) of the join, with what was signed once it is parsed."""

    record: asyncpg.Record
    signed: Signed | None = None


class Auditor:
    """Checks the store; ``report`` is called with each finding as it is found."""

    def __init__(
        self,
        store: Store,
        pool: VerifierPool,
        *,
        topic_prefix: str,
        report: Callable[[Finding], None],
        chunk: int = CHUNK,
    ) -> None:
        self._store = store
        self._pool = pool
        self._prefix = topic_prefix
        self._report = report
        self._chunk = chunk
        self._keys: dict[str, MeterKey] = {}
        # Events compared by their position in the message (events.idx, migration 0005).
        self._by_position = False
        self.summary = Summary()

    async def run(
        self, *, meter_id: str | None = None, since: datetime | None = None, until: datetime | None = None
    ) -> Summary:
        """Check the messages received in [since, until) (of one meter, if given)."""
        started = time.monotonic()
        # Keys as registered now: a key changed since (swapped, revoked) shows up here.
        self._keys = {k.kid: k for k in await self._store.load_keys()}
        async with (
            self._store.connection() as conn,
            self._store.connection() as side,
            conn.transaction(readonly=True, isolation="repeatable_read"),
        ):
            # The side connection looks rows up while the main one streams the join: in
            # the same snapshot, so that both see one state of the database.
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            async with side.transaction(readonly=True, isolation="repeatable_read"):
                await side.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                self._by_position = bool(await conn.fetchval(_HAS_EVENT_IDX))
                query = _QUERY.format(
                    events=_EVENTS_BY_POSITION if self._by_position else _EVENTS_BY_IDENTITY
                )
                cursor = await conn.cursor(query, meter_id, since, until)
                await self._stream(cursor, side)
        self.summary.seconds = time.monotonic() - started
        return self.summary

    async def _stream(self, cursor: asyncpg.cursor.Cursor[asyncpg.Record], side: _Conn) -> None:
        """Three stages at once: the database produces the next chunk, the workers verify
        the one read last, and this loop compares the one before with its rows."""
        pending: collections.deque[tuple[list[_Row], asyncio.Task[list[bool | None]]]] = collections.deque()
        fetching: asyncio.Task[list[asyncpg.Record]] | None = asyncio.ensure_future(cursor.fetch(self._chunk))
        try:
            while fetching is not None:
                records = await fetching
                fetching = asyncio.ensure_future(cursor.fetch(self._chunk)) if records else None
                if records:
                    rows = [self._prepare(r) for r in records]
                    signed = [r.signed for r in rows if r.signed is not None]
                    pending.append((rows, asyncio.ensure_future(self._pool.verify(signed))))
                while pending and (len(pending) > 1 or fetching is None):
                    rows, verifying = pending.popleft()
                    await self._finish(side, rows, await verifying)
        finally:
            for task in [*(verifying for _rows, verifying in pending), *([fetching] if fetching else [])]:
                task.cancel()
            await asyncio.gather(
                *(verifying for _rows, verifying in pending),
                *([fetching] if fetching else []),
                return_exceptions=True,
            )

    def _found(self, kind: str, record: asyncpg.Record, detail: str) -> None:
        self.summary.findings[kind] += 1
        self._report(Finding(kind, record["meter_id"], record["epoch"], record["seq"], detail))

    def _prepare(self, record: asyncpg.Record) -> _Row:
        """Parse the envelope and find its key; what cannot be checked is reported here."""
        row = _Row(record)
        payload = record["payload"]
        if payload is None:
            self._unsigned(record)
            return row
        self.summary.messages += 1
        try:
            header = parse_envelope(payload)
        except Rejected as exc:
            self._found("unparseable", record, f"{exc.reason}: {exc.detail}")
            return row
        key = self._keys.get(header.kid)
        if key is None or key.meter_id != record["meter_id"] or key.alg != header.alg:
            why = (
                "not registered"
                if key is None
                else f"registered to meter {key.meter_id}"
                if key.meter_id != record["meter_id"]
                else f"registered for {key.alg}, header says {header.alg}"
            )
            self._found("unknown_key", record, f"key {header.kid!r} {why}")
            return row
        received_at: datetime = record["received_at"]
        unusable = key.usable_at(received_at)
        if unusable is not None:
            when = {
                "key revoked": key.revoked_at,
                "key not yet valid": key.valid_from,
                "key expired": key.valid_until,
            }.get(unusable)
            at = f" at {format_time(when)}" if when is not None else ""
            self._found(
                "key_not_valid",
                record,
                f"{unusable}{at}, before the message was received "
                f"({format_time(received_at)}): {header.kid!r}",
            )
        elif key.revoked_at is not None:
            self.summary.revoked_after[key.kid] += 1
        row.signed = Signed(header, key)
        return row

    def _unsigned(self, record: asyncpg.Record) -> None:
        """Rows under a (meter, epoch, seq) with no stored message: nothing signed them."""
        if record["digest"] is not None:
            self._found("ledger_unsigned", record, "message_seqs row with no message in raw_messages")
        for t, imp in zip(record["r_time"] or (), record["r_import"] or (), strict=True):
            self.summary.readings += 1
            self._found(
                "reading_unsigned", record, f"reading at {format_time(t)} (import_wh {imp}): no message"
            )
        for t, code in zip(record["e_time"] or (), record["e_code"] or (), strict=True):
            self.summary.events += 1
            self._found("event_unsigned", record, f"event {code} at {format_time(t)}: no message")

    async def _finish(
        self,
        conn: _Conn,
        rows: Sequence[_Row],
        verdicts: list[bool | None],
    ) -> None:
        """With the signatures checked: compare each signed body with the rows."""
        answers = iter(verdicts)
        missing: list[tuple[_Row, Any]] = []
        for row in rows:
            record = row.record
            if row.signed is None:
                continue
            verdict = next(answers)
            if not verdict:
                why = (
                    "does not verify"
                    if verdict is False
                    else "could not be checked (it crashed the verifier)"
                )
                self._found(
                    "bad_signature",
                    record,
                    f"signature {why} with key {row.signed.key.kid!r} as registered now",
                )
                continue
            try:
                body = parse_body(row.signed.header.body)
            except Rejected as exc:
                self._found("unparseable", record, f"signed body: {exc.detail}")
                continue
            self._compare_message(record, row.signed, body)
            missing.extend((row, r) for r in self._compare_readings(record, body))
            self._compare_events(record, body)
        if missing:
            await self._readings_elsewhere(conn, missing)

    def _compare_message(self, record: asyncpg.Record, signed: Signed, body: Body) -> None:
        differs = [
            f"{name} stored {stored!r}, signed {signed_value!r}"
            for name, stored, signed_value in (
                ("meter", record["meter_id"], body.meter_id),
                ("epoch", record["epoch"], body.epoch),
                ("seq", record["seq"], body.seq),
                ("kid", record["kid"], signed.header.kid),
                ("replay", record["replay"], body.replay),
            )
            if stored != signed_value
        ]
        if record["sent"] != body.sent:
            differs.append(f"sent stored {format_time(record['sent'])}, signed {format_time(body.sent)}")
        if topic_meter(record["topic"], self._prefix) != body.meter_id:
            differs.append(f"topic {record['topic']!r} is not the signed meter's")
        if differs:
            self._found("header_mismatch", record, "; ".join(differs))
        if record["digest"] is None:
            self._found("ledger_missing", record, "no message_seqs row")
        elif record["digest"] != body.digest:
            self._found(
                "digest_mismatch",
                record,
                f"message_seqs digest {bytes(record['digest']).hex()[:16]}..., "
                f"signed content's {body.digest.hex()[:16]}...",
            )

    def _compare_readings(self, record: asyncpg.Record, body: Body) -> list[Any]:
        """Report altered and unsigned rows; return the signed readings not stored here."""
        stored = {
            t: (imp, exp, extra)
            for t, imp, exp, extra in zip(
                record["r_time"] or (),
                record["r_import"] or (),
                record["r_export"] or (),
                record["r_extra"] or (),
                strict=True,
            )
        }
        self.summary.readings += len(stored)
        missing = []
        signed_times = set()
        for reading in body.readings:
            if reading.time in signed_times:
                continue  # the same interval twice in one message: the first one is stored
            signed_times.add(reading.time)
            row = stored.get(reading.time)
            if row is None:
                missing.append(reading)
                continue
            differs = _differences(
                ("import_wh", row[0], reading.import_wh),
                ("export_wh", row[1], reading.export_wh),
                ("extra", row[2], reading.extra),
            )
            if differs:
                self._found("reading_altered", record, f"reading at {format_time(reading.time)}: {differs}")
        for t, (imp, _exp, _extra) in stored.items():
            if t not in signed_times:
                self._found(
                    "reading_unsigned",
                    record,
                    f"reading at {format_time(t)} (import_wh {imp}) is not in the message",
                )
        return missing

    async def _readings_elsewhere(self, conn: _Conn, missing: Sequence[tuple[_Row, Any]]) -> None:
        rows = await conn.fetch(
            _READINGS_AT, [r.record["meter_id"] for r, _ in missing], [reading.time for _, reading in missing]
        )
        held = {(r["meter_id"], r["time"]) for r in rows}
        for row, reading in missing:
            if (row.record["meter_id"], reading.time) in held:
                # Another message's row holds this interval and is checked against its own
                # signed message; the meter signed two values for one interval, and the
                # first stored is kept (docs/protocol.md).
                self.summary.held_by_other_message += 1
            else:
                self._found(
                    "reading_missing",
                    row.record,
                    f"signed reading at {format_time(reading.time)} "
                    f"(import_wh {reading.import_wh}) is not stored",
                )

    def _compare_events(self, record: asyncpg.Record, body: Body) -> None:
        times = record["e_time"] or ()
        codes = record["e_code"] or ()
        details = record["e_detail"] or ()
        self.summary.events += len(times)
        # Rows whose position is not known (a negative idx, migration 0005: written by a
        # daemon older than the column, or not placed by the upgrade): matched by content.
        unplaced: list[tuple[datetime, str, dict[str, Any]]] = []
        if self._by_position:
            stored: _Events = {}
            for i, event in zip(record["e_idx"] or (), zip(times, codes, details, strict=True), strict=True):
                if i < 0:
                    unplaced.append(event)
                else:
                    stored[i] = event
            signed: _Events = {i: (e.time, e.code, e.detail) for i, e in enumerate(body.events)}
            # The event as signed, and where it stands in the message.
            label: Callable[[Any, datetime, str], str] = (  # noqa: E731
                lambda i, t, c: f"event {c} at {format_time(t)} (events[{i}])"
            )
        else:
            # Without a position, an event is (time, code) within its message: the identity
            # the unique index keeps (a repeat in one message is stored once).
            stored = {(t, c): (t, c, d) for t, c, d in zip(times, codes, details, strict=True)}
            signed = {}
            for e in body.events:
                signed.setdefault((e.time, e.code), (e.time, e.code, e.detail))
            label = lambda _k, t, c: f"event {c} at {format_time(t)}"  # noqa: E731
        for k, (t, code, detail) in signed.items():
            row = stored.get(k)
            if row is None:
                match = next(
                    (u for u in unplaced if u[0] == t and u[1] == code and _same_detail(u[2], detail, code)),
                    None,
                )
                if match is not None:
                    unplaced.remove(match)
                else:
                    self._found("event_missing", record, f"signed {label(k, t, code)} is not stored")
                continue
            differs = _differences(("time", row[0], t), ("code", row[1], code))
            if not _same_detail(row[2], detail, code):
                differs = ", ".join(filter(None, [differs, f"detail stored {row[2]}, signed {detail}"]))
            if differs:
                self._found("event_altered", record, f"{label(k, t, code)}: {differs}")
        for k in stored.keys() - signed.keys():
            t, code, _detail = stored[k]
            self._found("event_unsigned", record, f"{label(k, t, code)} is not in the message")
        for t, code, _detail in unplaced:
            self._found(
                "event_unsigned",
                record,
                f"event {code} at {format_time(t)} (no position) is not in the message",
            )


def _differences(*fields: tuple[str, object, object]) -> str:
    return ", ".join(
        f"{name} stored {stored}, signed {signed}" for name, stored, signed in fields if stored != signed
    )


def _same_detail(stored: dict[str, Any], signed: dict[str, Any], code: str) -> bool:
    if stored == signed:
        return True
    # The daemon's classification of a power loss, added after it was stored.
    return (
        code == POWER_LOSS
        and "isolated" not in signed
        and stored.keys() >= _CLASSIFIER_KEYS
        and {k: v for k, v in stored.items() if k not in _CLASSIFIER_KEYS} == signed
    )


# -- the admin log ----------------------------------------------------------------------

_HISTORY: Final = """
SELECT id, logged_at, db_role, session_role, application_name, client_addr::text AS client_addr,
       action, table_name, row_key, old_values, new_values, transaction_id
FROM admin_log
WHERE meter_id = $1
ORDER BY id
"""


async def meter_history(
    conn: asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record], meter_id: str
) -> list[dict[str, Any]]:
    """Every logged change to a meter and its keys, oldest first."""
    return [dict(r) for r in await conn.fetch(_HISTORY, meter_id)]


def describe_change(entry: dict[str, Any]) -> str:
    """What a log entry changed, in one line: fields and values, a public key by digest."""
    old: dict[str, Any] = entry["old_values"] or {}
    new: dict[str, Any] = entry["new_values"] or {}
    if entry["action"] == "TRUNCATE":
        return "every row deleted"
    shown = new if entry["action"] == "INSERT" else old if entry["action"] == "DELETE" else None
    if shown is not None:
        return " ".join(f"{k}={_short_value(k, v)}" for k, v in shown.items() if v is not None)
    return (
        ", ".join(
            f"{k}: {_short_value(k, old.get(k))} -> {_short_value(k, new.get(k))}"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)
        )
        or "no field changed"
    )


def _short_value(name: str, value: object) -> str:
    if value is None:
        return "-"
    if name == "public_key" and isinstance(value, str):
        # A PEM is long; its digest is what tells one key from another.
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    return str(value)
