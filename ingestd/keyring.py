"""The verifier's cache of registered meter keys, kept current from the database.

Keys are loaded on demand: the first message that names a kid not in the cache makes the
pipeline look it up (``fetch``), so memory and start-up grow with the meters that talk,
not with the fleet registered. A NOTIFY from the database (``changed``) reloads a cached
key at once; a periodic check (``watch``) and a check after the listener reconnects
compare a fingerprint of every cached key's row with the database and reload only those
that differ, so a missed notification costs one cheap query, never a reload of the fleet.

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
# Past this many remembered unknown kids, the expired ones are dropped.
MISSING_MAX: Final = 10_000


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
        if len(self._missing) > MISSING_MAX:
            # Invented kids must not grow memory for ever: forget those past their TTL.
            self._missing = {k: t for k, t in self._missing.items() if now - t < NEGATIVE_TTL_S}
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
        """Notifications may have been missed: check every cached key at the next wake-up."""
        self._resync = True
        self._wakeup.set()

    async def watch(self, refresh_s: float) -> None:
        """Apply changes as they are announced, and check every cached key against the
        database every ``refresh_s`` (a safety net for a notification missed while the
        listening connection was down)."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + refresh_s
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_check - loop.time())):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                if self._resync or loop.time() >= next_check:
                    self._resync = False
                    self._changed.clear()
                    await self.check()
                    next_check = loop.time() + refresh_s
                elif self._changed:
                    kids, self._changed = self._changed, set()
                    await self._reload(kids)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Whatever the database says (a lost connection, a full lock table): the
                # cache as it is serves on, and the check is tried again soon.
                log.warning("keyring_refresh_failed", error=describe(exc))
                self._resync = True
                next_check = loop.time() + min(refresh_s, 5.0)

    async def check(self) -> int:
        """Reload the cached keys whose row changed or went; returns how many."""
        if not self._keys:
            return 0
        current = await self._store.key_fingerprints(list(self._keys))
        stale = {kid for kid, key in self._keys.items() if current.get(kid) != key.fingerprint}
        if stale:
            await self._reload(stale)
        return len(stale)

    async def _reload(self, kids: set[str]) -> None:
        # Only keys in use are kept current; one not cached is loaded when a message needs it.
        wanted = sorted(kid for kid in kids if kid in self._keys)
        if not wanted:
            return
        found = {k.kid: k for k in await self._store.load_keys(wanted)}
        for kid in wanted:
            if kid in found:
                self._keys[kid] = found[kid]
            else:
                self._keys.pop(kid, None)
        log.info("keys_reloaded", kids=wanted)
