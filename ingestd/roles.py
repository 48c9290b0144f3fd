"""Database roles with least privilege, created and granted by ``ingestd migrate``.

- ``ingestd_daemon``: what ``ingestd run`` needs. It inserts readings, events and raw
  messages and never updates or deletes them (one exception: the ``detail`` column of
  events, where the power-loss classification is written); it cannot change meters or
  keys, nor read the admin log.
- ``ingestd_operator``: reads everything; ``gaps request`` (``gaps.next_request_at``).
- ``ingestd_billing``: an operator who may also close billing periods.
- ``ingestd_admin``: an operator who may also change meters and keys (each change is
  logged in ``admin_log`` by a trigger, migration 0010).

The roles are NOLOGIN groups: a login role is made a member of one (or given LOGIN and a
password), docs/security.md. Roles belong to the whole cluster, privileges to one
database. The grants are made again, exactly, at the end of every ``migrate``, so a
table a later migration adds is covered; a table the daemon must write to is added to
``DAEMON_WRITES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import asyncpg

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

DAEMON: Final = "ingestd_daemon"
OPERATOR: Final = "ingestd_operator"
BILLING: Final = "ingestd_billing"
ADMIN: Final = "ingestd_admin"
ROLES: Final = (DAEMON, OPERATOR, BILLING, ADMIN)
# Who is also an operator.
_MEMBER_OF: Final = {BILLING: OPERATOR, ADMIN: OPERATOR}

# Every write the daemon makes (ingestd/store.py, gaps.py, health.py, retention.py and
# the functions of the migrations it calls), and nothing more. A privilege on a column
# is written "UPDATE (column)".
DAEMON_WRITES: Final[Mapping[str, tuple[str, ...]]] = {
    "readings": ("INSERT",),
    "raw_messages": ("INSERT",),
    "message_seqs": ("INSERT",),
    # The classification of power losses (health.py) adds to the detail of stored events.
    "events": ("INSERT", "UPDATE (detail)"),
    "meter_epochs": ("INSERT", "UPDATE"),
    "gaps": ("INSERT", "UPDATE", "DELETE"),
    # Deleted after ingest.quarantine_retention_days.
    "quarantine": ("INSERT", "DELETE"),
    "health_settings": ("INSERT", "UPDATE"),
    # The health refresh compares closed statements with the data (ingestd.billing) and
    # records what changed as adjustments: the re-bill list.
    "billing_adjustments": ("INSERT",),
}
# Tables the daemon does not read either.
DAEMON_UNREADABLE: Final = ("admin_log",)
OPERATOR_WRITES: Final[Mapping[str, tuple[str, ...]]] = {
    "gaps": ("UPDATE (next_request_at)",),
    # `billing report` of a closed period records the adjustments it finds.
    "billing_adjustments": ("INSERT",),
}
ADMIN_WRITES: Final[Mapping[str, tuple[str, ...]]] = {
    "meters": ("INSERT", "UPDATE", "DELETE"),
    "meter_keys": ("INSERT", "UPDATE", "DELETE"),
    # Only through the logging trigger: admin_log's own trigger refuses any other insert.
    "admin_log": ("INSERT",),
}
# Billing statements (migration 0009, issue 14) when this database has them.
BILLING_WRITES: Final[Mapping[str, tuple[str, ...]]] = {
    # Append-only: migration 0009's trigger refuses any UPDATE or DELETE of a statement.
    "billing_statements": ("INSERT",),
    # `billing adjustments --mark-billed`.
    "billing_adjustments": ("INSERT", "UPDATE (billed_at)"),
    "admin_log": ("INSERT",),
}
# Tables whose every change is logged in admin_log, with their key column; meters and
# meter_keys get their triggers in migration 0010, the others here once they exist.
LOGGED_LATER: Final = {"billing_statements": "meter_id"}


def create_roles_sql(missing: tuple[str, ...]) -> str:
    """The SQL that creates ``missing`` roles (for an operator to run as a superuser)."""
    statements = [f"CREATE ROLE {role} NOLOGIN" for role in missing]
    statements.extend(f"GRANT {_MEMBER_OF[role]} TO {role}" for role in missing if role in _MEMBER_OF)
    return "; ".join(statements) + ";"


async def missing_roles(conn: Conn) -> tuple[str, ...]:
    existing = {
        r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", ROLES)
    }
    return tuple(r for r in ROLES if r not in existing)


async def apply(conn: Conn) -> str | None:
    """Create the roles (when allowed) and grant exactly their privileges in this database.
    Returns one line for the operator when the roles could not be created, else None."""
    missing = await missing_roles(conn)
    note = None
    if missing:
        may_create = await conn.fetchval(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
        if may_create:
            try:
                async with conn.transaction():
                    await conn.execute(create_roles_sql(missing))
            except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                # Roles belong to the cluster: another database's migrate made them meanwhile.
                pass
            missing = await missing_roles(conn)
        else:
            note = (
                f"roles {', '.join(missing)} do not exist and this role may not create them; "
                f"as a superuser run: {create_roles_sql(missing)} then 'ingestd migrate' again"
            )
    present = tuple(r for r in ROLES if r not in missing)
    async with conn.transaction():
        await _log_later_tables(conn)
        await _grant(conn, present)
    return note


async def _log_later_tables(conn: Conn) -> None:
    for table, key in LOGGED_LATER.items():
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            await conn.execute(f"DROP TRIGGER IF EXISTS {table}_admin_log ON {table}")
            await conn.execute(
                f"CREATE TRIGGER {table}_admin_log AFTER INSERT OR UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION ingestd_admin_log_change('{key}')"
            )


async def _grant(conn: Conn, roles: tuple[str, ...]) -> None:
    if not roles:
        return
    tables: list[str] = [
        r["tablename"]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
        )
    ]
    everyone = ", ".join(roles)
    schema = await conn.fetchval("SELECT quote_ident(current_schema())")
    for table in tables:
        # Exactly what is listed: whatever an earlier version granted goes (column
        # privileges with it).
        await conn.execute(f'REVOKE ALL ON "{table}" FROM {everyone}')
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {everyone}")
    grants: list[tuple[str, str, str]] = []
    if OPERATOR in roles:
        grants.extend(("SELECT", table, OPERATOR) for table in tables)
        grants.extend(_writes(OPERATOR_WRITES, OPERATOR))
    if DAEMON in roles:
        grants.extend(("SELECT", table, DAEMON) for table in tables if table not in DAEMON_UNREADABLE)
        grants.extend(_writes(DAEMON_WRITES, DAEMON))
    if ADMIN in roles:
        grants.extend(_writes(ADMIN_WRITES, ADMIN))
    if BILLING in roles:
        grants.extend(_writes(BILLING_WRITES, BILLING))
    for privilege, table, role in grants:
        if table in tables:
            await conn.execute(f'GRANT {privilege} ON "{table}" TO {role}')


def _writes(writes: Mapping[str, tuple[str, ...]], role: str) -> list[tuple[str, str, str]]:
    return [(privilege, table, role) for table, privileges in writes.items() for privilege in privileges]
