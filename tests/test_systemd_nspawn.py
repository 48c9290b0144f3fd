"""The shipped unit under a real systemd: a Debian 12 tree booted with systemd-nspawn,
ingestd installed by running docs/operations.md's "Installation (systemd)" steps as
written, deploy/systemd/ingestd.service unchanged.

The container shares the host's network, so the service reaches this test's own
PostgreSQL and its mTLS Mosquitto (the production configuration) on 127.0.0.1. The tree
is made once with debootstrap and cached under /var/cache/ingestd-test, keyed by what
goes into it; each run boots it with a throw-away overlay (--volatile=overlay), so the
cache is never changed. Python packages come from a wheel directory filled on the host
(the container installs with pip --no-index from it).

It needs root and the Debian packages systemd-container and debootstrap (`make test`
installs them). A host that cannot run it fails here with one line saying why: it is
never skipped. Deselect it locally with `-m "not systemd"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NoReturn, Self

import install_guide
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_broker_acl import INGESTD, Pki, ProductionMosquitto, connect

from helpers import jws
from ingestd.signature import Signer, public_key_pem
from services import PostgresServer

pytestmark = pytest.mark.systemd

ROOT: Final = Path(__file__).resolve().parent.parent
CACHE: Final = Path("/var/cache/ingestd-test")
SUITE: Final = "bookworm"  # Debian 12: systemd 252
TREE_PACKAGES: Final = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
# The guide's meter (step 4 registers it); its certificate's CN is its id.
METER: Final = "M-000123"
METER_KID: Final = "M-000123-2026"
# Inside the container: a clean environment, not the host's (PIP_*, PG*, INGESTD_*).
BASE_ENV: Final = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
PIP_ENV: Final = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/mnt/wheels", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
# WatchdogSec=30 in the unit: the test waits that long, twice (an outage, a freeze).
WATCHDOG_S: Final = 30


def fail(reason: str) -> NoReturn:
    pytest.fail(f"systemd test cannot run on this host: {reason}", pytrace=False)


def require_nspawn() -> None:
    if os.geteuid() != 0:
        fail("it must run as root (systemd-nspawn boots a container)")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            fail(f"{tool} not found: install the Debian package {package} (make test does)")


# -- the cached Debian tree and wheels ------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses here (debootstrap fetches from it)."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for path in sources:
        for uri in re.findall(r"^URIs:\s*(\S+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return str(uri)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        found = re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", legacy.read_text(encoding="utf-8"), re.MULTILINE
        )
        if found:
            return found[1]
    return DEFAULT_MIRROR


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Two test runs at once build each cache entry once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """CACHE/name, built into a scratch directory and renamed, so that a directory that
    exists is complete (an interrupted build leaves only the scratch one)."""
    target = CACHE / name
    if target.is_dir():
        return target
    with cache_lock():
        if not target.is_dir():
            scratch = CACHE / f"{name}.partial"
            shutil.rmtree(scratch, ignore_errors=True)
            build(scratch)
            scratch.rename(target)
    return target


def debian_tree() -> Path:
    mirror = debian_mirror()
    key = hashlib.sha256(repr((SUITE, TREE_PACKAGES, mirror)).encode()).hexdigest()[:12]

    def build(scratch: Path) -> None:
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(TREE_PACKAGES)}",
                SUITE,
                str(scratch),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            fail(f"debootstrap {SUITE} from {mirror} failed ({proc.returncode}): {last[0]}")

    return cached(f"debian-{SUITE}-{key}", build)


def wheelhouse() -> Path:
    """ingestd's dependencies and build backend as wheels, fetched by the host's pip."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    key = hashlib.sha256(repr(sorted(requirements)).encode()).hexdigest()[:12]

    def build(scratch: Path) -> None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                "--dest",
                str(scratch),
                *requirements,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            fail(f"pip download of ingestd's dependencies failed: {proc.stderr.strip().splitlines()[-1:]}")

    return cached(f"wheels-{key}", build)


# -- the machine ----------------------------------------------------------------------------


class Machine:
    """A booted container; commands run in it through nsenter (no machined on the host)."""

    def __init__(
        self, tree: Path, *, binds: Mapping[Path, str], ro_binds: Mapping[Path, str], log: Path
    ) -> None:
        self._args = [
            "systemd-nspawn",
            "--quiet",
            # The host's PID 1 may not be systemd: no machined registration, no scope unit.
            "--register=no",
            "--keep-unit",
            # A tmpfs overlay on the cached tree: the cache stays as debootstrap made it.
            "--volatile=overlay",
            f"--machine=ingestd-test-{uuid.uuid4().hex[:8]}",
            "--directory",
            str(tree),
            *(f"--bind={host}:{inside}" for host, inside in binds.items()),
            *(f"--bind-ro={host}:{inside}" for host, inside in ro_binds.items()),
            "--boot",
            "--console=pipe",
        ]
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def __enter__(self) -> Self:
        with self._log.open("wb") as out:
            self._proc = subprocess.Popen(self._args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            self.pid1 = self._wait_for_init()
            self._wait_booted()
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.run("systemctl poweroff --no-block", timeout=10, check=False)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=30)

    def _console(self) -> str:
        lines = self._log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def _wait_for_init(self) -> int:
        """The container's PID 1 (nspawn's child), as the host numbers it."""
        assert self._proc is not None
        deadline = time.monotonic() + 30
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                fail(f"systemd-nspawn exited with status {self._proc.returncode}: {self._console()}")
            with contextlib.suppress(FileNotFoundError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.1)
        fail(f"systemd-nspawn started no systemd within 30 s: {self._console()}")

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl is-system-running", check=False, timeout=10).stdout.strip()
            if state in {"running", "degraded"}:
                return
            time.sleep(0.2)
        fail(f"the container's systemd did not finish booting (state {state!r}): {self._console()}")

    def run(
        self, script: str, *, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        variables = [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()]
        proc = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.pid1),
                "-a",
                "--",
                "/usr/bin/env",
                "-i",
                *variables,
                "/bin/bash",
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            output = f"{proc.stdout}\n{proc.stderr}"
            pytest.fail(f"in the container, exit {proc.returncode}: {script}\n{output}\n{self.journal()}")
        return proc

    def show(self, *properties: str) -> dict[str, str]:
        out = self.run(f"systemctl show ingestd {' '.join(f'-p {p}' for p in properties)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, lines: int = 60) -> str:
        return self.run(f"journalctl -u ingestd -n {lines} --no-pager -o cat", check=False, timeout=30).stdout

    def wait_for(self, what: str, condition: Callable[[], bool], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {within_s:g} s waiting for {what}\n{self.journal()}")
            time.sleep(0.5)


# -- what the operator brings -----------------------------------------------------------------


def stage(
    src: Path, *, db_url: str, broker: ProductionMosquitto, pki: Pki, meter_key: ec.EllipticCurvePrivateKey
) -> None:
    """The source tree, and beside it the files the guide's commands expect."""
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    toml = install_guide.with_setting(install_guide.config_toml(), "database", "url", db_url)
    toml = install_guide.with_setting(toml, "mqtt", "url", broker.url)
    # The host's network is shared with other test runs: no fixed metrics port.
    toml += '\n[metrics]\naddr = "127.0.0.1:0"\n'
    (src / "ingestd.toml").write_text(toml, encoding="utf-8")
    cert, key = pki.issue(INGESTD)
    shutil.copy(pki.ca_file, src / "mqtt-ca.crt")
    shutil.copy(pki.ca_file, src / "db-ca.crt")  # the test database takes no TLS; the guide's does
    shutil.copy(cert, src / "mqtt-client.crt")
    shutil.copy(key, src / "mqtt-client.key")
    (src / "db-password").write_text("unused-by-a-trust-server\n", encoding="utf-8")
    (src / "meter.pub.pem").write_bytes(public_key_pem(meter_key.public_key()))


def reading(signer: Signer, seq: int) -> bytes:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "v": 1,
        "meter": METER,
        "epoch": 0,
        "seq": seq,
        "sent": now,
        "replay": False,
        "readings": [{"t": now, "import_wh": 1000 + seq}],
    }
    return jws(signer, body)


async def meter_publishes(broker: ProductionMosquitto, payload: bytes) -> None:
    async with connect(broker, METER) as meter:
        code = await meter.publish(f"meters/{METER}/up", payload)
        assert not code.is_failure, code


async def headend_state(broker: ProductionMosquitto) -> dict[str, object]:
    """The retained head-end state, as a meter reads it over mTLS."""
    async with connect(broker, METER) as meter:
        await meter.subscribe("headend/ingestd/state")
        for _ in range(100):
            if meter.received:
                break
            await asyncio.sleep(0.1)
    assert meter.received, "no retained head-end state"
    state = orjson.loads(meter.received[-1][1])
    assert isinstance(state, dict)
    return state


def is_json_object(line: str) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


# -- the test -----------------------------------------------------------------------------------


# The first run builds the Debian tree (debootstrap, about 4 minutes here): past the
# suite's 300 s per test.
@pytest.mark.timeout(1800)
def test_the_unit_under_systemd(pg_server: PostgresServer, tmp_path: Path) -> None:
    require_nspawn()
    tree, wheels = debian_tree(), wheelhouse()
    pki = Pki.create(tmp_path / "pki")
    db_name = f"nspawn_{uuid.uuid4().hex[:10]}"
    db_url = pg_server.create_database(db_name)
    meter_key = ec.generate_private_key(ec.SECP256R1())
    signer = Signer("ES256", METER_KID, meter_key)

    def stored() -> int:
        return int(pg_server.psql("SELECT count(*) FROM raw_messages", db_name).strip())

    with ProductionMosquitto(tmp_path / "mosquitto", pki) as broker:
        src = tmp_path / "ingestd"
        stage(src, db_url=db_url, broker=broker, pki=pki, meter_key=meter_key)
        binds = {src: "/root/ingestd"}
        with Machine(tree, binds=binds, ro_binds={wheels: "/mnt/wheels"}, log=tmp_path / "console.log") as m:
            assert m.run("systemctl --version").stdout.startswith("systemd 252")

            # The guide, steps 1 to 4, as written, in the source tree.
            m.run("cd /root/ingestd\n" + install_guide.shell(range(1, 5)), env=PIP_ENV, timeout=600)
            # `enable --now` returned: READY=1 was sent.
            assert m.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}
            assert m.show("StatusText")["StatusText"].startswith("ingesting")

            # One signed message over mTLS, stored by the sandboxed service.
            asyncio.run(meter_publishes(broker, reading(signer, 1)))
            m.wait_for("the message stored", lambda: stored() == 1, within_s=30)

            exposure = re.search(
                r"Overall exposure level for ingestd\.service: (\d+\.\d+)",
                m.run("systemd-analyze security ingestd --no-pager").stdout,
            )
            assert exposure is not None
            assert float(exposure[1]) <= 1.1

            # The database down past the watchdog's 30 s: waiting is not stuck, the service
            # stays up (and says why it holds), and ingests again after. (A silent, frozen
            # database is tests/test_db_outage.py's.) asyncpg's pool logs its reconnection
            # attempts with tracebacks meanwhile: everything the daemon wrote must still be
            # JSON, one object a journal entry (systemd's own lines have other PIDs).
            restarts, main_pid = m.show("NRestarts")["NRestarts"], m.show("MainPID")["MainPID"]

            def logged() -> list[str]:
                return m.run(f"journalctl _PID={main_pid} --no-pager -o cat").stdout.splitlines()

            pg_server.stop()
            try:
                deadline = time.monotonic() + WATCHDOG_S + 5
                said_unreachable = False
                while time.monotonic() < deadline:
                    seen = m.show("ActiveState", "NRestarts", "StatusText")
                    assert seen["ActiveState"] == "active", seen
                    assert seen["NRestarts"] == restarts, seen
                    said_unreachable |= seen["StatusText"].startswith("database unreachable")
                    time.sleep(1)
            finally:
                pg_server.start()
            assert said_unreachable, "the status never said the database was unreachable"
            # No traffic came during the outage, so no write is backing off: the next
            # message is stored at once, and its write says the database is back.
            asyncio.run(meter_publishes(broker, reading(signer, 2)))
            m.wait_for("the second message stored", lambda: stored() == 2, within_s=30)
            m.wait_for(
                "ingesting again",
                lambda: m.show("StatusText")["StatusText"].startswith("ingesting"),
                within_s=20,
            )
            lines = logged()
            assert m.show("MainPID")["MainPID"] == main_pid
            assert any("asyncpg.pool" in line for line in lines), lines
            assert any('"db_probe_failed"' in line for line in lines), lines
            not_json = [line for line in lines if not is_json_object(line)]
            assert not not_json, not_json[:20]

            # A frozen process: the watchdog's SIGABRT (delivered once it runs again, as to
            # a stuck event loop) kills it with Python's tracebacks, and systemd restarts it.
            pid = m.show("MainPID")["MainPID"]
            m.run(f"kill -STOP {pid}")
            try:
                m.wait_for(
                    "the watchdog timeout",
                    lambda: "Watchdog timeout" in m.run("journalctl -u ingestd --no-pager -o cat").stdout,
                    within_s=WATCHDOG_S + 15,
                )
            finally:
                m.run(f"kill -CONT {pid}", check=False)

            def restarted() -> bool:
                now = m.show("MainPID", "SubState")
                return now["SubState"] == "running" and now["MainPID"] not in {pid, "0"}

            m.wait_for("the restart after the watchdog", restarted, within_s=30)
            assert int(m.show("NRestarts")["NRestarts"]) == int(restarts) + 1
            assert "Fatal Python error: Aborted" in m.journal(400)

            # Stop: clean exit, and the retained state says offline.
            m.run("systemctl stop ingestd")
            assert m.show("Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
            assert asyncio.run(headend_state(broker))["online"] is False

            # A missing credential: 243/CREDENTIALS, and no restarting until it is back.
            m.run("mv /etc/credstore/ingestd-headend.pem /root/")
            assert m.run("systemctl start ingestd", check=False).returncode != 0
            assert m.show("Result", "ExecMainStatus") == {"Result": "exit-code", "ExecMainStatus": "243"}
            assert "243/CREDENTIALS" in m.run("systemctl status ingestd --no-pager", check=False).stdout
            m.run("mv /root/ingestd-headend.pem /etc/credstore/ && systemctl reset-failed ingestd")

            # A configuration error (exit status 2) is not restarted: RestartSec=5 passes,
            # and the unit stays failed.
            m.run("cp /etc/ingestd/ingestd.toml /root/ && echo '[bogus]' >> /etc/ingestd/ingestd.toml")
            assert m.run("systemctl start ingestd", check=False).returncode != 0
            assert m.show("Result", "ExecMainStatus") == {"Result": "exit-code", "ExecMainStatus": "2"}
            time.sleep(7)  # RestartSec=5 in the unit: a restart would have happened by now
            assert m.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
            assert "ingestd: error: bogus: unknown section" in m.journal()
            m.run("cp /root/ingestd.toml /etc/ingestd/ && systemctl reset-failed ingestd")
            m.run("systemctl start ingestd")
            assert m.show("ActiveState")["ActiveState"] == "active"


def test_a_host_without_nspawn_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a skip: `make test` on a host that cannot run the test above must say why."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception) as info:
        require_nspawn()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("systemd test cannot run on this host: ")
    assert "systemd-container" in message or "root" in message
