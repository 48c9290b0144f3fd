"""The ``ingestd`` command as operators run it: a real subprocess against a real database.

Every invocation gets an environment with ``INGESTD_DATABASE_URL`` set to the test's own
database and no other ``INGESTD_*`` variable, so the developer's settings never leak in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ingestd.signature import ALGS, Alg, load_private_key, load_public_key, public_key_pem
from ingestd.store import migrations
from services import PostgresServer, free_port

# asyncpg's classes are generic only in its stubs.
if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

EXIT_FAILURE = 1
EXIT_USAGE = 2


# -- running the command ----------------------------------------------------------------


def cli_env(db_url: str | None, **extra: str) -> dict[str, str]:
    """The parent's environment minus every INGESTD_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    if db_url is not None:
        env["INGESTD_DATABASE_URL"] = db_url
    env.update(extra)
    return env


def ingestd(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


async def aingestd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ingestd`` from an async test, without blocking its event loop."""
    return await asyncio.to_thread(ingestd, *args, env=env)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, describe(proc)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    """Exit ``status``, exactly one line on stderr (no traceback) containing every needle."""
    assert proc.returncode == status, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, describe(proc)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# -- key files --------------------------------------------------------------------------


def spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_key(path: Path, pem: bytes) -> str:
    path.write_bytes(pem)
    return str(path)


def es256_pem() -> bytes:
    return spki(ec.generate_private_key(ec.SECP256R1()))


async def count(db: Conn, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


# -- help -------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    proc = ingestd("--help", env=cli_env(None))
    assert_ok(proc)
    for command in ("migrate", "run", "meter", "keygen", "simulate"):
        assert command in proc.stdout, describe(proc)
    assert "--config" in proc.stdout


def test_meter_help_lists_every_action() -> None:
    proc = ingestd("meter", "--help", env=cli_env(None))
    assert_ok(proc)
    for action in ("add", "list", "revoke-key"):
        assert action in proc.stdout, describe(proc)


def test_console_script_is_installed() -> None:
    script = shutil.which("ingestd", path=Path(sys.executable).parent)
    assert script is not None, "console script 'ingestd' not installed next to the interpreter"
    proc = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, env=cli_env(None), check=False
    )
    assert_ok(proc)
    assert "keygen" in proc.stdout


# -- migrate ----------------------------------------------------------------------------


async def test_migrate_fresh_database_then_again(pg_server: PostgresServer) -> None:
    url = await asyncio.to_thread(pg_server.create_database, f"cli_{uuid.uuid4().hex[:12]}")
    env = cli_env(url)

    first = await aingestd("migrate", env=env)
    assert_ok(first)
    expected = [f"applied {m.version:04d}_{m.name}" for m in migrations()]
    assert first.stdout.splitlines() == expected, describe(first)

    second = await aingestd("migrate", env=env)
    assert_ok(second)
    assert second.stdout.strip() == "schema is current", describe(second)

    conn: Conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables")
        versions = await conn.fetch("SELECT version FROM schema_migrations")
    finally:
        await conn.close()
    assert {"readings", "events", "raw_messages"} <= {r["hypertable_name"] for r in rows}
    assert [r["version"] for r in versions] == [m.version for m in migrations()]


def test_migrate_database_unreachable_exits_1() -> None:
    url = f"postgresql://ingestd@127.0.0.1:{free_port()}/ingestd"
    proc = ingestd("migrate", env=cli_env(url))
    line = assert_one_line_error(proc, EXIT_FAILURE, "database")
    assert "unreachable" in line
    assert proc.stdout == ""


def test_migrate_unknown_database_is_a_usage_error(pg_server: PostgresServer) -> None:
    url = pg_server.dsn(f"missing_{uuid.uuid4().hex[:12]}")
    proc = ingestd("migrate", env=cli_env(url))
    assert_one_line_error(proc, EXIT_USAGE, "database.url")


# -- keygen -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_keygen_writes_private_key_and_prints_public(alg: Alg, tmp_path: Path) -> None:
    out = tmp_path / f"{alg}.pem"
    proc = ingestd("keygen", "--alg", alg, "--out", str(out), env=cli_env(None))
    assert_ok(proc)
    assert out.is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    public = load_public_key(proc.stdout.encode("ascii"), alg)
    # The file holds the private half of exactly the key that was printed.
    private = load_private_key(out.read_bytes())
    assert public_key_pem(private.public_key()) == public_key_pem(public)
    assert proc.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in proc.stdout
    assert proc.stderr == ""


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    out.write_text("precious\n")
    proc = ingestd("keygen", "--alg", "ES256", "--out", str(out), env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, str(out), "--force")
    assert out.read_text() == "precious\n"
    assert proc.stdout == ""

    forced = ingestd("keygen", "--alg", "EdDSA", "--out", str(out), "--force", env=cli_env(None))
    assert_ok(forced)
    private = load_private_key(out.read_bytes())
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert public_key_pem(private.public_key()).decode("ascii") == forced.stdout


def test_keygen_missing_directory(tmp_path: Path) -> None:
    out = tmp_path / "no-such-dir" / "key.pem"
    proc = ingestd("keygen", "--alg", "ES256", "--out", str(out), env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, "no-such-dir")
    assert not out.exists()


# -- meter add / list / revoke-key ------------------------------------------------------


async def test_meter_add_list_revoke(db_url: str, db: Conn, tmp_path: Path) -> None:
    env = cli_env(db_url)
    pem = es256_pem()
    key = write_key(tmp_path / "pub.pem", pem)

    add = await aingestd(
        "meter", "add", "M-1", "--alg", "ES256", "--kid", "k1", "--key", key,
        "--site", "S", "--interval", "900", env=env,
    )  # fmt: skip
    assert_ok(add)
    assert "M-1" in add.stdout
    meter = await db.fetchrow("SELECT meter_id, site, interval_s FROM meters")
    assert meter is not None
    assert dict(meter) == {"meter_id": "M-1", "site": "S", "interval_s": 900}
    row = await db.fetchrow("SELECT kid, meter_id, alg, public_key, revoked_at FROM meter_keys")
    assert row is not None
    assert (row["kid"], row["meter_id"], row["alg"], row["revoked_at"]) == ("k1", "M-1", "ES256", None)
    assert row["public_key"] == pem.decode("ascii")

    table = await aingestd("meter", "list", env=env)
    assert_ok(table)
    assert "M-1" in table.stdout
    assert "k1" in table.stdout
    assert "ES256" in table.stdout

    listing = await aingestd("meter", "list", "--json", env=env)
    assert_ok(listing)
    meters = orjson.loads(listing.stdout)
    assert isinstance(meters, list)
    assert len(meters) == 1
    assert meters[0]["meter_id"] == "M-1"
    assert meters[0]["site"] == "S"
    assert meters[0]["interval_s"] == 900
    assert [(k["kid"], k["alg"], k["revoked_at"]) for k in meters[0]["keys"]] == [("k1", "ES256", None)]

    revoke = await aingestd("meter", "revoke-key", "k1", env=env)
    assert_ok(revoke)
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM meter_keys WHERE kid = 'k1'")

    listing = await aingestd("meter", "list", "--json", env=env)
    assert_ok(listing)
    assert orjson.loads(listing.stdout)[0]["keys"][0]["revoked_at"] is not None
    table = await aingestd("meter", "list", env=env)
    assert_ok(table)
    assert "revoked" in table.stdout

    again = await aingestd("meter", "revoke-key", "k1", env=env)
    assert_one_line_error(again, EXIT_USAGE, "k1")
    unknown = await aingestd("meter", "revoke-key", "nope", env=env)
    assert_one_line_error(unknown, EXIT_USAGE, "nope")


async def test_meter_list_empty(db_url: str) -> None:
    env = cli_env(db_url)
    table = await aingestd("meter", "list", env=env)
    assert_ok(table)
    assert table.stdout.strip() == "no meters registered"
    listing = await aingestd("meter", "list", "--json", env=env)
    assert_ok(listing)
    assert orjson.loads(listing.stdout) == []


async def test_meter_add_second_key_to_same_meter(db_url: str, db: Conn, tmp_path: Path) -> None:
    env = cli_env(db_url)
    key = write_key(tmp_path / "pub.pem", es256_pem())
    ed = write_key(tmp_path / "ed.pem", spki(ed25519.Ed25519PrivateKey.generate()))
    assert_ok(await aingestd("meter", "add", "M-1", "--alg", "ES256", "--kid", "k1", "--key", key, env=env))
    assert_ok(await aingestd("meter", "add", "M-1", "--alg", "EdDSA", "--kid", "k2", "--key", ed, env=env))
    # RFC 9864's name for the same scheme (migration 0008 lets the table hold it).
    assert_ok(await aingestd("meter", "add", "M-1", "--alg", "Ed25519", "--kid", "k3", "--key", ed, env=env))
    assert await count(db, "meters") == 1
    rows = await db.fetch("SELECT kid, alg FROM meter_keys WHERE meter_id = 'M-1' ORDER BY kid")
    assert [(r["kid"], r["alg"]) for r in rows] == [("k1", "ES256"), ("k2", "EdDSA"), ("k3", "Ed25519")]


async def test_meter_add_duplicate_kid(db_url: str, db: Conn, tmp_path: Path) -> None:
    env = cli_env(db_url)
    pem = es256_pem()
    key = write_key(tmp_path / "pub.pem", pem)
    other = write_key(tmp_path / "other.pem", es256_pem())
    assert_ok(
        await aingestd(
            "meter", "add", "M-1", "--alg", "ES256", "--kid", "k1", "--key", key, "--site", "S", env=env
        )
    )

    # Same kid on another meter: refused, and the new meter is not left behind.
    dup = await aingestd("meter", "add", "M-2", "--alg", "ES256", "--kid", "k1", "--key", other, env=env)
    assert_one_line_error(dup, EXIT_USAGE, "k1")
    # Same kid on the same meter, with a new site: refused, and the site unchanged.
    dup = await aingestd(
        "meter", "add", "M-1", "--alg", "ES256", "--kid", "k1", "--key", other, "--site", "T", env=env
    )
    assert_one_line_error(dup, EXIT_USAGE, "k1")

    rows = await db.fetch("SELECT meter_id, site FROM meters")
    assert [(r["meter_id"], r["site"]) for r in rows] == [("M-1", "S")]
    assert await db.fetchval("SELECT public_key FROM meter_keys WHERE kid = 'k1'") == pem.decode("ascii")
    assert await count(db, "meter_keys") == 1


# Each case: (what it writes into tmp_path and returns as the command line, text the
# error line must contain).
BadCase = tuple[Callable[[Path], list[str]], tuple[str, ...]]


def _add(tmp_path: Path, pem: bytes | None, *, alg: str = "ES256", meter: str = "M-1") -> list[str]:
    key = tmp_path / "pub.pem"
    if pem is not None:
        key.write_bytes(pem)
    return ["meter", "add", meter, "--alg", alg, "--kid", "k1", "--key", str(key)]


BAD_INPUT: dict[str, BadCase] = {
    "missing key file": (lambda p: _add(p, None), ("pub.pem", "no such file")),
    "malformed PEM": (lambda p: _add(p, b"this is not a key at all\n"), ("PEM",)),
    "truncated PEM": (lambda p: _add(p, es256_pem()[:60]), ("PEM",)),
    "RSA-1024 for RS256": (
        lambda p: _add(p, spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)), alg="RS256"),
        ("1024", "2048"),
    ),
    "unknown alg": (lambda p: _add(p, es256_pem(), alg="HS256"), ("--alg", "HS256")),
    "P-384 for ES256": (
        lambda p: _add(p, spki(ec.generate_private_key(ec.SECP384R1()))),
        ("ES256", "P-256"),
    ),
    "Ed25519 for ES256": (
        lambda p: _add(p, spki(ed25519.Ed25519PrivateKey.generate())),
        ("ES256", "Ed25519"),
    ),
    "EC key for EdDSA": (lambda p: _add(p, es256_pem(), alg="EdDSA"), ("EdDSA", "Ed25519")),
    "private key instead of public": (
        lambda p: _add(
            p,
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        ("PEM",),
    ),
    "bad METER_ID": (lambda p: _add(p, es256_pem(), meter="bad id!"), ("METER_ID", "bad id!")),
    "missing --alg": (
        lambda p: [a for a in _add(p, es256_pem()) if a not in {"--alg", "ES256"}],
        ("--alg", "required"),
    ),
    "interval 0": (lambda p: [*_add(p, es256_pem()), "--interval", "0"], ("--interval",)),
    "interval not a number": (lambda p: [*_add(p, es256_pem()), "--interval", "15m"], ("--interval", "15m")),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
async def test_meter_add_bad_input(case: str, db_url: str, db: Conn, tmp_path: Path) -> None:
    build, needles = BAD_INPUT[case]
    proc = await aingestd(*build(tmp_path), env=cli_env(db_url))
    assert_one_line_error(proc, EXIT_USAGE, *needles)
    assert proc.stdout == ""
    assert await count(db, "meters") == 0
    assert await count(db, "meter_keys") == 0


async def test_meter_add_bad_kid(db_url: str, db: Conn, tmp_path: Path) -> None:
    """A kid the schema refuses (a space, too long) is bad input too, not a traceback."""
    args = _add(tmp_path, es256_pem())
    args[args.index("k1")] = "bad kid"
    proc = await aingestd(*args, env=cli_env(db_url))
    assert_one_line_error(proc, EXIT_USAGE, "bad kid")
    assert await count(db, "meters") == 0


def test_meter_without_action_is_usage_error() -> None:
    proc = ingestd("meter", env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, "ACTION")


def test_unknown_command_is_usage_error() -> None:
    proc = ingestd("frobnicate", env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, "frobnicate")


# -- configuration ----------------------------------------------------------------------


def test_config_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    proc = ingestd("--config", str(missing), "migrate", env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, str(missing))


def test_config_file_from_env_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    proc = ingestd("migrate", env=cli_env(None, INGESTD_CONFIG=str(missing)))
    assert_one_line_error(proc, EXIT_USAGE, str(missing))


def test_config_unknown_key(tmp_path: Path) -> None:
    conf = tmp_path / "ingestd.toml"
    conf.write_text("[ingest]\nbatch_maxx = 3\n")
    proc = ingestd("migrate", "--config", str(conf), env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, "ingest.batch_maxx")


def test_config_invalid_toml(tmp_path: Path) -> None:
    conf = tmp_path / "broken.toml"
    conf.write_text("[ingest\nbatch_max = \n")
    proc = ingestd("--config", str(conf), "migrate", env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, str(conf))


def test_config_bad_value_names_key(tmp_path: Path) -> None:
    conf = tmp_path / "ingestd.toml"
    conf.write_text('[ingest]\nbatch_max = "many"\n')
    proc = ingestd("--config", str(conf), "migrate", env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, "ingest.batch_max")


def test_env_bad_mqtt_url() -> None:
    proc = ingestd("migrate", env=cli_env(None, INGESTD_MQTT_URL="http://x"))
    assert_one_line_error(proc, EXIT_USAGE, "mqtt.url")


def test_env_unknown_setting() -> None:
    proc = ingestd("migrate", env=cli_env(None, INGESTD_INGEST_BATCH_MAXX="3"))
    assert_one_line_error(proc, EXIT_USAGE, "INGESTD_INGEST_BATCH_MAXX")


def test_env_bad_database_url() -> None:
    proc = ingestd("migrate", env=cli_env("mysql://127.0.0.1/x"))
    assert_one_line_error(proc, EXIT_USAGE, "database.url")


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda f: ["--config", f, "migrate"], id="before"),
        pytest.param(lambda f: ["migrate", "--config", f], id="after"),
        pytest.param(lambda f: ["meter", "--config", f, "list"], id="meter-before-action"),
        pytest.param(lambda f: ["meter", "list", "--config", f], id="meter-after-action"),
    ],
)
def test_config_option_before_or_after_command(
    where: Callable[[str], list[str]], db_url: str, tmp_path: Path
) -> None:
    # The database URL comes only from the file: the command works only if it was read.
    conf = tmp_path / "ingestd.toml"
    conf.write_text(f'[database]\nurl = "{db_url}"\n')
    proc = ingestd(*where(str(conf)), env=cli_env(None))
    assert_ok(proc)
    assert proc.stdout.strip() in {"schema is current", "no meters registered"}, describe(proc)


def test_env_overrides_config_file(db_url: str, tmp_path: Path) -> None:
    conf = tmp_path / "ingestd.toml"
    conf.write_text(f'[database]\nurl = "postgresql://nobody@127.0.0.1:{free_port()}/nothing"\n')
    proc = ingestd("--config", str(conf), "migrate", env=cli_env(db_url))
    assert_ok(proc)
    assert proc.stdout.strip() == "schema is current"


async def test_key_rotation_with_validity_windows(db_url: str, db: Conn, tmp_path: Path) -> None:
    """Two keys of one meter with overlapping windows: the old one expires, the new one starts."""
    old = [*_add(tmp_path, es256_pem()), "--valid-until", "2027-01-01T00:00:00Z"]
    assert_ok(await aingestd(*old, env=cli_env(db_url)))
    (tmp_path / "new").mkdir()
    new = _add(tmp_path / "new", es256_pem())
    new[new.index("k1")] = "k2"
    new += ["--valid-from", "2026-12-15T00:00:00+01:00"]
    assert_ok(await aingestd(*new, env=cli_env(db_url)))
    rows = await db.fetch("SELECT kid, valid_from, valid_until FROM meter_keys ORDER BY kid")
    assert [r["kid"] for r in rows] == ["k1", "k2"]
    assert rows[0]["valid_until"].isoformat() == "2027-01-01T00:00:00+00:00"
    assert rows[1]["valid_from"].isoformat() == "2026-12-14T23:00:00+00:00"
    assert rows[1]["valid_until"] is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--valid-until", "next week"], "RFC 3339"),
        (["--valid-from", "2027-02-01T00:00:00Z", "--valid-until", "2027-01-01T00:00:00Z"], "later than"),
    ],
)
async def test_key_validity_bad_input(
    extra: list[str], needle: str, db_url: str, db: Conn, tmp_path: Path
) -> None:
    proc = await aingestd(*_add(tmp_path, es256_pem()), *extra, env=cli_env(db_url))
    assert_one_line_error(proc, EXIT_USAGE, needle)
    assert await count(db, "meter_keys") == 0
