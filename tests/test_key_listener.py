"""Key changes reach a running daemon through NOTIFY, also after the database restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from conftest import pg_workdir
from helpers import wait_until
from ingestd.config import DatabaseConfig
from ingestd.signature import generate_private_key, public_key_pem
from ingestd.store import Store
from services import PostgresServer


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    with pg_workdir() as workdir, PostgresServer(workdir) as server:
        yield server


async def add_key(store: Store, kid: str) -> None:
    pem = public_key_pem(generate_private_key("EdDSA").public_key()).decode()
    await store.add_meter("M-1", alg="EdDSA", kid=kid, public_key_pem=pem, site=None, interval_s=None)


async def listening(store: Store) -> None:
    """Wait until a session of the database is LISTENing for key changes."""
    for _ in range(500):
        async with store.connection() as conn:
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%ingestd_keys%'"
            ):
                return
        await asyncio.sleep(0.02)
    raise AssertionError("no session listens for key changes")


async def test_notifications_resume_after_a_database_restart(own_pg: PostgresServer) -> None:
    url = own_pg.create_database("keys")
    changed: list[str] = []
    resyncs: list[int] = []
    async with Store(DatabaseConfig(url=url)) as store:
        await store.migrate()
        task = asyncio.create_task(
            store.listen_keys(
                changed.append, lambda: resyncs.append(1), retry_initial_s=0.05, retry_max_s=0.2
            )
        )
        try:
            await listening(store)
            await add_key(store, "k1")
            await wait_until(lambda: "k1" in changed, what="first notification")
            assert resyncs == []

            await asyncio.to_thread(own_pg.restart)
            await wait_until(lambda: resyncs == [1], within_s=20, what="listener reconnected")
            await listening(store)
            await add_key(store, "k2")
            await wait_until(lambda: "k2" in changed, within_s=10, what="notification after restart")
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
