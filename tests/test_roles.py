"""Separation of privileges and the admin log, on the real database: each role is refused
what it must not do, ``ingestd run`` works as ``ingestd_daemon`` alone, and every change
to meters and keys is logged with the role that made it."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from test_cli import cli_env, ingestd

from conftest import running_daemon
from helpers import publish, register, wait_settled
from ingestd import roles
from ingestd.config import Config, DatabaseConfig, FlagsConfig
from ingestd.health import classify_power_losses
from ingestd.signature import generate_private_key, public_key_pem
from ingestd.store import Store
from services import PostgresServer

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]


def as_role(url: str, role: str) -> str:
    """The same database, logged in as ``role`` (the test server trusts local logins)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def login_roles(db: Conn) -> None:
    """The four roles as migrate made them, allowed to log in here (roles are NOLOGIN
    groups; an installation gives LOGIN and a password, or makes users members)."""
    for role in roles.ROLES:
        await db.execute(f"ALTER ROLE {role} LOGIN")


async def try_sql(url: str, role: str, sql: str) -> str:
    """'ok', or the SQLSTATE class name of the refusal."""
    conn: Conn = await asyncpg.connect(as_role(url, role))
    # Rolled back: each statement is tried on the same data.
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(sql)
    except asyncpg.InsufficientPrivilegeError:
        return "refused"
    else:
        return "ok"
    finally:
        await transaction.rollback()
        await conn.close()


READING = (
    "INSERT INTO readings (meter_id, time, import_wh, epoch, seq, received_at) "
    "VALUES ('M-1', now(), 1, 0, 1, now())"
)
KEY = (
    "INSERT INTO meter_keys (kid, meter_id, alg, public_key) "
    "VALUES ('evil', 'M-1', 'ES256', 'not checked by the database')"
)
# Each: the role, the statement it tries, and what it gets.
CASES = [
    ("ingestd_daemon", READING, "ok"),
    ("ingestd_daemon", "UPDATE readings SET import_wh = 0", "refused"),
    ("ingestd_daemon", "DELETE FROM readings", "refused"),
    ("ingestd_daemon", "TRUNCATE readings", "refused"),
    ("ingestd_daemon", "UPDATE raw_messages SET payload = ''", "refused"),
    ("ingestd_daemon", "DELETE FROM raw_messages", "refused"),
    ("ingestd_daemon", "UPDATE message_seqs SET digest = ''", "refused"),
    ("ingestd_daemon", "DELETE FROM message_seqs", "refused"),
    ("ingestd_daemon", "UPDATE events SET code = '003'", "refused"),
    ("ingestd_daemon", "UPDATE events SET detail = '{}'", "ok"),
    ("ingestd_daemon", "DELETE FROM events", "refused"),
    ("ingestd_daemon", KEY, "refused"),
    ("ingestd_daemon", "UPDATE meter_keys SET revoked_at = NULL", "refused"),
    ("ingestd_daemon", "DELETE FROM meters", "refused"),
    ("ingestd_daemon", "SELECT * FROM admin_log", "refused"),
    ("ingestd_daemon", "DELETE FROM quarantine", "ok"),
    ("ingestd_operator", "SELECT * FROM readings, admin_log, meter_keys", "ok"),
    ("ingestd_operator", "UPDATE gaps SET next_request_at = now()", "ok"),
    ("ingestd_operator", "UPDATE gaps SET status = 'lost'", "refused"),
    ("ingestd_operator", READING, "refused"),
    ("ingestd_operator", KEY, "refused"),
    ("ingestd_operator", "DELETE FROM quarantine", "refused"),
    ("ingestd_billing", "SELECT * FROM readings", "ok"),
    ("ingestd_billing", KEY, "refused"),
    ("ingestd_billing", "UPDATE readings SET import_wh = 0", "refused"),
    ("ingestd_admin", KEY, "ok"),
    ("ingestd_admin", "UPDATE meters SET site = 'X'", "ok"),
    ("ingestd_admin", "UPDATE readings SET import_wh = 0", "refused"),
    ("ingestd_admin", "DELETE FROM raw_messages", "refused"),
    ("ingestd_admin", READING, "refused"),
    # Written by the logging trigger only, and never changed.
    ("ingestd_admin", "INSERT INTO admin_log (action, table_name) VALUES ('DELETE', 'meters')", "refused"),
    ("ingestd_admin", "DELETE FROM admin_log", "refused"),
]


@pytest.mark.usefixtures("login_roles")
@pytest.mark.parametrize(("role", "sql", "expected"), CASES)
async def test_each_role_may_do_only_its_part(
    db_url: str, db: Conn, role: str, sql: str, expected: str
) -> None:
    await db.execute("INSERT INTO meters (meter_id) VALUES ('M-1')")
    assert await try_sql(db_url, role, sql) == expected


async def test_admin_log_is_append_only_even_for_the_owner(db: Conn) -> None:
    await db.execute("INSERT INTO meters (meter_id) VALUES ('M-1')")
    for sql in (
        "UPDATE admin_log SET db_role = 'nobody'",
        "DELETE FROM admin_log",
        "TRUNCATE admin_log",
        "INSERT INTO admin_log (action, table_name) VALUES ('DELETE', 'meters')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute(sql)
    assert await db.fetchval("SELECT count(*) FROM admin_log") == 1


@pytest.mark.usefixtures("login_roles")
async def test_a_key_swap_in_sql_is_in_the_meter_history_with_its_role(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    env = cli_env(as_role(db_url, "ingestd_admin"))
    pem = public_key_pem(generate_private_key("ES256").public_key())
    key = tmp_path / "meter.pem"
    key.write_bytes(pem)
    proc = ingestd("meter", "add", "M-7", "--alg", "ES256", "--kid", "M-7-k1", "--key", str(key), env=env)
    assert proc.returncode == 0, proc.stderr
    # An insider at a psql prompt, as the admin role, puts an attacker's key in place.
    attacker = public_key_pem(generate_private_key("ES256").public_key()).decode()
    await db.execute("SET ROLE ingestd_admin")
    await db.execute("SET application_name = 'psql'")
    await db.execute("UPDATE meter_keys SET public_key = $1 WHERE kid = 'M-7-k1'", attacker)
    await db.execute("RESET ROLE")
    await db.execute("DELETE FROM meters WHERE meter_id = 'M-7'")

    proc = ingestd("meter", "history", "M-7", env=cli_env(db_url))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "ROLE",
        "SESSION",
        "USER",
        "APPLICATION",
        "ACTION",
        "TABLE",
        "KEY",
        "CHANGE",
    ]
    rows = [line.split()[1:7] for line in lines[1:]]
    superuser = urlsplit(db_url).username
    assert rows == [
        ["ingestd_admin", "ingestd_admin", "ingestd", "INSERT", "meters", "M-7"],
        ["ingestd_admin", "ingestd_admin", "ingestd", "INSERT", "meter_keys", "M-7-k1"],
        ["ingestd_admin", superuser, "psql", "UPDATE", "meter_keys", "M-7-k1"],
        # The meter, then its key by the cascade.
        [superuser, superuser, "psql", "DELETE", "meters", "M-7"],
        [superuser, superuser, "psql", "DELETE", "meter_keys", "M-7-k1"],
    ]
    digest = hashlib.sha256(attacker.encode()).hexdigest()[:16]
    assert f"public_key: sha256:{hashlib.sha256(pem).hexdigest()[:16]} -> sha256:{digest}" in lines[3]

    proc = ingestd("meter", "history", "M-7", "--json", env=cli_env(db_url))
    entries = orjson.loads(proc.stdout)
    assert entries[2]["old_values"]["public_key"] == pem.decode()
    assert entries[2]["new_values"]["public_key"] == attacker

    proc = ingestd("meter", "history", "NOBODY", env=cli_env(db_url))
    assert proc.returncode == 2
    assert "not registered, and no change to it is logged" in proc.stderr


@pytest.mark.usefixtures("login_roles")
async def test_ingestd_run_works_as_ingestd_daemon_alone(config: Config, db: Conn, store: Store) -> None:
    meter = await register(store, "D-1", "ES256", generate_private_key("ES256"))
    logged = await db.fetchval("SELECT count(*) FROM admin_log")
    daemon_config = dataclasses.replace(
        config, database=DatabaseConfig(url=as_role(config.database.url, "ingestd_daemon"))
    )
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(hours=2)
    messages = [
        meter.message(
            seq,
            readings=[(start + seq * timedelta(minutes=15), 100 * seq)],
            events=[{"t": (start - timedelta(hours=1)).isoformat(), "code": "001"}] if seq == 1 else [],
            sent=now,
        )
        for seq in (1, 2, 5)  # 3 and 4 missing: a gap opens
    ]
    async with running_daemon(daemon_config) as daemon:
        await publish(config.mqtt.host, config.mqtt.port, [*messages, ("meters/D-1/up", b"garbage")])
        await wait_settled(daemon.metrics.registry, 4)
    assert await db.fetchval("SELECT count(*) FROM readings") == 3
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 1
    assert await db.fetchval("SELECT count(*) FROM gaps WHERE from_seq = 3 AND to_seq = 4") == 1
    # The daemon's periodic work, on its own connection as the same role.
    async with Store(daemon_config.database) as as_daemon:
        async with as_daemon.connection() as conn:
            classified = await classify_power_losses(conn, now + timedelta(hours=1), FlagsConfig())
        assert len(classified) == 1
        assert await as_daemon.prune_quarantine(now + timedelta(days=1)) == 1
        assert await as_daemon.prune_closed_gaps(now + timedelta(days=1)) == 0
    # The daemon's writes never touch the logged tables.
    assert await db.fetchval("SELECT count(*) FROM admin_log") == logged


async def test_migrate_without_createrole_says_what_to_run(
    pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database owner who may not create roles: the schema is made, the roles that exist
    get their grants, and one line says which SQL a superuser must run."""
    owner = f"t_owner_{uuid.uuid4().hex[:8]}"
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE ROLE {owner} LOGIN")
    pg_server.psql(f"CREATE DATABASE {name} OWNER {owner}")
    pg_server.psql("CREATE EXTENSION IF NOT EXISTS timescaledb", dbname=name)
    url = as_role(pg_server.dsn(name), owner)
    # A role of a later version, not there yet: this owner may not create it.
    monkeypatch.setattr(roles, "ROLES", (*roles.ROLES, "ingestd_auditor"))
    notes: list[str] = []
    async with Store(DatabaseConfig(url=url)) as store:
        applied = await store.migrate(note=notes.append)
        assert applied
    assert notes == [
        (
            "roles ingestd_auditor do not exist and this role may not create them; as a superuser run: "
            "CREATE ROLE ingestd_auditor NOLOGIN; then 'ingestd migrate' again"
        )
    ]
    # The roles that exist got their privileges in this database all the same.
    privileges = pg_server.psql(
        "SELECT has_table_privilege('ingestd_daemon', 'readings', 'INSERT'), "
        "has_table_privilege('ingestd_daemon', 'readings', 'UPDATE')",
        dbname=name,
    )
    assert privileges.strip() == "t|f"


def test_create_roles_sql() -> None:
    assert roles.create_roles_sql(roles.ROLES) == (
        "CREATE ROLE ingestd_daemon NOLOGIN; CREATE ROLE ingestd_operator NOLOGIN; "
        "CREATE ROLE ingestd_billing NOLOGIN; CREATE ROLE ingestd_admin NOLOGIN; "
        "GRANT ingestd_operator TO ingestd_billing; GRANT ingestd_operator TO ingestd_admin;"
    )


@pytest.mark.usefixtures("login_roles")
async def test_an_operator_audits_and_reads_the_history(db_url: str, db: Conn, tmp_path: Path) -> None:
    await db.execute("INSERT INTO meters (meter_id) VALUES ('M-1')")
    env = cli_env(as_role(db_url, "ingestd_operator"))
    for args in (
        ("audit", "verify"),
        ("meter", "history", "M-1"),
        ("billing", "evidence", "--meter", "M-1", "--period", "2026-11", "--out", str(tmp_path / "bundle")),
    ):
        proc = ingestd(*args, env=env)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
    # But not what an admin does.
    proc = ingestd("meter", "revoke-key", "M-1-k1", env=env)
    assert proc.returncode == 2
    assert "the role lacks a privilege" in proc.stderr
