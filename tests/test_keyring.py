"""Keys on demand: the cache holds the keys of meters that talk, loaded when a message first
names them, and is kept current by a cheap fingerprint check rather than a reload of the
fleet's keys."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from conftest import running_daemon
from helpers import metric, publish, wait_until
from ingestd.config import Config
from ingestd.keyring import Keyring
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from services import MosquittoServer

FLEET = 200


async def test_the_daemon_starts_with_no_key_and_loads_those_of_meters_that_talk(
    config: Config, broker: MosquittoServer, store: Store, key_factory: KeyFactory
) -> None:
    meters = build_fleet(FLEET, prefix="DMD-", interval_s=60, algs=("ES256", "EdDSA"), keys=key_factory)
    assert await register_fleet(store, meters) == FLEET
    talking = meters[:3]
    rng = random.Random(1)
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        assert metric(registry, "ingestd_keys_loaded") == 0, "start-up loaded the fleet's keys"
        messages = [
            (f"{config.mqtt.topic_prefix}/{m.meter_id}/up", m.sign(m.next_body(datetime.now(UTC), rng)))
            for m in talking
        ]
        await publish(broker.host, broker.port, messages)
        await wait_until(
            lambda: metric(registry, "ingestd_messages_accepted_total") == len(messages), what="accepted"
        )
        assert metric(registry, "ingestd_keys_loaded") == len(talking)
        assert (
            sum(metric(registry, "ingestd_messages_rejected_total", reason=r) for r in ("unknown_key",)) == 0
        )


async def test_the_check_reloads_only_changed_or_deleted_keys(store: Store, key_factory: KeyFactory) -> None:
    meters = build_fleet(3, prefix="CHK-", interval_s=60, algs=("ES256",), keys=key_factory)
    await register_fleet(store, meters)
    kids = [m.signer.kid for m in meters]
    keyring = Keyring(store)
    assert await keyring.fetch(kids)
    assert len(keyring) == 3
    assert await keyring.check() == 0, "nothing changed, nothing to reload"

    # Changed behind the cache's back (a notification missed while the listener was down).
    assert await store.revoke_key(kids[0])
    async with store.connection() as conn:
        await conn.execute("DELETE FROM meter_keys WHERE kid = $1", kids[1])
    assert await keyring.check() == 2
    revoked = keyring.get(kids[0])
    assert revoked is not None
    assert revoked.revoked_at is not None
    assert keyring.get(kids[1]) is None
    assert keyring.get(kids[2]) is not None
    assert await keyring.check() == 0


async def test_a_notification_for_a_key_not_in_use_loads_nothing(
    store: Store, key_factory: KeyFactory
) -> None:
    meters = build_fleet(2, prefix="NTF-", interval_s=60, algs=("ES256",), keys=key_factory)
    await register_fleet(store, meters)
    keyring = Keyring(store)
    assert await keyring.fetch([meters[0].signer.kid])
    keyring.changed(meters[1].signer.kid)
    await keyring._reload({meters[1].signer.kid})
    assert len(keyring) == 1
    assert keyring.get(meters[1].signer.kid) is None
