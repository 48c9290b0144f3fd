"""Retained garbage on a meter's uplink, through the real broker, daemon and database: it is
quarantined once, not again on every reconnect (issue 9, defect 7)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import aiomqtt

from conftest import running_daemon
from helpers import publish, wait_settled
from ingestd.config import Config

if TYPE_CHECKING:
    import asyncpg

    Conn = asyncpg.Connection[asyncpg.Record]

GARBAGE = b"retained garbage"


async def publish_retained(config: Config, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        identifier=f"meter-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def quarantined(db: Conn) -> list[tuple[str, bytes]]:
    rows = await db.fetch("SELECT reason, payload FROM quarantine ORDER BY id")
    return [(r["reason"], r["payload"]) for r in rows]


async def test_retained_garbage_is_quarantined_once_across_reconnects(config: Config, db: Conn) -> None:
    async with running_daemon(config) as daemon:
        await publish_retained(config, "meters/M1/up", GARBAGE)
        await wait_settled(daemon.metrics.registry, 1)
    # Each start is a new connection that subscribes again, to the same session.
    for run in range(2):
        async with running_daemon(config) as daemon:
            # The broker sends retained messages right after the SUBACK: before this marker.
            await publish(config.mqtt.host, config.mqtt.port, [("meters/M2/up", f"marker {run}".encode())])
            await wait_settled(daemon.metrics.registry, 1)
    # Clearing it (an empty retained message) arrives once, live, like any other message.
    async with running_daemon(config) as daemon:
        await publish_retained(config, "meters/M1/up", b"")
        await wait_settled(daemon.metrics.registry, 1)
    assert await quarantined(db) == [
        ("bad_json", GARBAGE),
        ("bad_json", b"marker 0"),
        ("bad_json", b"marker 1"),
        ("bad_json", b""),
    ]
