"""Health through the real broker, pipeline and daemon: tamper events counted exactly once,
power losses classified by the daemon's health task, ingestd_meters{flag} exported."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from conftest import running_daemon
from helpers import metric, publish, wait_settled, wait_until
from ingestd.config import Config
from ingestd.envelope import format_time
from ingestd.events import TAMPER_CODES
from ingestd.simulator import KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]


def message(meter: VirtualMeter, *codes: str, at: datetime) -> tuple[str, bytes]:
    meter.seq += 1
    body: dict[str, Any] = {
        "v": 1,
        "meter": meter.meter_id,
        "epoch": 0,
        "seq": meter.seq,
        "sent": format_time(at),
        "replay": False,
        "events": [{"t": format_time(at - timedelta(seconds=i)), "code": c} for i, c in enumerate(codes)],
    }
    return f"meters/{meter.meter_id}/up", meter.sign(body)


async def test_tamper_events_counted_and_power_losses_classified(
    config: Config, store: Store, db: Conn, key_factory: KeyFactory
) -> None:
    # Three meters of one site: a power loss at one of them alone is isolated.
    fleet = build_fleet(3, prefix="HE-", algs=("ES256",), keys=key_factory, per_site=3)
    await register_fleet(store, fleet)
    a, b, _c = fleet
    now = datetime.now(UTC)
    first = message(a, "003", "004", "099", at=now)
    messages = [
        first,
        message(a, "005", "007", "003", at=now),
        message(b, "014", "015", "011", "013", at=now),
        message(b, "001", at=now),
        first,  # a redelivery: a duplicate, its events not counted again
    ]
    # A window of one second, so that the power loss is classified a second after it
    # arrived. (The daemon goes by the database's clock: a host clock set ahead would not
    # hurry it.)
    config = dataclasses.replace(
        config, flags=dataclasses.replace(config.flags, refresh_s=1, isolation_window_s=1)
    )
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, messages)
        await wait_settled(registry, len(messages))
        assert metric(registry, "ingestd_messages_duplicate_total") == 1
        expected = {"003": 2, "005": 1, "007": 1, "011": 1, "013": 1, "014": 1, "015": 1}
        for code in TAMPER_CODES:
            assert metric(registry, "ingestd_tamper_events_total", code=code) == expected[code], code
        assert metric(registry, "ingestd_tamper_events_total", code="004") == 0
        assert metric(registry, "ingestd_events_total", code="004") == 1
        assert metric(registry, "ingestd_events_total", code="unknown") == 1
        await wait_until(
            lambda: metric(registry, "ingestd_isolated_power_loss_total") == 1,
            what="the power loss classified as isolated",
        )
        # Every registered meter has a flag (none heard yet, until the writer records it
        # in meter_epochs, is `never`).
        await wait_until(
            lambda: (
                sum(metric(registry, "ingestd_meters", flag=f) for f in ("ok", "gray", "red", "never")) == 3
            ),
            what="ingestd_meters refreshed",
        )
    detail = await db.fetchval("SELECT detail::text FROM events WHERE code = '001'")
    assert orjson.loads(detail) == {"isolated": True, "site_meters": 2, "site_power_losses": 0}
    assert await db.fetchval("SELECT count(*) FROM events WHERE code = ANY($1)", sorted(TAMPER_CODES)) == 8
    assert await db.fetchval("SELECT gray_after FROM health_settings") == timedelta(hours=48)
