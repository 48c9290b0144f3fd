"""Backfill end to end: real broker, real database, the daemon, and a simulated fleet that
loses uplinks, goes offline and forgets some of its flash."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import pytest

from conftest import running_daemon
from helpers import metric, wait_until
from ingestd.config import Config, GapsConfig, HeadendConfig
from ingestd.daemon import Daemon
from ingestd.envelope import parse_time
from ingestd.signature import Signer, generate_private_key, private_key_pem
from ingestd.simulator import Faults, Fleet, HeadendKey, KeyFactory, VirtualMeter, build_fleet, register_fleet
from ingestd.store import Store

FAST_GAPS = GapsConfig(grace_s=0.3, retry_initial_s=0.5, retry_max_s=1.0, poll_s=0.1)


@pytest.fixture
def headend(tmp_path: Path) -> tuple[HeadendConfig, HeadendKey]:
    key = generate_private_key("ES256")
    path = tmp_path / "headend.pem"
    path.write_bytes(private_key_pem(key))
    return HeadendConfig(key_file=str(path), kid="headend-test"), HeadendKey(
        "headend-test", "ES256", key.public_key()
    )


def with_gaps(config: Config, headend: HeadendConfig, gaps: GapsConfig = FAST_GAPS, **mqtt: object) -> Config:
    return dataclasses.replace(
        config,
        gaps=gaps,
        headend=headend,
        mqtt=dataclasses.replace(config.mqtt, **mqtt),  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def fleet_client(
    config: Config, meters: list[VirtualMeter], key: HeadendKey, faults: Faults
) -> AsyncIterator[Fleet]:
    async with aiomqtt.Client(
        config.mqtt.host,
        config.mqtt.port,
        identifier=f"fleet-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        fleet = Fleet(
            client, meters, topic_prefix=config.mqtt.topic_prefix, headend=key, faults=faults, seed=5
        )
        task = asyncio.create_task(fleet.serve_replays())
        try:
            yield fleet
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def heard_from_once_more(fleet: Fleet, meters: list[VirtualMeter]) -> None:
    """One more message from each meter, never lost: a gap at the very end of a sequence
    shows only when a later seq arrives."""
    for meter in meters:
        meter.offline_until = None
        await fleet.send(meter, meter.next_body(datetime.now(UTC), fleet.rng))


def created(meters: list[VirtualMeter]) -> dict[tuple[str, int, int], str | None]:
    """Every message the meters ever created: (meter, epoch, seq) -> its reading time."""
    out: dict[tuple[str, int, int], str | None] = {}
    for m in meters:
        for (epoch, seq), (_, body) in m.flash.items():
            readings = body["readings"]
            out[(m.meter_id, epoch, seq)] = readings[0]["t"] if readings else None
    return out


def note_deliveries(fleet: Fleet) -> dict[tuple[str, int, int], str | None]:
    """Every message the fleet publishes from now on: (meter, epoch, seq) -> its reading time."""
    delivered: dict[tuple[str, int, int], str | None] = {}
    send = fleet.send

    async def send_and_note(meter: VirtualMeter, body: dict[str, Any]) -> None:
        await send(meter, body)
        readings = body["readings"]
        delivered[(meter.meter_id, body["epoch"], body["seq"])] = readings[0]["t"] if readings else None

    fleet.send = send_and_note  # type: ignore[method-assign]
    return delivered


async def settled(db: asyncpg.Connection[asyncpg.Record], expected: set[tuple[str, int, int]]) -> bool:
    """Every created message is stored or in a lost range, and no gap is open."""
    if await db.fetchval("SELECT count(*) FROM gaps WHERE status IN ('open', 'requested')"):
        return False
    stored = {(r[0], r[1], r[2]) for r in await db.fetch("SELECT meter_id, epoch, seq FROM message_seqs")}
    lost = await db.fetch("SELECT meter_id, epoch, from_seq, to_seq FROM gaps WHERE status = 'lost'")
    lost_keys = {(r[0], r[1], s) for r in lost for s in range(r[2], r[3] + 1)}
    return expected <= stored | lost_keys


async def poll(
    db: asyncpg.Connection[asyncpg.Record],
    expected: set[tuple[str, int, int]],
    within_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await settled(db, expected):
        if loop.time() > deadline:
            active = await db.fetch("SELECT * FROM gaps WHERE status IN ('open', 'requested')")
            stored = {
                (r[0], r[1], r[2]) for r in await db.fetch("SELECT meter_id, epoch, seq FROM message_seqs")
            }
            raise AssertionError(
                f"backfill did not complete: active gaps {[dict(r) for r in active]}, "
                f"not stored {sorted(expected - stored)[:20]}"
            )
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_lossy_fleet_ends_complete_and_exact(
    config: Config,
    store: Store,
    db: asyncpg.Connection[asyncpg.Record],
    key_factory: KeyFactory,
    headend: tuple[HeadendConfig, HeadendKey],
) -> None:
    cfg = with_gaps(config, headend[0])
    meters = build_fleet(12, prefix="BF-", algs=("ES256", "EdDSA"), interval_s=60, keys=key_factory)
    await register_fleet(store, meters)
    faults = Faults(drop=0.05, forget=0.15)
    async with running_daemon(cfg) as daemon, fleet_client(cfg, meters, headend[1], faults) as fleet:
        delivered = note_deliveries(fleet)
        for round_ in range(40):
            for i, meter in enumerate(meters):
                # Meters 0-2 lose connectivity for rounds 10-24: they keep metering into flash.
                meter.offline_until = (
                    datetime.max.replace(tzinfo=UTC) if i < 3 and 10 <= round_ < 25 else None
                )
                await fleet.tick(meter)
        await heard_from_once_more(fleet, meters)
        # Every seq each meter created, including those it later forgot.
        expected = {(m.meter_id, 0, s) for m in meters for s in range(1, m.seq + 1)}
        await poll(db, expected, within_s=90)
        await daemon_gauges(daemon)
        registry = daemon.metrics.registry

        assert fleet.stats.dropped > 0, "the test must actually lose messages"
        assert fleet.stats.replayed > 0
        lost = await db.fetch("SELECT meter_id, epoch, from_seq, to_seq FROM gaps WHERE status = 'lost'")
        filled = await db.fetchval("SELECT count(*) FROM gaps WHERE status = 'filled'")
        assert metric(registry, "ingestd_gaps_lost_total") == len(lost)
        assert metric(registry, "ingestd_gaps_filled_total") == filled
        assert metric(registry, "ingestd_gaps_open") == 0
        assert metric(registry, "ingestd_gap_seqs_missing") == 0
        assert (
            metric(registry, "ingestd_replay_requests_total")
            == fleet.stats.requests + fleet.stats.unreachable_requests
        )
        assert metric(registry, "ingestd_gap_fill_seconds_count") == filled
        assert fleet.stats.forged_requests == 0

    # Lost is exactly what was neither stored nor still in a meter's flash (answered 010).
    lost_keys = {(r[0], r[1], s) for r in lost for s in range(r[2], r[3] + 1)}
    # A request can reach a meter while the replay it already sent is still being stored
    # (the ledger said the seq was missing): the meter may then forget that message and
    # answer 010. It was delivered all the same, and is stored.
    have = {**delivered, **created(meters)}
    stored_keys = {
        (r[0], r[1], r[2]) for r in await db.fetch("SELECT meter_id, epoch, seq FROM message_seqs")
    }
    assert lost_keys, "the fleet must have forgotten something"
    assert lost_keys == expected - stored_keys
    assert not lost_keys & set(have)
    # Every reading a meter still holds or delivered is stored exactly once.
    rows = await db.fetch("SELECT meter_id, time FROM readings")
    stored = [(r["meter_id"], r["time"]) for r in rows]
    assert len(stored) == len(set(stored))
    wanted = {(k[0], parse_time(t)) for k, t in have.items() if t is not None and k not in lost_keys}
    assert set(stored) == wanted
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == await db.fetchval(
        "SELECT count(*) FROM message_seqs"
    )
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0


async def daemon_gauges(daemon: Daemon) -> None:
    """The gauges are refreshed by the requester's round; wait for one after settling."""
    registry = daemon.metrics.registry
    await wait_until(lambda: metric(registry, "ingestd_gaps_open") == 0, within_s=10, what="gauges refreshed")


async def test_forged_replay_request_is_refused(
    config: Config, key_factory: KeyFactory, headend: tuple[HeadendConfig, HeadendKey]
) -> None:
    meters = build_fleet(1, prefix="FG-", algs=("ES256",), keys=key_factory)
    async with fleet_client(config, meters, headend[1], Faults()) as fleet:
        await fleet.tick(meters[0])
        forger = Signer("ES256", headend[1].kid, generate_private_key("ES256"))  # right kid, wrong key
        body = (
            b'{"v":1,"meter":"FG-000001","req":"x","epoch":0,"from_seq":1,"to_seq":1,'
            b'"sent":"2026-11-24T00:00:00Z"}'
        )
        async with aiomqtt.Client(
            config.mqtt.host, config.mqtt.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as attacker:
            await attacker.publish("meters/FG-000001/down/replay", forger.sign_body(body), qos=1)
        await wait_until(lambda: fleet.stats.forged_requests == 1, what="forged request seen")
        assert fleet.stats.requests == 0
        assert fleet.stats.replayed == 0
        assert fleet.stats.published == 1


@pytest.mark.slow
async def test_two_instances_on_a_shared_subscription(
    config: Config,
    store: Store,
    db: asyncpg.Connection[asyncpg.Record],
    key_factory: KeyFactory,
    headend: tuple[HeadendConfig, HeadendKey],
) -> None:
    # Retries far apart: within this test, any second request for a range is a duplicate.
    gaps = dataclasses.replace(FAST_GAPS, retry_initial_s=600, retry_max_s=600)
    a = with_gaps(
        config, headend[0], gaps, shared_group="ingest", client_id=f"ingestd-a-{uuid.uuid4().hex[:6]}"
    )
    b = with_gaps(
        config, headend[0], gaps, shared_group="ingest", client_id=f"ingestd-b-{uuid.uuid4().hex[:6]}"
    )
    b = dataclasses.replace(b, metrics=dataclasses.replace(b.metrics, addr="127.0.0.1:0"))
    meters = build_fleet(10, prefix="SH-", algs=("ES256", "EdDSA"), keys=key_factory)
    await register_fleet(store, meters)
    async with (
        running_daemon(a) as da,
        running_daemon(b) as db_,
        fleet_client(a, meters, headend[1], Faults(drop=0.1)) as fleet,
    ):
        for _ in range(30):
            for meter in meters:
                await fleet.tick(meter)
        await heard_from_once_more(fleet, meters)
        expected = {(m.meter_id, 0, s) for m in meters for s in range(1, m.seq + 1)}
        await poll(db, expected, within_s=60)
        received_a = metric(da.metrics.registry, "ingestd_messages_received_total")
        received_b = metric(db_.metrics.registry, "ingestd_messages_received_total")
    assert received_a > 0
    assert received_b > 0, "both instances must take part"
    ranges = [(r[0], r[1], r[2], r[3]) for r in fleet.stats.request_log]
    assert ranges, "the fleet must have lost something to ask for"
    assert len(ranges) == len(set(ranges)), "a gap was requested twice"
    rows = await db.fetch("SELECT meter_id, time FROM readings")
    assert len(rows) == len({(r[0], r[1]) for r in rows}) == len(expected)
