"""Private, throw-away Mosquitto and PostgreSQL+TimescaleDB servers for tests.

Every test run gets its own broker port and its own database cluster, so runs never
share state with each other or with a system-wide broker/database, and tests may stop,
kill or restart a server to inject faults without disturbing anything else.

Synchronous and stdlib-only on purpose: fixtures of any flavour (sync, asyncio,
session-scoped) can use it, and it works before the project's dependencies are importable.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import IO, Self

__all__ = ["MosquittoServer", "PostgresServer", "ServiceError", "free_port"]

LOCALHOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A test service could not be started or controlled."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    The port is only reserved while we hold the probe socket, so another process could
    grab it before the service binds it; with ephemeral ports handed out round-robin by
    the kernel that is rare enough, and a service that loses the race fails loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n:])


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    # A killed daemon stays a zombie until its parent (init, for the daemonised
    # postmaster) reaps it, which can lag behind or, under some container inits, never
    # happen. kill(pid, 0) succeeds on zombies, so read the process state where /proc
    # exists.
    if Path("/proc/self/stat").exists():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] not in {"Z", "X"}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.parent.name))
    return children


def _wait_until_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise ServiceError(f"processes {pids} still alive {timeout} s after SIGKILL")
        time.sleep(0.02)


# Servers still running when the interpreter exits (a test crashed, someone pressed
# Ctrl-C) would otherwise outlive the run: the postmaster is daemonised by pg_ctl, and
# Popen children are never killed for us. Strong references on purpose: a running
# server whose object was dropped must still be stopped.
_running: set[MosquittoServer | PostgresServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


class MosquittoServer:
    """A Mosquitto broker on its own port, with persistence in ``workdir``."""

    host: str
    port: int
    url: str

    def __init__(self, workdir: Path, *, port: int | None = None, extra_conf: str = "") -> None:
        self.workdir = Path(workdir).resolve()
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.url = f"mqtt://{self.host}:{self.port}"
        self.extra_conf = extra_conf
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        # Errors from before the log file is opened (bad config, port in use) only
        # reach stderr, so it is kept next to the log.
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @staticmethod
    def _binary() -> str:
        # /usr/sbin is often missing from a non-root PATH.
        found = os.environ.get("TEST_MOSQUITTO") or shutil.which("mosquitto")
        if found is None and Path("/usr/sbin/mosquitto").exists():
            found = "/usr/sbin/mosquitto"
        if found is None:
            raise ServiceError("mosquitto not found (install it or set TEST_MOSQUITTO)")
        return found

    def _config(self) -> str:
        # As root, Mosquitto switches to the `user` account after reading its config,
        # and that account must be able to write the persistence and log files. Naming
        # the account we already run as keeps the files ours (2.0 accepts `user root`
        # with a warning) and avoids chowning the workdir and every 0700 parent
        # directory pytest creates; as non-root the setting is ignored.
        user = pwd.getpwuid(os.geteuid()).pw_name
        return f"""\
listener {self.port} {self.host}
allow_anonymous true
user {user}

# A restart must keep persistent sessions, their subscriptions and the QoS 1 messages
# queued for them. The database is written at clean shutdown (SIGTERM) and every
# autosave_interval (default 1800 s), so kill() loses whatever changed since the last
# save, exactly like a real broker crash.
persistence true
persistence_location {self.workdir}/
persistence_file mosquitto.db

# Mosquitto silently drops messages for a subscriber more than max_queued_messages
# (default 1000) behind, logging only one notice per episode; we must never lose data.
# The count includes messages already in flight, and for an offline persistent
# session everything waiting counts, so it has to cover a whole backlog.
# max_queued_bytes 0 means no byte limit.
max_queued_messages 1000000
max_queued_bytes 0

# Outgoing QoS 1/2 messages in flight (sent, PUBACK not yet received) per client.
# The default of 20 would stall a subscriber that acks only after a batch commit.
# 0 means no broker-side limit. An MQTT v5 client that sends Receive Maximum in
# CONNECT gets that value instead (the broker honours it, up to 65535), so with 0 here
# the subscriber alone decides its window; without that property (or with MQTT 3.1.1)
# the window is unlimited, bounded in practice by 65535 packet identifiers.
max_inflight_messages 0
max_inflight_bytes 0

log_dest file {self.log_path}
# One type per line: Mosquitto 2.0 reads only one word per log_type line and
# `log_type error warning notice information` silently logs nothing at all.
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S

{self.extra_conf}
"""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self._config(), encoding="utf-8")
        # Readiness is "the log says running *after* this start" and not just "the port
        # accepts": if someone else owns the port, connecting succeeds while our broker
        # is exiting with "Address already in use".
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stderr = self.stderr_path.open("ab")
        self._proc = subprocess.Popen(
            [self._binary(), "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=self.workdir,
        )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise ServiceError(f"mosquitto on port {self.port} exited with {code}:\n{self.log_tail()}")
            if self._logged_running(log_offset) and _port_accepts(self.host, self.port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceError(
                    f"mosquitto did not accept connections on port {self.port} "
                    f"within {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return b" running" in log.read()
        except FileNotFoundError:
            return False

    def _reap(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._proc = None
        _running.discard(self)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        parts = [_tail(self.log_path, n), _tail(self.stderr_path, n)]
        return "\n".join(p for p in parts if p)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoServer({self.url}, workdir={self.workdir})"


def _pg_version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", bindir.parent.name)) or (0,)


def find_pg_bindir() -> Path:
    """The directory holding initdb, pg_ctl, postgres and psql of the PostgreSQL server.

    On Debian `pg_config` may come from libpq-dev and point at /usr/bin, which holds only
    wrapper scripts and no initdb; then the newest versioned server directory wins.
    """
    override = os.environ.get("TEST_PG_BINDIR")
    if override:
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out and (Path(out) / "initdb").exists() and (Path(out) / "pg_ctl").exists():
            return Path(out)
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not candidates:
        raise ServiceError("no PostgreSQL server binaries found (set TEST_PG_BINDIR)")
    return max(candidates, key=_pg_version_key)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A PostgreSQL cluster of its own in ``workdir/data``, listening on 127.0.0.1 only."""

    host: str
    port: int

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        preload: tuple[str, ...] = ("timescaledb",),
        settings: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        # Extra postgresql.conf settings (e.g. ssl), written as given.
        self.settings = dict(settings or {})
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.preload = preload
        self.datadir = self.workdir / "data"
        self.log_path = self.workdir / "postgres.log"
        self.bindir = find_pg_bindir()
        # PostgreSQL refuses to run as root, so as root the cluster belongs to the
        # `postgres` system account and every server-side command runs as that account.
        if os.geteuid() == 0:
            try:
                self._owner: pwd.struct_passwd | None = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServiceError("running as root needs a `postgres` system user") from exc
            self.user = "postgres"
        else:
            self._owner = None
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    # -- running commands -------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run_as_owner(self, args: list[str], timeout: float = 120.0) -> str:
        # subprocess drops privileges itself (setgid/setgroups/setuid in the child),
        # which avoids depending on runuser/sudo and on their PAM configuration.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        owner = self._owner
        if owner is not None:
            env["HOME"] = owner.pw_dir
            env["USER"] = env["LOGNAME"] = owner.pw_name
        proc = subprocess.run(
            args,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
        )
        if proc.returncode != 0:
            raise ServiceError(
                f"{' '.join(args)} failed with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                f"\n--- {self.log_path.name} ---\n{self.log_tail()}"
            )
        return proc.stdout

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql and return its unaligned, tuples-only output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(
            [
                self._bin("psql"),
                "-X",  # no ~/.psqlrc: tests must not depend on the developer's settings
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(dbname),
                "-c",
                sql,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise ServiceError(f"psql failed ({proc.returncode}) running {sql!r}:\n{proc.stderr}")
        return proc.stdout

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {_quote_ident(name)}")
        return self.dsn(name)

    # -- files and permissions --------------------------------------------------------

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._owner is None:
            return
        uid, gid = self._owner.pw_uid, self._owner.pw_gid
        os.chown(self.workdir, uid, gid)
        # The postgres account must also be able to traverse every parent directory,
        # and pytest makes its base temp directories 0700 root. Add only the
        # execute (search) bit for others: directory listings stay private.
        for parent in self.workdir.parents:
            st = parent.stat()
            if st.st_uid == uid:
                can_search = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == gid:
                can_search = bool(st.st_mode & stat.S_IXGRP)
            else:
                can_search = bool(st.st_mode & stat.S_IXOTH)
            if not can_search:
                parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _unix_socket_dir(self) -> str:
        # sun_path holds 107 bytes; pytest's tmp paths can be longer than that, and the
        # server would then refuse to start. Tests connect over TCP anyway.
        if len(f"{self.workdir}/.s.PGSQL.{self.port}.lock") > 100:
            return ""
        return str(self.workdir)

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self._unix_socket_dir()}'",
            "shared_preload_libraries": "'" + ",".join(self.preload) + "'",
            "timescaledb.telemetry_level": "off",
            "max_connections": "100",
            # Durability against an OS crash is not under test, so fsync can go;
            # synchronous_commit stays on because tests kill the server and check that
            # every acknowledged commit survived.
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "lc_messages": "'C'",
            **self.settings,
        }
        conf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        # Rewritten on every start so a changed port or preload list takes effect;
        # postgresql.conf includes it once, after all of initdb's settings.
        path = self.datadir / "ingestd_test.conf"
        path.write_text("# written by tests/services.py\n" + conf, encoding="utf-8")
        main_conf = self.datadir / "postgresql.conf"
        text = main_conf.read_text(encoding="utf-8")
        include = "include 'ingestd_test.conf'\n"
        if include not in text:
            main_conf.write_text(text + "\n" + include, encoding="utf-8")
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _initdb(self) -> None:
        self._run_as_owner(
            [
                self._bin("initdb"),
                "--pgdata",
                str(self.datadir),
                "--username",
                self.user,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",  # nothing to lose if the OS crashes mid-test
            ]
        )

    # -- lifecycle --------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        return int(first) if first.strip().isdigit() else None

    def _remove_stale_locks(self) -> None:
        # Left behind by kill(). PostgreSQL clears a lock file itself when the pid in it
        # is gone, but a killed postmaster stays a zombie until init reaps it, and
        # kill(pid, 0) succeeds on zombies: the new server would refuse to start with
        # "lock file ... already exists". Here we know the old server is dead.
        locks = [self.datadir / "postmaster.pid", self.workdir / f".s.PGSQL.{self.port}.lock"]
        for lock in locks:
            try:
                first = lock.read_text().split("\n", 1)[0].strip()
            except FileNotFoundError:
                continue
            if first.lstrip("-").isdigit() and not _pid_alive(abs(int(first))):
                lock.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def start(self, timeout: float = 60.0) -> None:
        self._prepare_workdir()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        self._write_config()
        if self.running:
            return
        self._remove_stale_locks()
        self._run_as_owner(
            [
                self._bin("pg_ctl"),
                "start",
                "--pgdata",
                str(self.datadir),
                "--log",
                str(self.log_path),
                "--wait",
                "--timeout",
                str(int(timeout)),
                "--silent",
            ],
            timeout=timeout + 10,
        )
        _running.add(self)
        # pg_ctl --wait returns once the postmaster reports "ready", but
        # confirm over the same TCP path the tests will use.
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(
                [
                    self._bin("pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    self.user,
                    "-d",
                    "postgres",
                ],
                check=False,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"postgres on port {self.port} not accepting connections after "
                    f"{timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            _running.discard(self)
            return
        self._run_as_owner(
            [
                self._bin("pg_ctl"),
                "stop",
                "--pgdata",
                str(self.datadir),
                "--mode",
                mode,
                "--wait",
                "--timeout",
                "60",
                "--silent",
            ],
            timeout=70,
        )
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, like a crash of the whole server.

        Only killing the postmaster would leave its backends serving open connections
        until each notices, and a restart would fail while they still hold the old
        shared memory. The postmaster dies first so it cannot start crash recovery
        (and restart children) when it sees them die.
        """
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        # Freeze the postmaster first so it cannot fork a new child (autovacuum,
        # a backend for an incoming connection) between listing and killing them.
        os.kill(pid, signal.SIGSTOP)
        children = _children_of(pid)
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _wait_until_gone([pid, *children], timeout=10.0)
        _running.discard(self)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresServer({self.dsn()}, workdir={self.workdir})"
