"""Database errors that are the infrastructure's fault, not the data's: a lock or statement
timeout, a full disk, a full lock table, a read-only server, a batch too slow for the
command timeout. Each must hold the batch (nothing quarantined, nothing acknowledged) and
end, once the fault clears, with every honest message stored exactly once; only data the
server refuses for the message's own sake is quarantined, and only that message.

Faults the server cannot be made to have on demand here (a full disk, a full lock table)
are raised, with their real SQLSTATE and message, by a trigger the test switches on and
off: the daemon sees exactly what PostgreSQL would send it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest
from test_faults import (
    AFTER,
    BEFORE,
    LOCK_HELD_S,
    WITHIN_S,
    accepted,
    assert_stored_exactly_once,
    committed_at_least,
    fault_config,
    publishing,
    watching,
)

from conftest import running_daemon
from helpers import finished, metric, publish, wait_until
from ingestd.config import Config
from ingestd.faults import Fault, classify, describe, timed_out
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Store
from services import MosquittoServer

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

# While switched on for a table (a row in fault_switch), its inserts fail as the row says;
# with a meter named, only statements that insert a row of that meter fail.
FAULT_TRIGGERS = """
CREATE TABLE fault_switch (
    tbl text PRIMARY KEY, sqlstate text NOT NULL, message text NOT NULL, meter text,
    sleep_per_row_s float8);
CREATE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    f fault_switch;
BEGIN
    SELECT * INTO f FROM fault_switch WHERE tbl = TG_TABLE_NAME;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF f.sleep_per_row_s IS NOT NULL THEN
        PERFORM pg_sleep(f.sleep_per_row_s * (SELECT count(*) FROM new_rows));
    ELSIF f.meter IS NULL OR EXISTS (SELECT FROM new_rows WHERE meter_id = f.meter) THEN
        RAISE EXCEPTION '%', f.message USING ERRCODE = f.sqlstate;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER inject_fault AFTER INSERT ON message_seqs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inject_fault();
CREATE TRIGGER inject_fault AFTER INSERT ON quarantine REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inject_fault();
"""
# How long a fault is left on while the fleet publishes.
FAULT_HELD_S = 3.0


# -- the classification, alone ----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (
            asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
            Fault.TRANSIENT,
        ),
        (
            asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
            Fault.TRANSIENT,
        ),
        (asyncpg.exceptions.DiskFullError("could not extend file"), Fault.TRANSIENT),
        (asyncpg.exceptions.OutOfMemoryError("out of shared memory"), Fault.TRANSIENT),
        (asyncpg.exceptions.SerializationError("could not serialize access"), Fault.TRANSIENT),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), Fault.TRANSIENT),
        (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction"), Fault.TRANSIENT),
        (
            asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table readings"),
            Fault.TRANSIENT,
        ),
        (asyncpg.exceptions.UndefinedTableError('relation "readings" does not exist'), Fault.TRANSIENT),
        (asyncpg.exceptions.PostgresIOError("could not read block"), Fault.TRANSIENT),
        (asyncpg.exceptions.InternalServerError("unexpected"), Fault.TRANSIENT),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), Fault.LOST),
        (asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients"), Fault.LOST),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), Fault.LOST),
        (TimeoutError(), Fault.LOST),
        (ConnectionResetError(), Fault.LOST),
        (asyncpg.exceptions.NumericValueOutOfRangeError("bigint out of range"), Fault.DATA),
        (asyncpg.exceptions.InvalidParameterValueError("bad value"), Fault.DATA),
        (asyncpg.exceptions.CheckViolationError("violates check constraint"), Fault.DATA),
        (asyncpg.exceptions.NotNullViolationError("null value"), Fault.DATA),
        (asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds maximum"), Fault.DATA),
        (ValueError("not the database's"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_the_data_s_own_errors_may_quarantine(error: BaseException, fault: Fault | None) -> None:
    assert classify(error) is fault


def test_timeouts_are_told_apart() -> None:
    assert timed_out(TimeoutError())
    assert timed_out(asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"))
    assert not timed_out(asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"))
    assert not timed_out(asyncpg.exceptions.DiskFullError("could not extend file"))


def test_describe_names_the_sqlstate_on_one_line() -> None:
    error = asyncpg.exceptions.DiskFullError('could not extend file "base/1/2": No space left\nHINT: x')
    assert describe(error) == '53100: could not extend file "base/1/2": No space left'
    assert describe(TimeoutError()) == "TimeoutError"


# -- on the real daemon, broker and database --------------------------------------------


async def _database_name(db: Conn) -> str:
    name = await db.fetchval("SELECT current_database()")
    assert isinstance(name, str)
    return name


async def test_lock_and_statement_timeouts_hold_every_honest_message(
    config: Config, db: Conn, key_factory: KeyFactory
) -> None:
    """The red team's repro: an operator's session takes what a non-concurrent CREATE INDEX
    takes while the daemon's role has a lock and a statement timeout. Before, 12 of 160
    honest messages were quarantined as 'database refused it' and acknowledged."""
    name = await _database_name(db)
    # For new sessions (the daemon's), not this one: it holds the lock.
    await db.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '500ms'")
    await db.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '2s'")
    cfg = fault_config(config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            gauges.reset()
            errors = metric(registry, "ingestd_db_write_errors_total")
            async with db.transaction():
                await db.execute("LOCK TABLE readings IN SHARE MODE")
                await wait_until(
                    lambda: metric(registry, "ingestd_db_write_errors_total") >= errors + 2,
                    within_s=WITHIN_S,
                    what="writes to time out on the lock",
                )
                acked = finished(registry)
                await asyncio.sleep(LOCK_HELD_S)  # the operator's statement runs
                assert finished(registry) == acked, "acknowledged while nothing could be stored"
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        assert gauges.db_went_down, "ingestd_db_up stayed 1 while no write succeeded"
        await assert_stored_exactly_once(db, daemon, fleet)


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("53100", 'could not extend file "base/16384/16385": No space left on device'),
        ("53200", "out of shared memory"),
        ("25006", "cannot execute INSERT in a read-only transaction"),
    ],
    ids=["disk-full", "lock-table-full", "read-only"],
)
async def test_a_server_that_cannot_store_anything_is_waited_for(
    config: Config, broker: MosquittoServer, db: Conn, key_factory: KeyFactory, sqlstate: str, message: str
) -> None:
    """Every insert fails, the quarantine's too, while a message that must be quarantined
    arrives: before, the daemon quarantined honest messages it had in fact failed to store,
    then crashed on the quarantine insert. Now it holds, says why, and resumes."""
    await db.execute(FAULT_TRIGGERS)
    cfg = fault_config(config)
    async with running_daemon(cfg) as daemon, watching(daemon) as gauges:
        registry = daemon.metrics.registry
        async with publishing(cfg, key_factory) as fleet:
            await committed_at_least(daemon, BEFORE)
            gauges.reset()
            await db.execute(
                "INSERT INTO fault_switch (tbl, sqlstate, message) VALUES "
                "('message_seqs', $1, $2), ('quarantine', $1, $2)",
                sqlstate,
                message,
            )
            await publish(
                broker.host, broker.port, [(f"{cfg.mqtt.topic_prefix}/FLT-000001/up", b"{not json")]
            )
            await wait_until(lambda: gauges.db_went_down, within_s=WITHIN_S, what="ingestd_db_up 0")
            await wait_until(lambda: gauges.paused, within_s=WITHIN_S, what="intake to pause")
            acked = finished(registry)
            await asyncio.sleep(FAULT_HELD_S)  # the fault lasts
            assert finished(registry) == acked, "acknowledged while nothing could be stored"
            assert metric(registry, "ingestd_db_up") == 0
            await db.execute("DELETE FROM fault_switch")
            await wait_until(lambda: metric(registry, "ingestd_db_up") == 1, within_s=WITHIN_S, what="db up")
            await committed_at_least(daemon, accepted(daemon) + AFTER)
        assert metric(registry, "ingestd_messages_rejected_total", reason="bad_json") == 1
        quarantined = await db.fetch("SELECT reason, meter_id FROM quarantine")
        assert [(r["reason"], r["meter_id"]) for r in quarantined] == [("bad_json", "FLT-000001")]
        await db.execute("DELETE FROM quarantine")
        await assert_stored_exactly_once(db, daemon, fleet)


def _backlog(meters: list[VirtualMeter], rounds: int, prefix: str) -> list[tuple[str, bytes]]:
    rng = random.Random(3)
    start = datetime.now(UTC) - timedelta(hours=1)
    return [
        (f"{prefix}/{m.meter_id}/up", m.sign(m.next_body(start + timedelta(minutes=i), rng)))
        for i in range(rounds)
        for m in meters
    ]


async def test_a_batch_that_outlasts_the_command_timeout_is_split(
    config: Config, broker: MosquittoServer, db: Conn, key_factory: KeyFactory
) -> None:
    """30 messages in one batch take 3 s to write, the command timeout is 1 s: before, the
    batch was retried unchanged for ever and nothing was stored; now it is split until the
    parts fit, and everything is stored once, nothing quarantined."""
    await db.execute(FAULT_TRIGGERS)
    meters = build_fleet(10, prefix="SLOW-", interval_s=60, algs=("ES256",), keys=key_factory)
    async with Store(config.database) as store:
        await register_fleet(store, meters)
    messages = _backlog(meters, 3, config.mqtt.topic_prefix)
    cfg = dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, command_timeout_s=1.0),
        ingest=dataclasses.replace(config.ingest, batch_wait_ms=500),
    )
    await db.execute(
        "INSERT INTO fault_switch (tbl, sqlstate, message, sleep_per_row_s) "
        "VALUES ('message_seqs', '00000', 'slow', 0.1)"
    )
    async with running_daemon(cfg) as daemon:
        registry = daemon.metrics.registry
        await publish(broker.host, broker.port, messages)
        await wait_until(lambda: accepted(daemon) == len(messages), within_s=WITHIN_S, what="all stored")
        assert metric(registry, "ingestd_db_write_errors_total") >= 2
        assert metric(registry, "ingestd_batch_size_count") >= 1
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == len(messages)
    assert await db.fetchval("SELECT count(*) FROM readings") == len(messages)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0


async def test_data_the_server_refuses_quarantines_that_message_alone(
    config: Config, broker: MosquittoServer, db: Conn, key_factory: KeyFactory
) -> None:
    """A constraint of the operator's refuses one meter's rows: its messages are found by
    splitting the batch and quarantined, every other message in the same batches stored."""
    await db.execute(FAULT_TRIGGERS)
    meters = build_fleet(10, prefix="REF-", interval_s=60, algs=("ES256",), keys=key_factory)
    async with Store(config.database) as store:
        await register_fleet(store, meters)
    refused = meters[3].meter_id
    messages = _backlog(meters, 3, config.mqtt.topic_prefix)
    await db.execute(
        "INSERT INTO fault_switch (tbl, sqlstate, message, meter) VALUES ('message_seqs', '23514', $1, $2)",
        'new row violates check constraint "site_quota"',
        refused,
    )
    cfg = dataclasses.replace(config, ingest=dataclasses.replace(config.ingest, batch_wait_ms=500))
    async with running_daemon(cfg) as daemon:
        registry = daemon.metrics.registry
        await publish(broker.host, broker.port, messages)
        await wait_until(
            lambda: finished(registry) == len(messages), within_s=WITHIN_S, what="every message decided"
        )
        assert accepted(daemon) == len(messages) - 3
    rows = await db.fetch("SELECT reason, meter_id, detail FROM quarantine ORDER BY id")
    assert [(r["reason"], r["meter_id"]) for r in rows] == [("bad_body", refused)] * 3
    assert all(r["detail"].startswith("database refused it: 23514: ") for r in rows)
    stored = {r[0] for r in await db.fetch("SELECT DISTINCT meter_id FROM message_seqs")}
    assert stored == {m.meter_id for m in meters} - {refused}
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == len(messages) - 3
