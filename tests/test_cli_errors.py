"""The ``ingestd`` command when something is wrong: one line on stderr, never a traceback.

Files named on the command line or in settings that are not small regular files, and
database or metrics-port failures, through the real command (a subprocess), with the
real database where one is involved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_cli import EXIT_FAILURE, EXIT_USAGE, assert_one_line_error, cli_env, es256_pem, ingestd

from services import free_port

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
