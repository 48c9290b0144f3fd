"""Crash and restart, as an operator's host does them: the daemon is a real process, killed
(SIGKILL) or stopped (SIGTERM) while a fleet's messages are in flight, then started again
with the same MQTT client id. The broker redelivers what was never acknowledged, and
every message ends up stored exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import asyncpg
import orjson
import pytest

from helpers import retained_state
from ingestd.config import Config
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from services import free_port

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

pytestmark = pytest.mark.slow

METERS = 20
PER_METER = 150
N = METERS * PER_METER
# The publisher's pace: a burst of CHUNK messages (QoS 1, each awaited), then a pause.
CHUNK = 100
PAUSE_S = 0.01
# Stop the first daemon once it has committed this many, and no more than N - MARGIN.
MARGIN = 300
# For the back-pressure case: intake pauses at this many messages in hand.
MAX_PENDING = 200
READY_WITHIN_S = 30.0
STORED_WITHIN_S = 60.0
EXIT_WITHIN_S = 30.0

Key = tuple[str, int, int]  # (meter_id, epoch, seq)


@dataclass(frozen=True, slots=True)
class Message:
    key: Key
    topic: str
    payload: bytes


# -- the daemon as a process ---------------------------------------------------------------


def _daemon_env(config: Config, metrics_port: int, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(
        INGESTD_DATABASE_URL=config.database.url,
        INGESTD_MQTT_URL=config.mqtt.url,
        # The same id for every run: the persistent session is what redelivers.
        INGESTD_MQTT_CLIENT_ID=config.mqtt.client_id,
        INGESTD_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
        INGESTD_LOG_FORMAT="json",
        # Small batches, so that many transactions commit while messages flow.
        INGESTD_INGEST_BATCH_MAX="50",
        INGESTD_INGEST_BATCH_WAIT_MS="20",
    )
    env.update(extra)
    return env


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def _sample(text: str, name: str) -> float:
    """The value of an unlabelled sample; for a labelled one, the sum over its labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((f"{name} ", f"{name}{{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(slots=True)
class DaemonProcess:
    proc: asyncio.subprocess.Process
    metrics_port: int
    log_path: Path

    def describe(self) -> str:
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return f"ingestd run (exit {self.proc.returncode}), last log lines:\n" + "\n".join(lines[-30:])

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict):
                    events.append(record)
        return events

    async def metrics(self) -> str:
        text = await asyncio.to_thread(_scrape, self.metrics_port)
        assert text is not None, f"metrics endpoint not answering\n{self.describe()}"
        return text

    async def wait_ready(self) -> None:
        async def connected() -> bool:
            text = await asyncio.to_thread(_scrape, self.metrics_port)
            return text is not None and "ingestd_mqtt_connected 1.0" in text

        await self.poll(connected, within_s=READY_WITHIN_S, what="the daemon to be subscribed")

    async def poll(self, condition: Callable[[], Awaitable[bool]], *, within_s: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail at once if the daemon exits meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not await condition():
            assert self.proc.returncode is None, f"daemon exited waiting for {what}\n{self.describe()}"
            assert loop.time() < deadline, (
                f"timed out after {within_s} s waiting for {what}\n{self.describe()}"
            )
            await asyncio.sleep(0.01)

    async def stop(self, signum: signal.Signals) -> int:
        self.proc.send_signal(signum)
        try:
            async with asyncio.timeout(EXIT_WITHIN_S):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"daemon still running {EXIT_WITHIN_S} s after {signum.name}") from None


@contextlib.asynccontextmanager
async def _daemon(
    config: Config, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[DaemonProcess]:
    """``ingestd run`` as a subprocess, subscribed on entry, never left running on exit."""
    metrics_port = free_port()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingestd.cli",
            "run",
            env=_daemon_env(config, metrics_port, extra_env or {}),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        daemon = DaemonProcess(proc, metrics_port, log_path)
        try:
            await daemon.wait_ready()
            yield daemon
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# -- the fleet -----------------------------------------------------------------------------


async def _prepare(config: Config, key_factory: KeyFactory) -> list[Message]:
    """N signed messages, one reading each, interleaved across the meters."""
    fleet = build_fleet(METERS, prefix="CRASH-", interval_s=60, algs=("ES256", "EdDSA"), keys=key_factory)
    async with Store(config.database) as store:
        assert await register_fleet(store, fleet) == METERS
    rng = random.Random(11)
    prefix = config.mqtt.topic_prefix
    messages = []
    for _ in range(PER_METER):
        for meter in fleet:
            body = meter.next_body(datetime.now(UTC), rng)
            key = (meter.meter_id, body["epoch"], body["seq"])
            messages.append(Message(key, f"{prefix}/{meter.meter_id}/up", meter.sign(body)))
    assert len({m.key for m in messages}) == N
    return messages


@dataclass(slots=True)
class Publisher:
    published: int = 0


async def _publish(config: Config, messages: Sequence[Message], state: Publisher) -> None:
    """QoS 1, at a steady pace, whether or not a daemon is connected: the broker queues
    for the daemon's persistent session while it is down."""
    async with aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        identifier=f"crash-pub-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=CHUNK,
    ) as client:
        client.pending_calls_threshold = CHUNK  # a chunk in flight is the point, not a warning
        for start in range(0, len(messages), CHUNK):
            chunk = messages[start : start + CHUNK]
            await asyncio.gather(*(client.publish(m.topic, m.payload, qos=1) for m in chunk))
            state.published += len(chunk)
            await asyncio.sleep(PAUSE_S)  # pacing, not waiting for a condition


# -- the database --------------------------------------------------------------------------


async def _count(db: Conn, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def _wait_backends_gone(db: Conn) -> None:
    """Wait until the stopped daemon's database sessions have ended, so nothing it sent
    can still commit: only then is the count of stored messages final."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    query = """
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
    """
    while await db.fetchval(query):
        assert loop.time() < deadline, "the stopped daemon's database sessions did not end within 30 s"
        await asyncio.sleep(0.01)


async def _assert_exactly_once(db: Conn, messages: Sequence[Message]) -> None:
    assert await _count(db, "readings") == N
    assert await _count(db, "message_seqs") == N
    assert await _count(db, "raw_messages") == N
    assert await _count(db, "quarantine") == 0, await db.fetch(
        "SELECT reason, detail FROM quarantine LIMIT 5"
    )
    assert await db.fetch("SELECT meter_id, time FROM readings GROUP BY 1, 2 HAVING count(*) > 1") == []
    assert (
        await db.fetch("SELECT meter_id, epoch, seq FROM raw_messages GROUP BY 1, 2, 3 HAVING count(*) > 1")
        == []
    )
    expected = {m.key: m.payload for m in messages}
    seqs = {(r["meter_id"], r["epoch"], r["seq"]) for r in await db.fetch("SELECT * FROM message_seqs")}
    assert seqs == set(expected)
    readings = {(r["meter_id"], r["epoch"], r["seq"]) for r in await db.fetch("SELECT * FROM readings")}
    assert readings == set(expected)
    # The audit trail holds, for every message, the exact bytes published.
    raw = {
        (r["meter_id"], r["epoch"], r["seq"]): r["payload"]
        for r in await db.fetch("SELECT * FROM raw_messages")
    }
    assert raw == expected


# -- the scenarios ------------------------------------------------------------------------


def _assert_clean_exit(daemon: DaemonProcess, status: int) -> None:
    assert status == 0, daemon.describe()
    done = [e for e in daemon.log_events() if e.get("event") == "shutdown_complete"]
    assert done, daemon.describe()
    assert done[-1]["drained"] is True, daemon.describe()


@dataclass(frozen=True, slots=True)
class Restart:
    """What the second daemon did."""

    received: float
    accepted: float
    duplicates: float


async def _restart_and_store_the_rest(
    config: Config,
    db: Conn,
    log_path: Path,
    committed_before: int,
    extra_env: Mapping[str, str] | None = None,
) -> Restart:
    """A second daemon, same client id: it gets what was never acknowledged, stores the rest,
    and stops cleanly on SIGTERM."""
    async with _daemon(config, log_path, extra_env) as second:

        async def all_stored() -> bool:
            return await _count(db, "message_seqs") >= N

        await second.poll(all_stored, within_s=STORED_WITHIN_S, what=f"{N} messages stored")
        text = ""

        async def settled() -> bool:
            # Everything the second daemon received is committed and acknowledged.
            nonlocal text
            text = await second.metrics()
            finished = sum(
                _sample(text, name)
                for name in (
                    "ingestd_messages_accepted_total",
                    "ingestd_messages_duplicate_total",
                    "ingestd_messages_rejected_total",
                )
            )
            return (
                finished == _sample(text, "ingestd_messages_received_total")
                and _sample(text, "ingestd_pending_messages") == 0
            )

        await second.poll(settled, within_s=STORED_WITHIN_S, what="the second daemon to settle")
        restart = Restart(
            received=_sample(text, "ingestd_messages_received_total"),
            accepted=_sample(text, "ingestd_messages_accepted_total"),
            duplicates=_sample(text, "ingestd_messages_duplicate_total"),
        )
        assert _sample(text, "ingestd_messages_rejected_total") == 0
        assert restart.accepted + restart.duplicates == restart.received
        # The second daemon stored exactly what the first had not.
        assert restart.accepted == N - committed_before
        assert restart.received >= N - committed_before
        _assert_clean_exit(second, await second.stop(signal.SIGTERM))
    return restart


@dataclass(frozen=True, slots=True)
class Outcome:
    committed_at_stop: int  # in the database once the first daemon was gone
    restart: Restart


async def _stop_in_flight_then_restart(
    config: Config, db: Conn, key_factory: KeyFactory, tmp_path: Path, signum: signal.Signals
) -> Outcome:
    messages = await _prepare(config, key_factory)
    publisher = Publisher()
    task: asyncio.Task[None] | None = None
    try:
        async with _daemon(config, tmp_path / "first.log") as first:
            task = asyncio.create_task(_publish(config, messages, publisher), name="publisher")

            async def some_committed() -> bool:
                accepted = _sample(await first.metrics(), "ingestd_messages_accepted_total")
                assert accepted <= N - MARGIN, (
                    f"missed the window: {accepted:.0f} of {N} committed before the stop "
                    f"({publisher.published} published); slow the publisher down"
                )
                return accepted >= MARGIN

            await first.poll(some_committed, within_s=STORED_WITHIN_S, what=f"{MARGIN} messages committed")
            stored = await _count(db, "message_seqs")
            assert stored < N, f"all {N} messages already stored before the {signum.name}"
            published_at_signal = publisher.published
            status = await first.stop(signum)
            if signum == signal.SIGKILL:
                assert status == -signal.SIGKILL, first.describe()
            else:
                _assert_clean_exit(first, status)
        await _wait_backends_gone(db)
        committed_at_stop = await _count(db, "message_seqs")
        assert committed_at_stop >= stored
        # The fleet keeps publishing while no daemon runs; the broker queues for the session.
        async with asyncio.timeout(STORED_WITHIN_S):
            await task
        assert publisher.published == N
        restart = await _restart_and_store_the_rest(config, db, tmp_path / "second.log", committed_at_stop)
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    await _assert_exactly_once(db, messages)
    print(
        f"{signum.name} with {stored} stored and {published_at_signal}/{N} published; "
        f"{committed_at_stop} committed by the first daemon; second daemon: received "
        f"{restart.received:.0f}, accepted {restart.accepted:.0f}, duplicates {restart.duplicates:.0f} "
        f"({'redelivered after commit' if restart.duplicates else 'no commit was left unacknowledged'})"
    )
    return Outcome(committed_at_stop, restart)


async def test_sigkill_in_flight_then_restart_stores_every_message_exactly_once(
    config: Config, db: Conn, key_factory: KeyFactory, tmp_path: Path
) -> None:
    outcome = await _stop_in_flight_then_restart(config, db, key_factory, tmp_path, signal.SIGKILL)
    # Killed mid-stream: what it had not committed, the second daemon stored (and what it
    # had committed but not acknowledged came back as duplicates: the log line says how many).
    assert outcome.committed_at_stop < N


async def test_sigterm_in_flight_exits_cleanly_then_restart_stores_every_message_exactly_once(
    config: Config, db: Conn, key_factory: KeyFactory, tmp_path: Path
) -> None:
    outcome = await _stop_in_flight_then_restart(config, db, key_factory, tmp_path, signal.SIGTERM)
    # A graceful stop acknowledges everything it committed before it disconnects, so the
    # broker redelivers nothing that is already stored.
    assert outcome.restart.duplicates == 0


async def test_sigterm_while_intake_is_paused_takes_no_more_messages(
    config: Config, db: Conn, key_factory: KeyFactory, tmp_path: Path
) -> None:
    """The database stalls (a test transaction holds a lock on ``message_seqs``), the
    daemon's intake pauses at max_pending, the broker holds the backlog; SIGTERM, then the
    database recovers. A stopping daemon commits what it has in hand and takes no more."""
    messages = await _prepare(config, key_factory)
    extra_env = {"INGESTD_INGEST_MAX_PENDING": str(MAX_PENDING)}
    stall = db.transaction()
    await stall.start()
    try:
        await db.execute("LOCK TABLE message_seqs IN ACCESS EXCLUSIVE MODE")
        async with _daemon(config, tmp_path / "first.log", extra_env) as first:
            await _publish(config, messages, Publisher())
            text = ""

            async def paused() -> bool:
                nonlocal text
                text = await first.metrics()
                return _sample(text, "ingestd_intake_paused") == 1

            await first.poll(paused, within_s=STORED_WITHIN_S, what="intake to pause")
            # Nothing commits while the lock is held, so nothing is taken in either.
            received = _sample(text, "ingestd_messages_received_total")
            assert MAX_PENDING <= received < N
            first.proc.send_signal(signal.SIGTERM)

            async def stopping() -> bool:
                return any(e.get("event") == "shutdown_started" for e in first.log_events())

            await first.poll(stopping, within_s=EXIT_WITHIN_S, what="shutdown to start")
            await stall.rollback()
            async with asyncio.timeout(EXIT_WITHIN_S):
                status = await first.proc.wait()
            _assert_clean_exit(first, status)
    finally:
        if db.is_in_transaction():
            await stall.rollback()
    await _wait_backends_gone(db)
    committed_at_stop = await _count(db, "message_seqs")
    # Drained: everything it had in hand was committed.
    assert committed_at_stop >= received
    restart = await _restart_and_store_the_rest(
        config, db, tmp_path / "second.log", committed_at_stop, extra_env
    )
    await _assert_exactly_once(db, messages)
    print(
        f"intake paused with {received:.0f} received; the stopping daemon committed {committed_at_stop}; "
        f"second daemon: received {restart.received:.0f}, duplicates {restart.duplicates:.0f}"
    )
    assert committed_at_stop == received


async def test_sigkill_leaves_the_will_offline_state(config: Config, tmp_path: Path) -> None:
    """Meters learn that the head-end is gone even when it cannot say so itself."""
    host, port, instance = config.mqtt.host, config.mqtt.port, config.headend.instance
    async with _daemon(config, tmp_path / "daemon.log") as daemon:
        assert (await retained_state(host, port, instance))["online"] is True
        daemon.proc.send_signal(signal.SIGKILL)
        await daemon.proc.wait()
    assert (await retained_state(host, port, instance))["online"] is False


async def test_a_second_signal_exits_at_once(
    config: Config, db: Conn, key_factory: KeyFactory, tmp_path: Path
) -> None:
    """Draining is stuck behind a database lock; a second SIGTERM does not wait for it.
    Nothing is lost: what was not committed was not acknowledged either."""
    messages = await _prepare(config, key_factory)
    stall = db.transaction()
    await stall.start()
    try:
        await db.execute("LOCK TABLE message_seqs IN ACCESS EXCLUSIVE MODE")
        async with _daemon(config, tmp_path / "first.log") as first:
            await _publish(config, messages, Publisher())

            async def received() -> bool:
                return _sample(await first.metrics(), "ingestd_messages_received_total") > 0

            await first.poll(received, within_s=STORED_WITHIN_S, what="messages to arrive")
            first.proc.send_signal(signal.SIGTERM)

            async def stopping() -> bool:
                return any(e.get("event") == "shutdown_started" for e in first.log_events())

            await first.poll(stopping, within_s=EXIT_WITHIN_S, what="shutdown to start")
            assert first.proc.returncode is None  # still draining, behind the lock
            first.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                status = await first.proc.wait()
            assert status == 1
            assert any(e.get("event") == "forced_exit" for e in first.log_events())
    finally:
        if db.is_in_transaction():
            await stall.rollback()
    await _wait_backends_gone(db)
    assert await _count(db, "message_seqs") == 0
    await _restart_and_store_the_rest(config, db, tmp_path / "second.log", 0, {})
    await _assert_exactly_once(db, messages)
