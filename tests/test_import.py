"""``ingestd meter import`` and ``ingestd meter export``: the real command on a real database."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from test_cli import (
    EXIT_USAGE,
    aingestd,
    assert_ok,
    assert_one_line_error,
    cli_env,
    count,
    describe,
    ingestd,
    spki,
)

from conftest import running_daemon
from helpers import jws, publish, wait_settled
from ingestd import provision
from ingestd.config import Config
from ingestd.envelope import format_time
from ingestd.errors import ConfigError, UsageError
from ingestd.files import bounded_lines, open_regular
from ingestd.signature import Signer

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

HEADER = (
    "meter_id",
    "site",
    "interval_s",
    "max_power_w",
    "alg",
    "kid",
    "public_key",
    "valid_from",
    "valid_until",
)


FAR = "2029-01-01T00:00:00Z"


def key(kid: str, alg: str = "ES256", pem: str | None = None, **more: object) -> dict[str, object]:
    return {"alg": alg, "kid": kid, "public_key": pem or es256(), **more}


def es256() -> str:
    return spki(ec.generate_private_key(ec.SECP256R1())).decode()


def ed() -> str:
    return spki(ed25519.Ed25519PrivateKey.generate()).decode()


def write_csv(path: Path, rows: list[tuple[object, ...]], header: tuple[str, ...] = HEADER) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path: Path, records: list[object]) -> str:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return str(path)


def fleet_csv(path: Path, meters: int, *, pems: list[str] | None = None) -> str:
    """``meters`` ES256 meters (keys reused: a key may serve several kids), one key each."""
    pems = pems or [es256() for _ in range(20)]
    return write_csv(
        path,
        [
            (f"F-{i:06d}", "B-1", 900, "", "ES256", f"F-{i:06d}-k1", pems[i % len(pems)], "", "")
            for i in range(meters)
        ],
    )


def error_lines(stderr: str) -> dict[int, str]:
    """Bad rows as reported, by line number; the last line (the verdict) left out."""
    found = {}
    for line in stderr.strip().splitlines()[:-1]:
        where, _, problem = line.partition(": ")
        found[int(where.rsplit(" line ", 1)[1])] = problem
    return found


async def registry(db: Conn) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        """SELECT m.meter_id, m.site, m.interval_s, m.max_power_w, k.kid, k.alg, k.public_key,
                  k.valid_from, k.valid_until, k.revoked_at
           FROM meters m LEFT JOIN meter_keys k USING (meter_id) ORDER BY m.meter_id, k.kid"""
    )
    return [tuple(r) for r in rows]


# -- good files -----------------------------------------------------------------------------


async def test_import_csv_registers_meters_and_keys(db_url: str, db: Conn, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    ed_pem = ed()
    (tmp_path / "keys" / "m2.pem").write_text(ed_pem)
    a, b = es256(), es256()
    # M-1 has two keys (rotation), its meter fields left empty on the second row; M-2's key
    # is in a file named relative to the import file.
    rows: list[tuple[object, ...]] = [
        (
            "M-1",
            "B-12",
            900,
            7200,
            "ES256",
            "M-1-2026",
            a,
            "",
            "2026-01-01T00:00:00Z",
            "2028-01-01T00:00:00Z",
        ),
        ("M-1", "", "", "", "ES256", "M-1-2027", b, "", "2027-06-01T00:00:00Z", ""),
        ("M-2", "", 60, "", "Ed25519", "M-2-k", "", "keys/m2.pem", "", ""),
    ]
    header = (*HEADER[:7], "public_key_file", "valid_from", "valid_until")
    path = write_csv(tmp_path / "fleet.csv", rows, header)

    proc = await aingestd("meter", "import", path, env=cli_env(db_url))
    assert_ok(proc)
    assert "2 meters (2 new, 0 updated, 0 unchanged) and 3 keys (3 new, 0 already registered)" in proc.stdout

    meters = {r["meter_id"]: r for r in await db.fetch("SELECT * FROM meters")}
    assert (meters["M-1"]["site"], meters["M-1"]["interval_s"], meters["M-1"]["max_power_w"]) == (
        "B-12",
        900,
        7200,
    )
    assert (meters["M-2"]["site"], meters["M-2"]["interval_s"], meters["M-2"]["max_power_w"]) == (
        None,
        60,
        None,
    )
    keys = {r["kid"]: r for r in await db.fetch("SELECT * FROM meter_keys")}
    assert set(keys) == {"M-1-2026", "M-1-2027", "M-2-k"}
    assert keys["M-2-k"]["alg"] == "Ed25519"
    assert keys["M-2-k"]["public_key"] == ed_pem
    assert keys["M-1-2026"]["valid_until"].isoformat() == "2028-01-01T00:00:00+00:00"
    assert keys["M-1-2027"]["meter_id"] == "M-1"


async def test_import_jsonl(db_url: str, db: Conn, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "fleet.jsonl",
        [
            {
                "meter_id": "J-1",
                "site": "S",
                "interval_s": 300,
                "max_power_w": 5000,
                "keys": [key("J-1-a"), key("J-1-b", "EdDSA", ed(), valid_from="2027-01-01T00:00:00Z")],
            },
            {"meter_id": "J-2", "keys": [key("J-2-a")]},
        ],
    )
    proc = await aingestd("meter", "import", path, env=cli_env(db_url))
    assert_ok(proc)
    assert await count(db, "meters") == 2
    assert await count(db, "meter_keys") == 3
    row = await db.fetchrow("SELECT * FROM meters WHERE meter_id = 'J-1'")
    assert row is not None
    assert (row["site"], row["interval_s"], row["max_power_w"]) == ("S", 300, 5000)
    assert await db.fetchval("SELECT interval_s FROM meters WHERE meter_id = 'J-2'") == 900


async def test_imported_keys_verify_a_running_daemons_messages(
    config: Config, db_url: str, db: Conn, tmp_path: Path
) -> None:
    es_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pem").write_bytes(spki(ed_key))
    path = write_jsonl(
        tmp_path / "fleet.jsonl",
        [
            {"meter_id": "D-1", "keys": [key("D-1-k", "ES256", spki(es_key).decode())]},
            {"meter_id": "D-2", "keys": [{"alg": "Ed25519", "kid": "D-2-k", "public_key_file": "ed.pem"}]},
        ],
    )
    async with running_daemon(config) as daemon:
        # Imported while the daemon runs: it looks the keys up when the meters first talk.
        assert_ok(await aingestd("meter", "import", path, env=cli_env(db_url)))
        now = datetime.now(UTC)
        messages = []
        for meter, signer in (
            ("D-1", Signer("ES256", "D-1-k", es_key)),
            ("D-2", Signer("Ed25519", "D-2-k", ed_key)),
        ):
            body = {
                "v": 1,
                "meter": meter,
                "epoch": 0,
                "seq": 1,
                "sent": format_time(now),
                "replay": False,
                "readings": [{"t": format_time(now - timedelta(minutes=1)), "import_wh": 5}],
            }
            messages.append((f"{config.mqtt.topic_prefix}/{meter}/up", jws(signer, body)))
        await publish(config.mqtt.host, config.mqtt.port, messages)
        await wait_settled(daemon.metrics.registry, 2)
    assert await db.fetchval("SELECT count(*) FROM readings WHERE meter_id IN ('D-1', 'D-2')") == 2
    assert await count(db, "quarantine") == 0


# -- bad rows -------------------------------------------------------------------------------


async def test_every_bad_row_is_reported_with_its_line_and_nothing_is_written(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    env = cli_env(db_url)
    taken = tmp_path / "taken.pem"
    taken.write_text(es256())
    assert_ok(
        await aingestd(
            "meter", "add", "OTHER", "--alg", "ES256", "--kid", "TAKEN", "--key", str(taken), env=env
        )
    )
    weak = spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)).decode()
    good = es256()
    header = (*HEADER[:7], "public_key_file", "valid_from", "valid_until")
    rows: list[tuple[object, ...]] = [
        ("G-1", "", "", "", "ES256", "G-1-k", good, "", "", ""),  # line 2: good
        ("bad id", "", "", "", "ES256", "k2", es256(), "", "", ""),  # 3
        ("G-3", "", "", "", "HS256", "k3", es256(), "", "", ""),  # 4
        ("G-4", "", "", "", "ES256", "k 4", es256(), "", "", ""),  # 5
        ("G-5", "", "", "", "ES256", "k5", "not a key", "", "", ""),  # 6
        ("G-6", "", "", "", "ES256", "k6", ed(), "", "", ""),  # 7: wrong key type
        ("G-7", "", "", "", "RS256", "k7", weak, "", "", ""),  # 8: too weak
        ("G-8", "", "", "", "ES256", "k8", "", "missing.pem", "", ""),  # 9
        ("G-9", "", "often", "", "ES256", "k9", es256(), "", "", ""),  # 10
        ("G-10", "", "", 0, "ES256", "k10", es256(), "", "", ""),  # 11
        ("G-11", "", "", "", "ES256", "k11", es256(), "", "yesterday", ""),  # 12
        (
            "G-12",
            "",
            "",
            "",
            "ES256",
            "k12",
            es256(),
            "",
            "2027-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),  # 13
        ("G-13", "", "", "", "ES256", "G-1-k", es256(), "", "", ""),  # 14: kid twice in the file
        ("G-1", "", "", "", "ES256", "G-1-k2", es256(), "", "", ""),  # 15: a second key of G-1
        (
            "G-1",
            "B-7",
            "",
            "",
            "ES256",
            "G-1-k3",
            es256(),
            "",
            "",
            "",
        ),  # 16: site differs from G-1's first row
        ("G-15", "", "", "", "ES256", "k15", es256(), "k15.pem", "", ""),  # 17: both
        ("G-16", "", "", "", "ES256", "TAKEN", es256(), "", "", ""),  # 18: kid of another meter
        ("G-17", "", "", "", "ES256", "k17", es256(), "", "", "2020-01-01T00:00:00Z"),  # 19: expired
        ("G-18", "", "", "", "ES256"),  # 20: short row
        ("G-19", "", "", "", "", "k19", es256(), "", "", ""),  # 21: no alg
    ]
    path = write_csv(tmp_path / "bad.csv", rows, header)
    # Each PEM is 4 lines, plus one for the quoted field's own line: work out where rows begin.
    starts, line = [], 2
    text = (tmp_path / "bad.csv").read_text().splitlines()[1:]
    for record in csv.reader(io.StringIO("\n".join(text) + "\n")):
        starts.append(line)
        line += sum(cell.count("\n") for cell in record) + 1
    before = await registry(db)

    proc = await aingestd("meter", "import", path, env=env)

    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"ingestd: error: FILE {path}: 18 bad row(s), nothing imported"
    )
    found = error_lines(proc.stderr)
    expected = {
        3: "meter_id 'bad id' must match",
        4: "alg 'HS256' is not one of",
        5: "kid 'k 4' must be 1-128 printable ASCII",
        6: "public_key: not a PEM-encoded public key",
        7: "public_key: ES256 needs an EC P-256 key, got Ed25519",
        8: "public_key: RSA key of 1024 bits: RS256 needs at least 2048",
        9: "public_key_file: ",
        10: "interval_s 'often' is not a whole number",
        11: "max_power_w 0 must be between 1 and",
        12: "valid_from 'yesterday' is not an RFC 3339 time",
        13: "valid_until must be later than valid_from",
        14: "kid 'G-1-k' is already on line",
        16: "site 'B-7' of meter G-1 differs from its first row's (line 2: None)",
        17: "exactly one of them is needed",
        18: "kid 'TAKEN' is already registered to meter OTHER",
        19: "valid_until is not later than now",
        20: "5 fields, the header has 10",
        21: "alg is missing",
    }
    assert sorted(found) == sorted(starts[n - 2] for n in expected), proc.stderr
    for n, needle in expected.items():
        assert needle in found[starts[n - 2]], (n, found[starts[n - 2]])
    assert "no such file" in found[starts[9 - 2]]
    assert await registry(db) == before


async def test_jsonl_bad_rows(db_url: str, db: Conn, tmp_path: Path) -> None:
    good = {"meter_id": "J-1", "keys": [key("J-1-k")]}
    lines = [
        orjson.dumps(good),
        b"{not json",
        b"[1, 2]",
        orjson.dumps({"meter_id": "J-2", "keys": []}),
        orjson.dumps({"meter_id": "J-3", "colour": "red", "keys": good["keys"]}),
        orjson.dumps({"meter_id": "J-1", "keys": [key("other")]}),
        orjson.dumps({"meter_id": "J-4", "interval_s": 1.5, "keys": [key("x")]}),
        orjson.dumps({"meter_id": "J-5", "keys": [key("y", pin=1)]}),
        orjson.dumps({"meter_id": "J-6", "keys": [key("z"), key("z")]}),
        orjson.dumps({"": "an empty name", "meter_id": "J-7", "keys": [key("w")]}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = await aingestd("meter", "import", str(path), env=cli_env(db_url))
    assert proc.returncode == EXIT_USAGE, describe(proc)
    found = error_lines(proc.stderr)
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10], proc.stderr
    assert found[2].startswith("not JSON")
    assert found[3] == "not a JSON object"
    assert "keys must be a list of at least one key" in found[4]
    assert "unknown member 'colour'" in found[5]
    assert "meter J-1 is already on line 1" in found[6]
    assert "interval_s must be a whole number" in found[7]
    assert "keys[0].pin: unknown member" in found[8]
    assert "kid 'z' is twice in this row" in found[9]
    assert "unknown member ''" in found[10]
    assert await count(db, "meters") == 0


async def test_bad_rows_beyond_the_cap_are_counted(db_url: str, tmp_path: Path) -> None:
    pem = es256()
    path = write_csv(
        tmp_path / "bad.csv", [(f"B-{i}", "", "x", "", "ES256", f"k{i}", pem, "", "") for i in range(150)]
    )
    proc = await aingestd("meter", "import", path, env=cli_env(db_url))
    assert proc.returncode == EXIT_USAGE, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == provision.ERRORS_SHOWN + 2
    assert lines[-2] == "... and 50 more"
    assert lines[-1].endswith("150 bad row(s), nothing imported")


async def test_a_late_bad_row_writes_nothing(db_url: str, db: Conn, tmp_path: Path) -> None:
    pems = [es256() for _ in range(5)]
    rows: list[tuple[object, ...]] = [
        (f"L-{i}", "", "", "", "ES256", f"L-{i}-k", pems[i % 5], "", "") for i in range(2000)
    ]
    rows.append(("L-last", "", "", "", "ES256", "L-last-k", "garbage", "", ""))
    path = write_csv(tmp_path / "late.csv", rows)
    proc = await aingestd("meter", "import", path, env=cli_env(db_url))
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert list(error_lines(proc.stderr)) == [2 + 2000 * 5]
    assert await count(db, "meters") == 0
    assert await count(db, "meter_keys") == 0


async def test_a_conflict_found_in_the_database_writes_nothing(db_url: str, db: Conn, tmp_path: Path) -> None:
    env = cli_env(db_url)
    first = write_csv(tmp_path / "first.csv", [("C-1", "", "", "", "ES256", "C-1-k", es256(), "", "")])
    assert_ok(await aingestd("meter", "import", first, env=env))
    # Same kid, another key: an error for that row, and the good rows around it wait.
    path = write_csv(
        tmp_path / "second.csv",
        [
            ("C-2", "", "", "", "ES256", "C-2-k", es256(), "", ""),
            ("C-1", "", "", "", "ES256", "C-1-k", es256(), "", ""),
        ],
    )
    proc = await aingestd("meter", "import", path, env=env)
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert error_lines(proc.stderr) == {7: "kid 'C-1-k' is already registered with another key or alg"}
    assert await count(db, "meters") == 1


async def test_a_kid_registered_meanwhile_is_a_conflict_not_a_no_op(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    """`meter add` of one of the file's kids, committed while the import runs: the import
    waits for it and reports the row, rather than skip the kid as if it were its own."""
    path = write_csv(tmp_path / "fleet.csv", [("W-1", "", "", "", "ES256", "RACED", es256(), "", "")])
    other: Conn = await asyncpg.connect(db_url)
    try:
        adding = other.transaction()
        await adding.start()
        await other.execute("INSERT INTO meters (meter_id) VALUES ('ADDER')")
        await other.execute(
            "INSERT INTO meter_keys (kid, meter_id, alg, public_key) VALUES ('RACED', 'ADDER', 'ES256', $1)",
            es256(),
        )
        importing = asyncio.create_task(aingestd("meter", "import", path, env=cli_env(db_url)))
        # The import is blocked behind the uncommitted insert before it is let go.
        for _ in range(3000):
            if await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") or importing.done():
                break
            await asyncio.sleep(0.01)
        await adding.commit()
    finally:
        await other.close()
    proc = await importing
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert error_lines(proc.stderr) == {2: "kid 'RACED' is already registered to meter ADDER"}
    assert await db.fetchval("SELECT meter_id FROM meter_keys WHERE kid = 'RACED'") == "ADDER"
    assert await db.fetchval("SELECT count(*) FROM meters WHERE meter_id = 'W-1'") == 0


# -- dry run, re-import, round trip ---------------------------------------------------------


async def test_dry_run_checks_everything_and_writes_nothing(db_url: str, db: Conn, tmp_path: Path) -> None:
    path = fleet_csv(tmp_path / "fleet.csv", 50)
    proc = await aingestd("meter", "import", path, "--dry-run", env=cli_env(db_url))
    assert_ok(proc)
    assert "would import 50 meters (50 new, 0 updated, 0 unchanged) and 50 keys (50 new" in proc.stdout
    assert await count(db, "meters") == 0
    assert await count(db, "meter_keys") == 0
    # The database's checks run too: a kid registered already is found by a dry run.
    assert_ok(await aingestd("meter", "import", path, env=cli_env(db_url)))
    clash = write_csv(tmp_path / "clash.csv", [("X-1", "", "", "", "ES256", "F-000007-k1", es256(), "", "")])
    proc = await aingestd("meter", "import", clash, "--dry-run", env=cli_env(db_url))
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert error_lines(proc.stderr) == {2: "kid 'F-000007-k1' is already registered to meter F-000007"}


async def test_reimport_is_a_no_op_and_updates_what_changed(db_url: str, db: Conn, tmp_path: Path) -> None:
    env = cli_env(db_url)
    pem = es256()
    # A key added by `meter add` from a file with CRLF line ends: the same key, spelt otherwise.
    added = tmp_path / "crlf.pem"
    added.write_bytes(pem.replace("\n", "\r\n").encode())
    assert_ok(
        await aingestd(
            "meter", "add", "R-0", "--alg", "ES256", "--kid", "R-0-k", "--key", str(added), env=env
        )
    )
    rows: list[tuple[object, ...]] = [
        ("R-0", "", "", "", "ES256", "R-0-k", pem, "", ""),
        ("R-1", "B-1", 900, "", "ES256", "R-1-k", es256(), "2026-01-01T00:00:00Z", ""),
    ]
    path = write_csv(tmp_path / "fleet.csv", rows)
    assert_ok(await aingestd("meter", "import", path, env=env))
    before = await registry(db)

    again = await aingestd("meter", "import", path, env=env)
    assert_ok(again)
    assert "(0 new, 0 updated, 2 unchanged) and 2 keys (0 new, 2 already registered)" in again.stdout
    assert await registry(db) == before

    # A meter's fields are the file's; a kid's validity, when given, must be the registered one.
    rows[1] = ("R-1", "B-2", 60, 3000, "ES256", "R-1-k", rows[1][6], "2026-01-01T00:00:00Z", "")
    path = write_csv(tmp_path / "fleet.csv", rows)
    proc = await aingestd("meter", "import", path, env=env)
    assert_ok(proc)
    assert "(0 new, 1 updated, 1 unchanged)" in proc.stdout
    assert tuple(
        await db.fetchrow("SELECT site, interval_s, max_power_w FROM meters WHERE meter_id = 'R-1'") or ()
    ) == (
        "B-2",
        60,
        3000,
    )
    rows[1] = (*rows[1][:7], "2026-02-01T00:00:00Z", "")
    proc = await aingestd("meter", "import", write_csv(tmp_path / "fleet.csv", rows), env=env)
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert error_lines(proc.stderr)[7].startswith("kid 'R-1-k': valid_from differs from the registered one")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_export_then_import_round_trips(
    fmt: str, db_url: str, db: Conn, tmp_path: Path, pg_server: object
) -> None:
    env = cli_env(db_url)
    rows: list[tuple[object, ...]] = [
        ("E-1", 'B, "quoted"', 900, 11000, "ES256", "E-1-a", es256(), "2026-01-01T00:00:00.123456Z", FAR),
        ("E-1", "", "", "", "Ed25519", "E-1-b", ed(), "2028-06-01T00:00:00Z", ""),
        ("E-2", "", 60, "", "ES256", "E-2-a", es256(), "", ""),
    ]
    assert_ok(await aingestd("meter", "import", write_csv(tmp_path / "in.csv", rows), env=env))
    assert_ok(await aingestd("meter", "revoke-key", "E-2-a", env=env))
    out = tmp_path / f"out.{fmt}"
    assert_ok(await aingestd("meter", "export", "--out", str(out), env=env))
    proc = await aingestd("meter", "export", "--format", fmt, env=env)
    assert_ok(proc)
    assert proc.stdout == out.read_text()

    # Into a fresh database: the same registry, revocation and all.
    from services import PostgresServer  # noqa: PLC0415 - the fixture's type

    assert isinstance(pg_server, PostgresServer)
    other_url = pg_server.create_database(f"rt_{fmt}")
    other_env = cli_env(other_url)
    assert_ok(await aingestd("migrate", env=other_env))
    assert_ok(await aingestd("meter", "import", str(out), env=other_env))
    other: Conn = await asyncpg.connect(other_url)
    try:
        assert await registry(other) == await registry(db)
    finally:
        await other.close()
    again = await aingestd("meter", "export", "--format", fmt, env=other_env)
    assert again.stdout == out.read_text()
    # And back into the first: nothing to do.
    proc = await aingestd("meter", "import", str(out), env=env)
    assert_ok(proc)
    assert "(0 new, 0 updated, 2 unchanged) and 3 keys (0 new, 3 already registered)" in proc.stdout


async def test_export_refuses_to_overwrite(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "fleet.csv"
    out.write_text("precious\n")
    proc = await aingestd("meter", "export", "--out", str(out), env=cli_env(db_url))
    assert_one_line_error(proc, EXIT_USAGE, str(out), "--force")
    assert out.read_text() == "precious\n"


async def test_export_leaves_out_and_counts_meters_without_a_key(
    db_url: str, db: Conn, tmp_path: Path
) -> None:
    env = cli_env(db_url)
    assert_ok(await aingestd("meter", "import", fleet_csv(tmp_path / "fleet.csv", 2), env=env))
    # Only SQL makes one (every way in registers a key), and an import could not take it back.
    await db.execute("INSERT INTO meters (meter_id) VALUES ('KEYLESS')")
    proc = await aingestd("meter", "export", "--format", "jsonl", env=env)
    assert_ok(proc)
    assert [orjson.loads(line)["meter_id"] for line in proc.stdout.splitlines()] == ["F-000000", "F-000001"]
    assert proc.stderr.strip() == "ingestd: 1 meter(s) without a key not exported (an import needs a key)"


def test_meter_help_lists_import_and_export() -> None:
    proc = ingestd("meter", "--help", env=cli_env(None))
    assert_ok(proc)
    assert "import" in proc.stdout
    assert "export" in proc.stdout


async def test_ten_thousand_meters(db_url: str, db: Conn, tmp_path: Path) -> None:
    path = fleet_csv(tmp_path / "fleet.csv", 10_000)
    proc = await aingestd("meter", "import", path, env=cli_env(db_url))
    assert_ok(proc)
    assert "10000 meters (10000 new" in proc.stdout
    assert await count(db, "meters") == 10_000
    assert await count(db, "meter_keys") == 10_000
    assert (
        await db.fetchval(
            "SELECT count(*) FROM meters m JOIN meter_keys k USING (meter_id) "
            "WHERE k.kid = m.meter_id || '-k1'"
        )
        == 10_000
    )


# -- the file, before any row ---------------------------------------------------------------


def test_format_from_the_extension() -> None:
    assert provision.format_of("a.CSV", None) == "csv"
    assert provision.format_of("a.ndjson", None) == "jsonl"
    assert provision.format_of("a.txt", "jsonl") == "jsonl"
    with pytest.raises(UsageError, match="--format"):
        provision.format_of("a.txt", None)


def test_a_line_too_long_is_refused_by_number(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"a\n" + b"x" * 100 + b"\n")
    with (
        open_regular(path, "FILE") as fh,
        pytest.raises(ConfigError, match=r"f\.csv line 2: longer than the 64 bytes"),
    ):
        list(bounded_lines(fh, path, "FILE", 64))


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("meter_id,alg,kid,public_key,colour", "line 1: unknown column 'colour'"),
        ("meter_id,alg,public_key", "line 1: no column 'kid'"),
        ("meter_id,alg,kid", "no column 'public_key' or 'public_key_file'"),
    ],
)
def test_csv_header_is_checked(header: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text(header + "\nM,ES256,k,x,y\n")
    with pytest.raises(UsageError, match=needle):
        provision.read_plan(str(path), "csv")


async def test_file_problems_are_one_line(db_url: str, tmp_path: Path) -> None:
    env = cli_env(db_url)
    proc = await aingestd("meter", "import", str(tmp_path / "none.csv"), env=env)
    assert_one_line_error(proc, EXIT_USAGE, "none.csv", "no such file")
    proc = await aingestd("meter", "import", str(tmp_path), "--format", "csv", env=env)
    assert_one_line_error(proc, EXIT_USAGE, "not a regular file")
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(HEADER) + "\n")
    proc = await aingestd("meter", "import", str(empty), env=env)
    assert_one_line_error(proc, EXIT_USAGE, "no meters in it")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(",".join(HEADER).encode() + b"\nM-\xe9,\n")
    proc = await aingestd("meter", "import", str(latin), env=env)
    assert_one_line_error(proc, EXIT_USAGE, "latin.csv line 2: not UTF-8")
