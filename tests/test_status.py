"""``ingestd status`` as operators and cron jobs run it: a subprocess on a real database."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import orjson
from test_cli import EXIT_FAILURE, EXIT_USAGE, aingestd, assert_ok, assert_one_line_error, cli_env, describe

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

H = timedelta(hours=1)


async def fleet(db: Conn) -> None:
    """One meter of each kind, relative to the database's clock."""
    now = await db.fetchval("SELECT now()")
    await db.executemany(
        "INSERT INTO meters (meter_id, site) VALUES ($1, $2)",
        [
            ("OK-1", "B-12"),
            ("TAMPERED", "B-12"),
            ("OLD-TAMPER", "B-12"),
            ("GRAY-1", "B-12"),
            ("RED-1", "B-7"),
            ("NEVER-1", "B-7"),
        ],
    )
    await db.executemany(
        """INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at)
           VALUES ($1, 0, 1, $2, $2)""",
        [
            ("OK-1", now - H),
            ("TAMPERED", now - H),
            ("OLD-TAMPER", now - H),
            ("GRAY-1", now - 50 * H),
            ("RED-1", now - 8 * 24 * H),
        ],
    )
    await db.executemany(
        """INSERT INTO events (meter_id, time, code, detail, epoch, seq, received_at)
           VALUES ($1, $2, $3, '{}', 0, 1, $2)""",
        [("TAMPERED", now - 2 * H, "003"), ("OLD-TAMPER", now - 30 * 24 * H, "014")],
    )
    await db.execute(
        """INSERT INTO gaps (meter_id, epoch, from_seq, to_seq, status, detected_at)
           VALUES ('GRAY-1', 0, 7, 9, 'open', $1)""",
        now - 49 * H,
    )


async def test_table_sorted_by_severity_exit_1_when_red(db: Conn, db_url: str) -> None:
    await fleet(db)
    proc = await aingestd("status", env=cli_env(db_url))
    assert proc.returncode == EXIT_FAILURE, describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["METER", "SITE", "FLAG"]
    # red, gray, never, then tamper events; ok meters and old tamper events are not listed.
    assert [line.split()[0] for line in lines[1:-1]] == ["RED-1", "GRAY-1", "NEVER-1", "TAMPERED"]
    gray = lines[2].split()
    assert gray[:3] == ["GRAY-1", "B-12", "gray"]
    assert "2d 2h ago" in lines[2]
    assert gray[-2:] == ["3", "-"]  # one open gap of three seqs, no tamper event
    assert "003 meter_cover_opened, 2h 0m ago" in lines[4]
    assert lines[-1] == "4 of 6 meters listed (3 ok, 1 gray, 1 red, 1 never)"


async def test_filters_and_json(db: Conn, db_url: str) -> None:
    await fleet(db)
    env = cli_env(db_url)
    proc = await aingestd("status", "--site", "B-12", "--json", env=env)
    assert_ok(proc)  # the red meter is at another site
    doc = orjson.loads(proc.stdout)
    assert [m["meter_id"] for m in doc["meters"]] == ["GRAY-1", "TAMPERED"]
    assert doc["meters_by_flag"] == {"ok": 3, "gray": 1, "red": 0, "never": 0}
    gray = doc["meters"][0]
    assert (gray["flag"], gray["open_gaps"], gray["missing_seqs"], gray["last_tamper_code"]) == (
        "gray",
        1,
        3,
        None,
    )
    assert doc["meters"][1]["last_tamper_code"] == "003"

    # A flag lists every meter that has it, ok ones included.
    proc = await aingestd("status", "--flag", "ok", env=env)
    assert_ok(proc)
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:-1]] == ["OK-1", "OLD-TAMPER", "TAMPERED"]
    proc = await aingestd("status", "--flag", "red", "--site", "B-7", env=env)
    assert proc.returncode == EXIT_FAILURE, describe(proc)


async def test_all_ok(db: Conn, db_url: str) -> None:
    await db.execute("INSERT INTO meters (meter_id, site) VALUES ('A', 'S')")
    await db.execute(
        "INSERT INTO meter_epochs (meter_id, epoch, max_seq, first_seen_at, last_seen_at) "
        "VALUES ('A', 0, 1, now(), now())"
    )
    proc = await aingestd("status", env=cli_env(db_url))
    assert_ok(proc)
    assert proc.stdout == "0 of 1 meters listed (1 ok, 0 gray, 0 red, 0 never)\n"


async def test_bad_input_is_one_line_and_exit_2(db_url: str) -> None:
    env = cli_env(db_url)
    assert_one_line_error(await aingestd("status", "--flag", "purple", env=env), EXIT_USAGE, "--flag")
    assert_one_line_error(await aingestd("status", "--site", "NOWHERE", env=env), EXIT_USAGE, "NOWHERE")
    assert_one_line_error(
        await aingestd("status", env=cli_env(db_url, INGESTD_FLAGS_GRAY_AFTER_S="soon")),
        EXIT_USAGE,
        "flags.gray_after_s",
    )
