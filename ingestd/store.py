"""TimescaleDB: schema migrations, the meter registry, and the batch write.

A batch is written in one transaction: the message ledger (``message_seqs``) decides what
is new, a duplicate or a conflict; readings, events and raw messages of the new ones go
in with ``INSERT ... SELECT FROM unnest(...)``; rejections go to the quarantine. The
caller acknowledges upstream only after ``write_batch`` returns, i.e. after the commit.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import asyncpg
import orjson
import structlog

from ingestd import roles
from ingestd.config import DatabaseConfig, GapsConfig, read_secret
from ingestd.envelope import Message, MeterKey, shown_topic
from ingestd.errors import IngestdError, RejectReason, ServiceUnavailable, UsageError
from ingestd.gaps import GapCounts, seen_from, track_seqs
from ingestd.signature import Alg, is_alg, load_public_key

log = structlog.get_logger("ingestd.store")

KEYS_CHANNEL: Final = "ingestd_keys"
_MIGRATION_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# Any other session running migrations holds this lock (an arbitrary, fixed number).
_MIGRATION_LOCK: Final = 0x1D6E57D
# What a lost or refused connection looks like; anything else from the server is about data.
CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A server that ends an idle pooled connection (shutdown, restart) sends a FATAL error
    # and then closes the socket; a query sent between the two finds asyncpg's protocol
    # stuck ("cannot switch to state 15; another operation (2) is in progress",
    # MagicStack/asyncpg#784). The connection is dead: retry on another, like any lost one.
    asyncpg.InternalClientError,
    TimeoutError,
)

# What the verifier's cache holds of a key's row: any change to it changes this.
_KEY_FINGERPRINT: Final = (
    "md5(concat_ws('|', meter_id, alg, public_key, coalesce(valid_from::text, '-'), "
    "coalesce(valid_until::text, '-'), coalesce(revoked_at::text, '-')))"
)
_LOAD_KEYS: Final = (
    "SELECT kid, meter_id, alg, public_key, valid_from, valid_until, revoked_at, "  # noqa: S608 - constants only
    f"{_KEY_FINGERPRINT} AS fingerprint FROM meter_keys"
)
_RAW_COLUMNS: Final = ("meter_id", "epoch", "seq", "received_at", "sent", "replay", "kid", "topic", "payload")
# A batch's readings on their way in (see _insert_data): private to the session, emptied at
# every commit. `extra` is JSON text, since asyncpg has no binary jsonb codec for COPY; `n`
# keeps the batch's order.
_READINGS_IN: Final = """CREATE TEMPORARY TABLE IF NOT EXISTS ingestd_readings_in (
    n integer, meter_id text, time timestamptz, import_wh bigint, export_wh bigint, extra text,
    epoch bigint, seq bigint, received_at timestamptz) ON COMMIT DELETE ROWS"""

# asyncpg's classes are generic only in its stubs: these aliases exist for the type checker.
if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]
    PoolConnection = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Accept:
    """A verified message on its way to the database."""

    message: Message
    topic: str
    payload: bytes
    received_at: datetime


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Reject:
    """A rejected message on its way to the quarantine."""

    reason: RejectReason
    detail: str
    topic: str
    payload: bytes
    received_at: datetime
    meter_id: str | None
    kid: str | None

    def __post_init__(self) -> None:
        # Wherever a rejection is made, its topic (from the wire, up to 65,535 bytes) is
        # cut once here, so that neither its quarantine row nor a log line carries more.
        self.topic = shown_topic(self.topic)


@dataclass(frozen=True, slots=True)
class BatchResult:
    accepted: list[Accept]
    duplicates: int
    # Rejections decided at write time (seq conflicts; data the database refused), already
    # in the quarantine within the same transaction.
    late_rejects: list[Reject]
    readings_stored: int
    # Event rows inserted, by code.
    events_stored: collections.Counter[str]
    gaps: GapCounts = field(default_factory=GapCounts)

    def plus(self, other: BatchResult) -> BatchResult:
        return BatchResult(
            [*self.accepted, *other.accepted],
            self.duplicates + other.duplicates,
            [*self.late_rejects, *other.late_rejects],
            self.readings_stored + other.readings_stored,
            self.events_stored + other.events_stored,
            self.gaps.plus(other.gaps),
        )


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("ingestd.migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def _notice_logger(migration: Migration) -> Callable[[Any, asyncpg.PostgresLogMessage], None]:
    name = f"{migration.version:04d}_{migration.name}"

    def notice(_conn: Any, message: asyncpg.PostgresLogMessage) -> None:  # noqa: ANN401 - a connection or its proxy
        log.info("migration_notice", migration=name, notice=message.message)

    return notice


def _json_codec(conn: Connection) -> Any:  # noqa: ANN401 - asyncpg's coroutine type
    return conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _init_connection(conn: Connection) -> None:
    await _json_codec(conn)


def connect_kwargs(config: DatabaseConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dsn": config.url, "timeout": config.connect_timeout_s}
    if "application_name=" not in config.url:
        # Shown in admin_log and pg_stat_activity: a change made by ingestd, not by hand.
        kwargs["server_settings"] = {"application_name": "ingestd"}
    if config.password_file:
        kwargs["password"] = read_secret("database.password_file", config.password_file)
    return kwargs


class Store:
    """The database, as an async context manager owning a connection pool."""

    def __init__(
        self,
        config: DatabaseConfig,
        *,
        quarantine_payload_max: int = 4096,
        gaps: GapsConfig | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        self._quarantine_max = quarantine_payload_max
        self._gaps = gaps or GapsConfig()
        # The daemon passes its clock (the database's: ingestd.clock), so that gaps are not
        # stamped by a host clock that jumped.
        self._now = now or utcnow
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    async def __aenter__(self) -> Self:
        try:
            self._pool = await asyncpg.create_pool(
                **connect_kwargs(self._config),
                min_size=1,
                max_size=self._config.pool_size,
                command_timeout=self._config.command_timeout_s,
                init=_init_connection,
            )
        except asyncpg.PostgresError as exc:
            # A refusal (no such database, role or password, no CONNECT privilege) is the
            # operator's to fix; the server starting up or shutting down is not.
            raise (database_error(exc) or ServiceUnavailable(_one_line(exc))) from exc
        except CONNECTION_ERRORS as exc:
            raise ServiceUnavailable(f"database unreachable: {_one_line(exc)}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # close() waits for every connection to be released, and a connection
                # whose query was cancelled is released only after the server answers
                # its reset: from a server that stopped answering, command_timeout_s.
                async with asyncio.timeout(self._config.close_timeout_s):
                    await pool.close()
            except TimeoutError:
                log.warning("db_close_timeout", timeout_s=self._config.close_timeout_s)
                pool.terminate()

    def terminate(self) -> None:
        """Close every connection at once, without waiting for the server: what was not
        committed is rolled back (and was not acknowledged)."""
        if self._pool is not None:
            self._pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("Store used outside its context")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnection]:
        async with self.pool.acquire() as conn:
            yield conn

    # -- schema -----------------------------------------------------------------------

    async def migrate(self, *, note: Callable[[str], None] | None = None) -> list[Migration]:
        """Apply the migrations not yet applied; returns those it applied. Then create the
        database roles (ingestd/roles.py) and grant their privileges again; ``note`` gets
        the one line to show when the roles could not be created."""
        applied: list[Migration] = []
        # A connection of its own, without the pool's command timeout: a migration that
        # rewrites a large table (0005: every event) takes as long as it takes.
        try:
            conn: Connection = await asyncpg.connect(**connect_kwargs(self._config))
        except CONNECTION_ERRORS as exc:
            raise ServiceUnavailable(f"database unreachable: {_one_line(exc)}") from exc
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                           version integer PRIMARY KEY,
                           name text NOT NULL,
                           applied_at timestamptz NOT NULL DEFAULT now())"""
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for migration in migrations():
                    if migration.version in done:
                        continue
                    # A migration that changes data says what it did in NOTICEs (0005: the
                    # events it restored); the operator sees them in the log.
                    listener = _notice_logger(migration)
                    conn.add_log_listener(listener)
                    try:
                        async with conn.transaction():
                            await conn.execute(migration.sql)
                            await conn.execute(
                                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                migration.version,
                                migration.name,
                            )
                    finally:
                        conn.remove_log_listener(listener)
                    applied.append(migration)
                roles_note = await roles.apply(conn)
                if roles_note is not None:
                    (note or (lambda text: log.warning("roles_not_created", detail=text)))(roles_note)
            except asyncpg.UndefinedFileError as exc:
                raise UsageError(
                    "TimescaleDB is not installed in this PostgreSQL "
                    f"(see deploy/install-timescaledb.sh): {_one_line(exc)}"
                ) from exc
            except asyncpg.FeatureNotSupportedError as exc:
                raise UsageError(f"TimescaleDB not loaded: {_one_line(exc)}") from exc
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        finally:
            await conn.close()
        return applied

    async def pending_migrations(self) -> list[Migration]:
        async with self.connection() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            done = (
                {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                if exists
                else set()
            )
        return [m for m in migrations() if m.version not in done]

    # -- meters and keys --------------------------------------------------------------

    async def add_meter(
        self,
        meter_id: str,
        *,
        alg: Alg,
        kid: str,
        public_key_pem: str,
        site: str | None,
        interval_s: int | None,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
    ) -> None:
        """Register a meter (or update its site and interval) and add one key to it."""
        async with self.connection() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO meters (meter_id, site, interval_s)
                   VALUES ($1, $2, COALESCE($3, 900))
                   ON CONFLICT (meter_id) DO UPDATE
                   SET site = COALESCE(EXCLUDED.site, meters.site),
                       interval_s = COALESCE($3, meters.interval_s)""",
                meter_id,
                site,
                interval_s,
            )
            owner = await conn.fetchval("SELECT meter_id FROM meter_keys WHERE kid = $1", kid)
            if owner is not None:
                raise UsageError(f"key id {kid!r} is already registered (to meter {owner})")
            await conn.execute(
                """INSERT INTO meter_keys (kid, meter_id, alg, public_key, valid_from, valid_until)
                   VALUES ($1, $2, $3, $4, COALESCE($5, now()), $6)""",
                kid,
                meter_id,
                alg,
                public_key_pem,
                valid_from,
                valid_until,
            )

    async def revoke_key(self, kid: str, at: datetime | None = None) -> bool:
        async with self.connection() as conn:
            status = await conn.execute(
                "UPDATE meter_keys SET revoked_at = COALESCE($2, now()) "
                "WHERE kid = $1 AND revoked_at IS NULL",
                kid,
                at,
            )
        return status.endswith(" 1")

    async def list_meters(self) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(
                """SELECT m.meter_id, m.site, m.interval_s, m.registered_at,
                          COALESCE(json_agg(json_build_object(
                              'kid', k.kid, 'alg', k.alg, 'valid_from', k.valid_from,
                              'valid_until', k.valid_until, 'revoked_at', k.revoked_at)
                              ORDER BY k.valid_from) FILTER (WHERE k.kid IS NOT NULL),
                              '[]') AS keys
                   FROM meters m LEFT JOIN meter_keys k USING (meter_id)
                   GROUP BY m.meter_id ORDER BY m.meter_id"""
            )

    async def list_gaps(
        self, *, meter_id: str | None = None, status: str | None = "active"
    ) -> list[asyncpg.Record]:
        """Gaps with ``status`` (``active``: open or requested; None: every one kept)."""
        statuses = ["open", "requested"] if status == "active" else [status] if status else None
        async with self.connection() as conn:
            return await conn.fetch(
                """SELECT meter_id, epoch, from_seq, to_seq, status, detected_at, last_request_at,
                          next_request_at, attempts, request_id, closed_at
                   FROM gaps
                   WHERE ($1::text IS NULL OR meter_id = $1) AND ($2::text[] IS NULL OR status = ANY($2))
                   ORDER BY meter_id, epoch, from_seq""",
                meter_id,
                statuses,
            )

    async def request_gaps_now(self, meter_id: str) -> int:
        """Make a meter's active gaps due at once; returns how many."""
        async with self.connection() as conn:
            status = await conn.execute(
                """UPDATE gaps SET next_request_at = now()
                   WHERE meter_id = $1 AND status IN ('open', 'requested')""",
                meter_id,
            )
        return _row_count(status)

    async def load_keys(self, kids: Sequence[str] | None = None) -> list[MeterKey]:
        """Registered keys (all, or those named); a key that no longer parses is skipped."""
        query = _LOAD_KEYS
        async with self.connection() as conn:
            rows = await (
                conn.fetch(query) if kids is None else conn.fetch(query + " WHERE kid = ANY($1)", kids)
            )
        keys = []
        for row in rows:
            alg = row["alg"]
            if not is_alg(alg):
                continue
            try:
                public = load_public_key(row["public_key"].encode(), alg)
            except UsageError:
                continue
            keys.append(
                MeterKey(
                    kid=row["kid"],
                    meter_id=row["meter_id"],
                    alg=alg,
                    key=public,
                    valid_from=row["valid_from"],
                    valid_until=row["valid_until"],
                    revoked_at=row["revoked_at"],
                    fingerprint=row["fingerprint"],
                )
            )
        return keys

    async def key_fingerprints(self, kids: Sequence[str]) -> dict[str, str]:
        """The fingerprint of each named key's row that still exists: cheap to compare,
        where reloading would parse every key again."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT kid, {_KEY_FINGERPRINT} AS fingerprint FROM meter_keys WHERE kid = ANY($1)",  # noqa: S608 - a constant, no input
                kids,
            )
        return {r["kid"]: r["fingerprint"] for r in rows}

    async def listen_keys(
        self,
        changed: Callable[[str], None],
        resync: Callable[[], None],
        *,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        """Call ``changed(kid)`` whenever a key is added, changed or removed, until
        cancelled. The listening connection is re-established when it is lost, and
        ``resync()`` is called then: notifications sent meanwhile are gone."""
        delay = retry_initial_s
        connections = 0

        def connected() -> None:
            nonlocal connections, delay
            connections += 1
            delay = retry_initial_s
            if connections > 1:
                log.info("key_listener_reconnected")
                resync()

        while True:
            try:
                await self._listen_once(changed, connected)
                log.warning("key_listener_lost")
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Any refusal (out of shared memory, too many connections) is the server's
                # state, not a reason to stop the daemon: listen again after a back-off.
                log.warning("key_listener_failed", error=_one_line(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max_s)

    async def _listen_once(self, changed: Callable[[str], None], connected: Callable[[], None]) -> None:
        """One listening connection, from connect to loss."""
        lost = asyncio.Event()
        conn: Connection = await asyncpg.connect(**connect_kwargs(self._config))
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(KEYS_CHANNEL, lambda _c, _p, _ch, payload: changed(str(payload)))
            connected()
            await lost.wait()
        finally:
            conn.terminate()

    # -- the batch write --------------------------------------------------------------

    async def write_batch(
        self,
        accepts: Sequence[Accept],
        rejects: Sequence[Reject],
        *,
        now: datetime | None = None,
        retry: bool = False,
    ) -> BatchResult:
        """Store a batch in one transaction; duplicates are recognised, not stored again.
        The same transaction advances sequence tracking: gaps open, fill and are lost.

        ``accepts`` must hold each (meter, epoch, seq) once; the caller resolves repeats
        within a batch, since only it sees the order of arrival.
        """
        now = now or self._now()
        async with self.connection() as conn, conn.transaction():
            new, ours, duplicates, conflicts = await self._claim_seqs(conn, accepts, retry=retry)
            readings, events = await self._insert_data(conn, new)
            await self._insert_quarantine(conn, [*rejects, *conflicts])
            gap_counts = await track_seqs(
                conn, seen_from(new, [*ours, *duplicates]), now=now, config=self._gaps
            )
        return BatchResult([*new, *ours], len(duplicates), conflicts, readings, events, gap_counts)

    async def _claim_seqs(
        self, conn: PoolConnection, accepts: Sequence[Accept], *, retry: bool
    ) -> tuple[list[Accept], list[Accept], list[Accept], list[Reject]]:
        """(new, stored by an earlier attempt of this very batch, duplicates, conflicts).

        A batch retried (``retry``) after a lost connection may find its own rows: the
        commit went through and only its answer was lost. The same delivery (same arrival
        time, same content) found stored is that, not a duplicate, and counts as accepted.
        """
        if not accepts:
            return [], [], [], []
        # Only the messages not claimed come back: in the usual batch, none.
        rows = await conn.fetch(
            """WITH input AS (
                   SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[],
                                        $5::timestamptz[])
                       AS t(meter_id, epoch, seq, digest, received_at)),
               claimed AS (
                   INSERT INTO message_seqs SELECT * FROM input
                   ON CONFLICT DO NOTHING RETURNING meter_id, epoch, seq)
               SELECT i.meter_id, i.epoch, i.seq, m.digest AS stored, m.received_at AS stored_at
               FROM input i
               LEFT JOIN message_seqs m USING (meter_id, epoch, seq)
               WHERE NOT EXISTS (SELECT FROM claimed c
                                 WHERE (c.meter_id, c.epoch, c.seq) = (i.meter_id, i.epoch, i.seq))""",
            [a.message.meter_id for a in accepts],
            [a.message.epoch for a in accepts],
            [a.message.seq for a in accepts],
            [a.message.digest for a in accepts],
            [a.received_at for a in accepts],
        )
        not_new = {(r["meter_id"], r["epoch"], r["seq"]): r for r in rows}
        unresolved = [k for k, r in not_new.items() if r["stored"] is None]
        stored: dict[tuple[str, int, int], bytes] = {
            k: r["stored"] for k, r in not_new.items() if r["stored"] is not None
        }
        stored_at = {k: r["stored_at"] for k, r in not_new.items() if r["stored"] is not None}
        if unresolved:
            # Claimed by a concurrent transaction that committed after our statement's
            # snapshot was taken (another instance on a shared subscription): look again.
            for r in await conn.fetch(
                """SELECT meter_id, epoch, seq, digest FROM message_seqs
                   WHERE (meter_id, epoch, seq) IN (
                       SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]))""",
                [k[0] for k in unresolved],
                [k[1] for k in unresolved],
                [k[2] for k in unresolved],
            ):
                stored[(r["meter_id"], r["epoch"], r["seq"])] = r["digest"]
        new: list[Accept] = []
        ours: list[Accept] = []
        duplicates: list[Accept] = []
        conflicts: list[Reject] = []
        for accept in accepts:
            m = accept.message
            key = (m.meter_id, m.epoch, m.seq)
            if key not in not_new:
                new.append(accept)
            elif retry and stored.get(key) == m.digest and stored_at.get(key) == accept.received_at:
                ours.append(accept)
            elif stored.get(key) == m.digest:
                duplicates.append(accept)
            else:
                conflicts.append(seq_conflict(accept))
        return new, ours, duplicates, conflicts

    async def _insert_data(
        self, conn: PoolConnection, accepts: Sequence[Accept]
    ) -> tuple[int, collections.Counter[str]]:
        events: collections.Counter[str] = collections.Counter()
        if not accepts:
            return 0, events
        readings_in = [
            (
                n,
                m.meter_id,
                r.time,
                r.import_wh,
                r.export_wh,
                _json_text(r.extra),
                m.epoch,
                m.seq,
                a.received_at,
            )
            for n, (a, m, r) in enumerate((a, a.message, r) for a in accepts for r in a.message.readings)
        ]
        # An event is identified by its place in the signed message (migration 0005): a
        # meter may sign two events with the same time and code, and both are stored.
        event_rows = [
            (m.meter_id, e.time, e.code, e.detail, m.epoch, m.seq, idx, a.received_at)
            for a in accepts
            for m in (a.message,)
            for idx, e in enumerate(m.events)
        ]
        readings = 0
        if readings_in:
            # Binary COPY into a temporary table, then one INSERT from it: the client encodes
            # half of what the same rows cost as unnest() arrays, and a message may carry
            # 1,000 readings. In the batch's order, so the first of two readings for one
            # interval is the one stored, as it would be message by message.
            await conn.execute(_READINGS_IN)
            await conn.copy_records_to_table("ingestd_readings_in", records=readings_in)
            status = await conn.execute(
                """INSERT INTO readings (meter_id, time, import_wh, export_wh, extra, epoch, seq, received_at)
                   SELECT meter_id, time, import_wh, export_wh, extra::jsonb, epoch, seq, received_at
                   FROM ingestd_readings_in ORDER BY n
                   ON CONFLICT DO NOTHING"""
            )
            readings = _row_count(status)
        if event_rows:
            # Only these messages' own rows could conflict, and the ledger admits a message
            # once: a conflict would be the very same event, already stored.
            rows = await conn.fetch(
                """INSERT INTO events (meter_id, time, code, detail, epoch, seq, idx, received_at)
                   SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::jsonb[],
                                        $5::bigint[], $6::bigint[], $7::integer[], $8::timestamptz[])
                   ON CONFLICT DO NOTHING RETURNING code""",
                *map(list, zip(*event_rows, strict=True)),
            )
            events.update(r["code"] for r in rows)
        # COPY: no conflict to resolve here (the ledger decided what is new), and binary
        # COPY costs the client half of what the same rows as unnest() arrays cost.
        await conn.copy_records_to_table(
            "raw_messages",
            columns=_RAW_COLUMNS,
            records=[
                (m.meter_id, m.epoch, m.seq, a.received_at, m.sent, m.replay, m.kid, a.topic, a.payload)
                for a in accepts
                for m in (a.message,)
            ],
        )
        return readings, events

    async def _insert_quarantine(self, conn: PoolConnection, rejects: Sequence[Reject]) -> None:
        if not rejects:
            return
        cap = self._quarantine_max
        await conn.execute(
            """INSERT INTO quarantine
                   (received_at, reason, detail, topic, meter_id, kid, payload, payload_size)
               SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
                                    $6::text[], $7::bytea[], $8::integer[])""",
            [r.received_at for r in rejects],
            [r.reason for r in rejects],
            [_clean_text(r.detail) for r in rejects],
            [_clean_text(r.topic) for r in rejects],
            [r.meter_id for r in rejects],
            [_clean_text(r.kid) if r.kid is not None else None for r in rejects],
            [r.payload[:cap] for r in rejects],
            [len(r.payload) for r in rejects],
        )

    async def prune_quarantine(self, before: datetime, *, chunk: int = 10_000) -> int:
        """Delete quarantine rows received before ``before``; returns how many."""
        return await self._delete_in_chunks(
            """DELETE FROM quarantine WHERE id IN (
                   SELECT id FROM quarantine WHERE received_at < $1
                   ORDER BY received_at LIMIT $2)""",
            before,
            chunk,
        )

    async def prune_closed_gaps(self, before: datetime, *, chunk: int = 10_000) -> int:
        """Delete gaps filled or lost before ``before``; returns how many."""
        return await self._delete_in_chunks(
            """DELETE FROM gaps WHERE id IN (
                   SELECT id FROM gaps WHERE closed_at < $1
                   ORDER BY closed_at LIMIT $2)""",
            before,
            chunk,
        )

    async def _delete_in_chunks(self, delete: str, before: datetime, chunk: int) -> int:
        """Run ``delete`` (``$1``: before, ``$2``: at most this many rows) until it deletes
        less than a chunk: each chunk is its own short transaction, so that a large backlog
        (the first run after a flood) never holds a long lock or a long transaction."""
        total = 0
        while True:
            async with self.connection() as conn:
                deleted = _row_count(await conn.execute(delete, before, chunk))
            total += deleted
            if deleted < chunk:
                return total


def seq_conflict(accept: Accept) -> Reject:
    m = accept.message
    return Reject(
        reason="seq_conflict",
        detail=f"epoch {m.epoch} seq {m.seq} already stored with other content",
        topic=accept.topic,
        payload=accept.payload,
        received_at=accept.received_at,
        meter_id=m.meter_id,
        kid=m.kid,
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def _row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


def _json_text(value: object) -> str | None:
    # As the connection's jsonb codec writes it.
    return None if value is None else orjson.dumps(value).decode()


def _clean_text(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a hostile topic must not make a batch fail.
    return text.replace("\x00", "\\0")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


_SCHEMA_MISSING: Final = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.UndefinedFunctionError,
    asyncpg.UndefinedObjectError,
)
_UNREACHABLE: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def database_error(exc: BaseException) -> IngestdError | None:
    """An error from asyncpg as the operator should read it, in one line: whose fault
    (a UsageError for what the operator can fix, else ServiceUnavailable), or None when
    ``exc`` did not come from the database."""
    if isinstance(exc, _SCHEMA_MISSING):
        return UsageError(f"database schema is not current ({_one_line(exc)}): run 'ingestd migrate'")
    if isinstance(exc, asyncpg.InvalidCatalogNameError | asyncpg.InvalidAuthorizationSpecificationError):
        return UsageError(f"database.url: {_one_line(exc)}")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return UsageError(f"database.url: the role lacks a privilege: {_one_line(exc)}")
    if isinstance(exc, _UNREACHABLE):
        return ServiceUnavailable(f"database unreachable: {_one_line(exc)}")
    if isinstance(exc, asyncpg.PostgresError):
        return ServiceUnavailable(f"database error: {_one_line(exc)}")
    return None
