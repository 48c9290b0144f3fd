"""Starting in front of a backlog: the broker kept our session and sends its queue straight
after the CONNACK, ahead of its answers to our SUBSCRIBE and state PUBLISH. With intake
paused at max_pending those answers are not read for a while; before, the client's 10 s
timeout then ended the session, everything unacknowledged was delivered again, and on a
host too slow to drain max_pending in 10 s the backlog never drained at all."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from test_db_faults import FAULT_TRIGGERS

from conftest import running_daemon
from helpers import metric, publish, wait_until
from ingestd.config import Config
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from services import MosquittoServer

if TYPE_CHECKING:
    import asyncpg

    Conn = asyncpg.Connection[asyncpg.Record]

pytestmark = pytest.mark.slow

METERS = 20
BACKLOG = 1500
MAX_PENDING = 200
# The database takes about 100 messages a second: the backlog needs 15 s, longer than the
# client's 10 s timeout for an answer from the broker.
SLEEP_PER_ROW_S = 0.01


async def test_a_backlog_many_times_max_pending_drains_without_a_reconnect(
    config: Config, broker: MosquittoServer, db: Conn, key_factory: KeyFactory
) -> None:
    cfg = dataclasses.replace(
        config, ingest=dataclasses.replace(config.ingest, max_pending=MAX_PENDING, batch_max=100)
    )
    meters = build_fleet(METERS, prefix="BKL-", interval_s=60, algs=("ES256",), keys=key_factory)
    async with Store(cfg.database) as store:
        await register_fleet(store, meters)
    # A first run makes the persistent session; the backlog then queues at the broker.
    async with running_daemon(cfg):
        pass
    rng = random.Random(5)
    start = datetime.now(UTC) - timedelta(days=2)
    backlog = [
        (f"{cfg.mqtt.topic_prefix}/{m.meter_id}/up", m.sign(m.next_body(start + timedelta(minutes=i), rng)))
        for i in range(BACKLOG // METERS)
        for m in meters
    ]
    await publish(broker.host, broker.port, backlog)
    await db.execute(FAULT_TRIGGERS)
    await db.execute(
        "INSERT INTO fault_switch (tbl, sqlstate, message, sleep_per_row_s) "
        "VALUES ('message_seqs', '00000', 'slow', $1)",
        SLEEP_PER_ROW_S,
    )

    async with running_daemon(cfg) as daemon:
        registry = daemon.metrics.registry
        await wait_until(
            lambda: metric(registry, "ingestd_messages_accepted_total") == len(backlog),
            within_s=120,
            what="the backlog stored",
        )
        assert metric(registry, "ingestd_mqtt_disconnects_total") == 0
        # No session ended, so nothing was delivered twice.
        assert metric(registry, "ingestd_messages_received_total") == len(backlog)
        assert metric(registry, "ingestd_messages_duplicate_total") == 0
        assert metric(registry, "ingestd_mqtt_connected") == 1
    assert await db.fetchval("SELECT count(*) FROM message_seqs") == len(backlog)
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
