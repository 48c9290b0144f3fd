"""systemd integration: sd_notify against a real datagram socket, the daemon's READY=1,
STATUS= and STOPPING=1, and the shipped unit checked by systemd-analyze."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ingestd.cli import EXIT_USAGE
from ingestd.config import Config, DatabaseConfig, IngestConfig, load_config
from ingestd.daemon import Daemon, status_line
from ingestd.metrics import Metrics
from ingestd.systemd import Notifier, socket_address, watchdog_interval_s
from services import MosquittoServer

WAIT_S = 10.0  # for a datagram that must come
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "ingestd.service"
SHIPPED_EXEC = "/opt/ingestd/bin/ingestd"
requires_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


class Manager:
    """The service manager's end: a datagram socket bound where $NOTIFY_SOCKET points."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    async def recv(self, within_s: float = WAIT_S) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), within_s)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    async def recv_until(self, key: str, within_s: float = WAIT_S) -> list[dict[str, str]]:
        """Messages up to and including the first that has ``key``."""
        deadline = asyncio.get_running_loop().time() + within_s
        seen: list[dict[str, str]] = []
        while not seen or key not in seen[-1]:
            seen.append(await self.recv(max(deadline - asyncio.get_running_loop().time(), 0.001)))
        return seen

    async def nothing_within(self, within_s: float) -> bool:
        try:
            await self.recv(within_s)
        except TimeoutError:
            return True
        return False


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)  # noqa: FBT003 - the stdlib's signature
    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        if request.param == "path":
            # Short: an AF_UNIX path has at most 107 bytes, pytest's tmp_path can be longer.
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="ingestd-notify-"))
            path = str(Path(directory) / "notify")
            sock.bind(path)
            yield Manager(sock, path)
        else:
            name = f"ingestd-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            yield Manager(sock, "@" + name)


@contextlib.asynccontextmanager
async def notifier(manager: Manager, **env: str) -> AsyncIterator[Notifier]:
    async with Notifier({"NOTIFY_SOCKET": manager.env_value, **env}) as n:
        yield n


async def test_ready_status_stopping(manager: Manager) -> None:
    async with notifier(manager) as n:
        assert n.enabled
        assert n.ready()
        assert await manager.recv() == {"READY": "1"}
        assert n.status("ingesting; pending 3")
        assert await manager.recv() == {"STATUS": "ingesting; pending 3"}
        assert n.stopping("shutting down\nnow")  # one line: a newline would start a field
        assert await manager.recv() == {"STOPPING": "1", "STATUS": "shutting down now"}
        assert n.watchdog()
        assert await manager.recv() == {"WATCHDOG": "1"}


async def test_watchdog_pings_at_half_the_interval(manager: Manager) -> None:
    async with notifier(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid())) as n:
        assert n.watchdog_s == pytest.approx(0.2)
        task = asyncio.create_task(n.run_watchdog())
        try:
            loop = asyncio.get_running_loop()
            arrivals = []
            for _ in range(6):
                assert await manager.recv() == {"WATCHDOG": "1"}
                arrivals.append(loop.time())
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            # 100 ms apart: never early, and well inside the 200 ms systemd would allow.
            assert min(gaps) >= 0.095, gaps
            assert sum(gaps) / len(gaps) < 0.16, gaps
        finally:
            task.cancel()


async def test_watchdog_stops_when_the_loop_is_stuck(manager: Manager) -> None:
    """The pings come from the event loop: block it, and systemd hears nothing."""
    async with notifier(manager, WATCHDOG_USEC="200000") as n:
        task = asyncio.create_task(n.run_watchdog())
        try:
            await manager.recv()
            time.sleep(0.5)  # noqa: ASYNC251 - a stuck loop is what the watchdog is there to catch
            with pytest.raises(BlockingIOError):
                manager.sock.recv(4096)  # five intervals blocked: not one ping was sent
            assert await manager.recv() == {"WATCHDOG": "1"}  # they resume with the loop
        finally:
            task.cancel()


async def test_no_watchdog_for_another_pid(manager: Manager) -> None:
    async with notifier(manager, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid() + 1)) as n:
        assert n.watchdog_s is None
        await n.run_watchdog()  # returns at once
        assert await manager.nothing_within(0.3)


def test_environment_parsing() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract") == "\0abstract"
    assert socket_address("vsock:2:1234") is None
    assert socket_address("@") is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "7"}, pid=7) == 0.001
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "8"}, pid=7) is None


async def test_disabled_without_notify_socket() -> None:
    async with Notifier({"WATCHDOG_USEC": "200000"}) as n:
        assert not n.enabled
        assert n.watchdog_s is None
        assert not n.ready()
        assert not n.status("x")
        await n.run_watchdog()  # return at once
        await n.keep_status(lambda: "x")


async def test_send_failure_does_not_raise() -> None:
    """systemd gone (socket removed): the daemon carries on."""
    with tempfile.TemporaryDirectory(prefix="ingestd-notify-") as directory:
        async with Notifier({"NOTIFY_SOCKET": str(Path(directory) / "gone")}) as n:
            assert not n.ready()
            assert not n.watchdog()


@pytest.mark.parametrize("manager", ["path"], indirect=True)
async def test_daemon_ready_only_when_subscribed(
    manager: Manager, config: Config, broker: MosquittoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    await asyncio.to_thread(broker.stop)
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        # Database reached, schema current, keys loaded: now it waits for the broker.
        assert await manager.recv() == {"STATUS": "connecting to the broker"}
        assert await manager.nothing_within(1.0), "READY=1 (or a ping) before the broker was reached"
        assert not daemon.ready.is_set()

        # Mosquitto speaks sd_notify too: it must not inherit our test socket.
        monkeypatch.delenv("NOTIFY_SOCKET")
        await asyncio.to_thread(broker.start)
        assert await manager.recv() == {"READY": "1", "STATUS": "ingesting; pending 0"}
        assert daemon.ready.is_set()
        assert daemon.metrics.registry.get_sample_value("ingestd_mqtt_connected") == 1
        assert await manager.recv() == {"WATCHDOG": "1"}

        daemon.should_exit.set()
        seen = await manager.recv_until("STOPPING")
        assert seen[-1] == {"STOPPING": "1", "STATUS": "shutting down; draining 0"}
        await asyncio.wait_for(task, WAIT_S)
    finally:
        daemon.should_exit.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def test_status_line() -> None:
    metrics = Metrics()
    metrics.db_up.set(1)
    assert status_line(metrics, broker_up=True, in_hand=12) == "ingesting; pending 12"
    assert status_line(metrics, broker_up=False, in_hand=3) == "broker disconnected, reconnecting; pending 3"
    metrics.db_up.set(0)  # a batch write failed: nothing is acknowledged meanwhile
    assert status_line(metrics, broker_up=True, in_hand=800) == "database unreachable, holding 800"


# -- the unit ------------------------------------------------------------------------------


def unit_settings(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(encoding="utf-8"), re.MULTILINE)


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit, its ExecStart pointed at a file that exists (verify checks that)."""
    text = UNIT.read_text(encoding="utf-8")
    assert unit_settings("ExecStart") == [f"{SHIPPED_EXEC} run --config /etc/ingestd/ingestd.toml"]
    binary = tmp_path / "bin" / "ingestd"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n", encoding="utf-8")
    binary.chmod(0o755)
    copy = tmp_path / "ingestd.service"
    copy.write_text(text.replace(SHIPPED_EXEC, str(binary)), encoding="utf-8")
    return copy


@requires_systemd_analyze
def test_unit_verifies(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown or misspelled settings are only warnings: none may name our file.
    complaints = [line for line in result.stderr.splitlines() if unit_copy.name in line]
    assert result.returncode == 0, result.stderr
    assert not complaints, complaints


@requires_systemd_analyze
def test_unit_exposure_at_most_2(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


def test_unit_semantics() -> None:
    """What the unit promises, checked against ingestd itself (no systemd needed)."""
    assert unit_settings("Type") == ["notify"]
    assert unit_settings("NotifyAccess") == ["main"]
    assert unit_settings("WatchdogSec") == ["30"]
    assert unit_settings("Restart") == ["on-failure"]
    # Exit status 2 is a configuration error (cli.EXIT_USAGE), 243 systemd's for a missing
    # credential: restarting cannot fix them, and a 5 s RestartSec keeps the unit under the
    # start-rate limit, so it would restart for ever.
    assert unit_settings("RestartPreventExitStatus") == [f"{EXIT_USAGE} 243"]
    # Stop must outlast the drain (shutdown_timeout_s), the offline announcement (5 s) and
    # the two bounded waits on a database that stopped answering (close_timeout_s each).
    (stop,) = unit_settings("TimeoutStopSec")
    assert int(stop) > IngestConfig().shutdown_timeout_s + 5 + 2 * DatabaseConfig().close_timeout_s
    # Secrets: only credential paths in the environment, and every one a real setting.
    credentials = {line.split(":", 1)[0] for line in unit_settings("LoadCredential")}
    assert credentials == {"db-password", "mqtt-client.key", "headend.pem"}
    env = dict(line.split("=", 1) for line in unit_settings("Environment"))
    settings = {k: v for k, v in env.items() if k.startswith("INGESTD_")}
    assert settings == {
        "INGESTD_DATABASE_PASSWORD_FILE": "%d/db-password",
        "INGESTD_MQTT_KEY_FILE": "%d/mqtt-client.key",
        "INGESTD_HEADEND_KEY_FILE": "%d/headend.pem",
    }
    # Names ingestd knows (a typo would be refused at start); cert_file and kid come from
    # the configuration file, which they must go together with.
    expanded = {k: v.replace("%d", "/run/credentials/ingestd.service") for k, v in settings.items()}
    from_file = {"INGESTD_MQTT_CERT_FILE": "/etc/ingestd/mqtt-client.crt", "INGESTD_HEADEND_KID": "he-1"}
    config = load_config(env={**expanded, **from_file})
    assert config.database.password_file == "/run/credentials/ingestd.service/db-password"
    assert config.mqtt.key_file == "/run/credentials/ingestd.service/mqtt-client.key"
    assert config.headend.key_file == "/run/credentials/ingestd.service/headend.pem"
