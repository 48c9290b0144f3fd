"""The verifier's cache of registered meter keys, kept current from the database.

Read and updated on the event loop only (the verification workers get the key itself with
each request): entries are immutable and replaced whole, so a batch sees either the old
key or the new one, never a mixture.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Final

import asyncpg
import structlog

from ingestd.envelope import MeterKey
from ingestd.faults import describe
from ingestd.store import CONNECTION_ERRORS, Store

log = structlog.get_logger("ingestd.keyring")

# A kid that the database does not know is not asked for again for this long, so that a
# flood of messages with invented kids costs one query, not one per message.
NEGATIVE_TTL_S: Final = 10.0


class Keyring:
    def __init__(self, store: Store, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._keys: dict[str, MeterKey] = {}
        self._missing: dict[str, float] = {}
        self._monotonic = monotonic
        self._changed: set[str] = set()
        self._resync = False
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, kid: str, /) -> MeterKey | None:
        return self._keys.get(kid)

    async def load_all(self) -> None:
        keys = await self._store.load_keys()
        self._keys = {k.kid: k for k in keys}
        self._missing.clear()

    async def fetch(self, kids: Iterable[str]) -> bool:
        """Look up kids not in the cache; True when any was found."""
        now = self._monotonic()
        wanted = [
            kid
            for kid in set(kids)
            if kid not in self._keys and now - self._missing.get(kid, -NEGATIVE_TTL_S) >= NEGATIVE_TTL_S
        ]
        if not wanted:
            return False
        found = {k.kid: k for k in await self._store.load_keys(wanted)}
        for kid in wanted:
            if kid in found:
                self._keys[kid] = found[kid]
                self._missing.pop(kid, None)
            else:
                self._missing[kid] = now
        return bool(found)

    def changed(self, kid: str) -> None:
        """A key was added, rotated, revoked or deleted (from the database's NOTIFY)."""
        self._changed.add(kid)
        self._missing.pop(kid, None)
        self._wakeup.set()

    def resync(self) -> None:
        """Notifications may have been missed: reload every key at the next wake-up."""
        self._resync = True
        self._wakeup.set()

    async def watch(self, refresh_s: float) -> None:
        """Apply changes as they are announced, and reload everything every ``refresh_s``
        (a safety net for a notification missed while the listening connection was down)."""
        loop = asyncio.get_running_loop()
        next_full = loop.time() + refresh_s
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_full - loop.time())):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                if self._resync or loop.time() >= next_full:
                    self._resync = False
                    await self.load_all()
                    self._changed.clear()
                    next_full = loop.time() + refresh_s
                elif self._changed:
                    kids, self._changed = self._changed, set()
                    await self._reload(kids)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Whatever the database says (a lost connection, a full lock table): the
                # cache as it is serves on, and the reload is tried again soon.
                log.warning("keyring_refresh_failed", error=describe(exc))
                next_full = loop.time() + min(refresh_s, 5.0)

    async def _reload(self, kids: set[str]) -> None:
        found = {k.kid: k for k in await self._store.load_keys(sorted(kids))}
        for kid in kids:
            if kid in found:
                self._keys[kid] = found[kid]
            else:
                self._keys.pop(kid, None)
        log.info("keys_reloaded", kids=sorted(kids))
