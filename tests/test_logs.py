"""Logging: every line is one JSON object when the format is JSON, whoever logs it (our
structlog loggers, or a library through the standard ``logging`` module, as asyncpg and
aiomqtt do), tracebacks included; journald stores each line as one entry."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog

from conftest import running_daemon
from helpers import metric, wait_until
from ingestd.config import Config, LogConfig
from ingestd.logs import configure_logging
from services import PostgresServer


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        yield out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text.splitlines()]  # each line must be JSON


def _fail() -> None:
    raise ConnectionResetError("connection lost\nwhile reading")


def test_library_warnings_with_tracebacks_are_one_json_line(stream: io.StringIO) -> None:
    """asyncpg's pool logs a lost connection through `logging`, with the traceback."""
    configure_logging(LogConfig(format="json"), stream, cache=False)
    library = logging.getLogger("asyncpg.pool")
    try:
        _fail()
    except ConnectionResetError:
        library.warning("%s: error while %s", "Pool", "resetting", exc_info=True)
    library.info("not shown: libraries speak only when something is wrong")
    (entry,) = lines(stream)
    assert entry["event"] == "Pool: error while resetting"
    assert entry["level"] == "warning"
    assert entry["logger"] == "asyncpg.pool"
    assert "timestamp" in entry
    exception = entry["exception"]
    assert isinstance(exception, str)
    assert "Traceback" in exception
    assert "ConnectionResetError: connection lost\nwhile reading" in exception


def test_structlog_and_logging_share_one_format(stream: io.StringIO) -> None:
    configure_logging(LogConfig(format="json", level="info"), stream, cache=False)
    structlog.get_logger("ingestd.test").info("ours", n=3)
    logging.getLogger("aiomqtt").error("theirs")
    try:
        _fail()
    except ConnectionResetError:
        structlog.get_logger("ingestd.test").exception("ours_failed")
    ours, theirs, failed = lines(stream)
    assert ours["event"] == "ours"
    assert ours["n"] == 3
    assert ours["level"] == "info"
    assert theirs["event"] == "theirs"
    assert theirs["level"] == "error"
    assert set(ours) >= {"timestamp", "level", "event"}
    assert set(theirs) >= {"timestamp", "level", "event"}
    assert "ConnectionResetError" in str(failed["exception"])


def test_console_format_stays_readable(stream: io.StringIO) -> None:
    configure_logging(LogConfig(format="console"), stream, cache=False)
    logging.getLogger("asyncpg.pool").warning("lost %d connections", 2)
    text = stream.getvalue()
    assert "lost 2 connections" in text
    assert not text.startswith("{")


async def test_a_database_outage_logs_only_json_lines(
    stream: io.StringIO, config: Config, pg_server: PostgresServer
) -> None:
    """The daemon through a real outage: asyncpg's pool logs its failed reconnections with
    tracebacks, our code its own warnings; every line must be one JSON object."""
    configure_logging(LogConfig(format="json"), stream, cache=False)
    config = dataclasses.replace(config, database=dataclasses.replace(config.database, probe_s=0.5))
    async with running_daemon(config) as daemon:
        await asyncio.to_thread(pg_server.stop)
        try:
            await wait_until(lambda: "asyncpg.pool" in stream.getvalue(), what="asyncpg's pool to complain")
            await wait_until(lambda: metric(daemon.metrics.registry, "ingestd_db_up") == 0, what="db_up 0")
        finally:
            await asyncio.to_thread(pg_server.start)
        await wait_until(lambda: metric(daemon.metrics.registry, "ingestd_db_up") == 1, what="db_up 1 again")
    entries = lines(stream)
    pool = [e for e in entries if e.get("logger") == "asyncpg.pool"]
    assert pool
    assert all("Traceback" in str(e["exception"]) for e in pool if "exception" in e)
