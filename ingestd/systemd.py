"""systemd integration without a dependency: the sd_notify(3) protocol and the watchdog.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` datagrams to
it: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1``
when it begins to shut down, and ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``.

The watchdog is pinged by a task on the event loop, not by a thread: if the loop is stuck
(a blocking call, a busy loop), the pings stop and systemd kills and restarts the
service, which is what the watchdog is for. Sends never block: the socket is
non-blocking, a datagram is a few bytes, and one that cannot be sent is dropped.
Without ``$NOTIFY_SOCKET`` (not under systemd, or not ``Type=notify``) everything is a
no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

import structlog

log = structlog.get_logger("ingestd.systemd")

# How often STATUS= is refreshed by keep_status (sent only when it changed).
STATUS_EVERY_S = 5.0


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value, None if it is not one we speak."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace: a leading NUL byte
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:CID:PORT (systemd 254+ in VMs): not for a host daemon


def watchdog_interval_s(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout from ``$WATCHDOG_USEC``, or None when there is none for us
    (unset, invalid, zero, or ``$WATCHDOG_PID`` naming another process)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=usec)
        return None
    if value <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("watchdog_pid_invalid", value=owner)
            return None
    return value / 1_000_000


class Notifier:
    """``async with Notifier() as n: ... n.ready() ...``; methods return whether the
    message was sent (False when disabled or the send failed) and never raise."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("notify_socket_unsupported", value=raw)
        self.watchdog_s = watchdog_interval_s(env) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    async def __aenter__(self) -> Self:
        if self._address is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)  # noqa: FBT003 - the stdlib's signature
            self._sock = sock
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # BlockingIOError too: systemd is not reading; drop it
            if not self._failing:  # once per run of failures, not once per ping
                log.warning("sd_notify_failed", error=str(exc) or type(exc).__name__)
                self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status_field(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog at half its interval, for as long as the loop runs; returns
        at once when systemd set no watchdog for us."""
        if self.watchdog_s is None or self._sock is None:
            return
        log.info("watchdog_enabled", interval_s=self.watchdog_s)
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_s / 2)

    async def keep_status(self, describe: Callable[[], str], every_s: float = STATUS_EVERY_S) -> None:
        """Send ``STATUS=describe()`` every ``every_s`` when it changed; returns at once
        when disabled."""
        if self._sock is None:
            return
        while True:
            text = describe()
            if text != self._last_status:
                self.status(text)
            await asyncio.sleep(every_s)

    def _status_field(self, text: str | None) -> list[str]:
        if text is None:
            return []
        # One line: a newline would start another field of the message.
        self._last_status = " ".join(text.splitlines())
        return [f"STATUS={self._last_status}"]
