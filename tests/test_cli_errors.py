"""The ``ingestd`` command when something is wrong: one line on stderr, never a traceback.

Files named on the command line or in settings that are not small regular files, and
database or metrics-port failures, through the real command (a subprocess), with the
real database where one is involved.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli import EXIT_FAILURE, EXIT_USAGE, assert_one_line_error, cli_env, es256_pem, ingestd

from services import PostgresServer, free_port

# Generous for a subprocess on a loaded machine; reading /dev/zero whole takes minutes
# (and all the memory there is), a FIFO without a writer for ever.
QUICK_S = 15.0


def unreachable_db() -> str:
    """A database URL nothing listens on: these commands must fail before connecting."""
    return f"postgresql://ingestd@127.0.0.1:{free_port()}/ingestd"


def sparse_file(path: Path, size: int) -> str:
    with path.open("wb") as fh:
        fh.truncate(size)
    return str(path)


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def _meter_add(key: str) -> list[str]:
    return ["meter", "add", "M-1", "--alg", "ES256", "--kid", "k1", "--key", key]


# (command line, extra environment, text the error line must contain), from tmp_path.
FileCase = tuple[list[str], dict[str, str], tuple[str, ...]]
FILE_CASES: dict[str, Callable[[Path], FileCase]] = {
    "meter add --key /dev/zero": lambda _: (
        _meter_add("/dev/zero"),
        {},
        ("--key", "/dev/zero", "not a regular file"),
    ),
    "meter add --key 200 MiB": lambda p: (
        _meter_add(sparse_file(p / "big.pem", 200 * 1024 * 1024)),
        {},
        ("--key", "big.pem", "64 KiB"),
    ),
    "meter add --key FIFO": lambda p: (
        _meter_add(fifo(p / "key.pem")),
        {},
        ("--key", "key.pem", "FIFO"),
    ),
    "--config /dev/zero": lambda _: (["--config", "/dev/zero", "migrate"], {}, ("config", "/dev/zero")),
    "--config 2 MiB": lambda p: (
        ["--config", sparse_file(p / "big.toml", 2 * 1024 * 1024), "migrate"],
        {},
        ("config", "big.toml", "1 MiB"),
    ),
    "database.password_file FIFO": lambda p: (
        ["migrate"],
        {"INGESTD_DATABASE_PASSWORD_FILE": fifo(p / "db-password")},
        ("database.password_file", "FIFO"),
    ),
    "database.password_file 5 KiB": lambda p: (
        ["migrate"],
        {"INGESTD_DATABASE_PASSWORD_FILE": sparse_file(p / "db-password", 5 * 1024)},
        ("database.password_file", "4 KiB"),
    ),
    "headend.key_file /dev/zero": lambda _: (
        ["run"],
        {"INGESTD_HEADEND_KEY_FILE": "/dev/zero", "INGESTD_HEADEND_KID": "headend-1"},
        ("headend.key_file", "/dev/zero", "not a regular file"),
    ),
    "keygen --out FIFO": lambda p: (
        ["keygen", "--alg", "ES256", "--force", "--out", fifo(p / "out.pem")],
        {},
        ("--out", "out.pem", "not a regular file"),
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_a_file_that_is_not_a_small_regular_file(case: str, tmp_path: Path) -> None:
    argv, extra_env, needles = FILE_CASES[case](tmp_path)
    started = time.monotonic()
    proc = ingestd(*argv, env=cli_env(unreachable_db(), **extra_env))
    assert time.monotonic() - started < QUICK_S
    assert_one_line_error(proc, EXIT_USAGE, *needles)
    assert proc.stdout == ""


def test_a_key_file_at_the_cap_is_read_and_judged_as_a_key(tmp_path: Path) -> None:
    # 64 KiB exactly passes the size check; the PEM parser then says what is wrong.
    key = tmp_path / "padded.pem"
    key.write_bytes(es256_pem() + b"\n" * (64 * 1024 - len(es256_pem())))
    proc = ingestd(*_meter_add(str(key)), env=cli_env(unreachable_db()))
    # The key is fine (trailing newlines are allowed): the failure is the database's.
    assert_one_line_error(proc, EXIT_FAILURE, "database unreachable")


# -- database errors --------------------------------------------------------------------

COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "run": ["run"],
    "meter list": ["meter", "list"],
    "meter revoke-key": ["meter", "revoke-key", "k1"],
    "gaps": ["gaps"],
    "gaps request": ["gaps", "request", "--meter", "M-1"],
    "migrate": ["migrate"],
}


def _as_role(url: str, role: str) -> str:
    return url.replace(f"//{url.split('//', 1)[1].split('@', 1)[0]}@", f"//{role}@", 1)


def _role_without_privileges(pg: PostgresServer) -> str:
    role = f"nopriv_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN")
    return role


def _database_unreachable(_pg: PostgresServer, _url: str) -> str:
    return unreachable_db()


def _no_such_database(pg: PostgresServer, _url: str) -> str:
    return pg.dsn(f"missing_{uuid.uuid4().hex[:12]}")


def _no_connect_privilege(pg: PostgresServer, url: str) -> str:
    dbname = url.rsplit("/", 1)[1]
    pg.psql(f"REVOKE CONNECT ON DATABASE {dbname} FROM PUBLIC")
    return _as_role(url, _role_without_privileges(pg))


def _no_table_privilege(pg: PostgresServer, url: str) -> str:
    return _as_role(url, _role_without_privileges(pg))


def _not_migrated(pg: PostgresServer, _url: str) -> str:
    return pg.create_database(f"empty_{uuid.uuid4().hex[:12]}")


# How to break it (from the server and a migrated database's URL, give the URL to use),
# the exit status, and text the error line must contain.
DatabaseCase = tuple[Callable[[PostgresServer, str], str], int, tuple[str, ...]]
DATABASE_CASES: dict[str, DatabaseCase] = {
    "unreachable": (_database_unreachable, EXIT_FAILURE, ("database unreachable",)),
    "no such database": (_no_such_database, EXIT_USAGE, ("database.url", "does not exist")),
    "no CONNECT privilege": (_no_connect_privilege, EXIT_USAGE, ("database.url", "permission denied")),
    "no table privilege": (_no_table_privilege, EXIT_USAGE, ("database.url", "permission denied")),
    "schema not migrated": (_not_migrated, EXIT_USAGE, ("schema is not current", "ingestd migrate")),
}


@pytest.mark.parametrize(
    ("command", "case"),
    [
        pytest.param(command, case, id=f"{command}-{case}")
        for command in COMMANDS
        for case in DATABASE_CASES
        # migrate on an empty database is what migrate is for.
        if (command, case) != ("migrate", "schema not migrated")
    ],
)
def test_a_database_error_is_one_line(
    command: str, case: str, pg_server: PostgresServer, db_url: str
) -> None:
    make_url, status, needles = DATABASE_CASES[case]
    url = make_url(pg_server, db_url)
    # A port of its own: the default one may be taken on a developer's machine.
    proc = ingestd(*COMMANDS[command], env=cli_env(url, INGESTD_METRICS_ADDR="127.0.0.1:0"))
    assert_one_line_error(proc, status, *needles)
    assert proc.stdout == ""


# -- the metrics port -------------------------------------------------------------------


def test_run_with_the_metrics_port_in_use_is_one_line(db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = ingestd("run", env=cli_env(db_url, INGESTD_METRICS_ADDR=addr))
    assert_one_line_error(proc, EXIT_USAGE, "metrics.addr", addr, "in use")
