"""The simulator behaves as meters do: sequence state survives a clean restart, and an
unclean one starts a new epoch rather than reusing seqs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import orjson

from ingestd.simulator import Faults, Fleet, KeyFactory, build_fleet, save_state
from services import MosquittoServer


def test_clean_restart_continues_the_sequence(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq, fleet[1].seq = 7, 9
    save_state(fleet, tmp_path, clean=True)
    again = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert [(m.epoch, m.seq) for m in again] == [(0, 7), (0, 9)]
    assert again[0].signer.key.public_key() == fleet[0].signer.key.public_key()  # same key from disk


def test_unclean_stop_starts_a_new_epoch(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq = 7
    save_state(fleet, tmp_path)  # as at start-up; the run then died
    again = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert (again[0].epoch, again[0].seq) == (1, 0)
    assert again[0].next_body(datetime.now(UTC), random.Random(1))["seq"] == 1


async def test_tamper_opens_then_closes_the_cover(broker: MosquittoServer, key_factory: KeyFactory) -> None:
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        fleet = Fleet(client, meters, topic_prefix="meters", headend=None, faults=Faults(tamper=1.0))
        for _ in range(3):
            await fleet.tick(meters[0])
    codes = [[e["code"] for e in body.get("events", [])] for _, body in meters[0].flash.values()]
    assert codes == [["003"], ["004"], ["003"]]
    assert fleet.stats.published == 3


async def test_simulate_reconnects_when_the_broker_goes_away(broker: MosquittoServer, tmp_path: Path) -> None:
    """`ingestd simulate` is a fleet of meters: a broker restart must not end it (nor print
    an ExceptionGroup traceback); it reconnects and publishes on, and every line it logs is
    JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env |= {
        "INGESTD_MQTT_URL": broker.url,
        "INGESTD_MQTT_RECONNECT_INITIAL_S": "0.1",
        "INGESTD_MQTT_RECONNECT_MAX_S": "0.5",
        "INGESTD_LOG_FORMAT": "json",
    }
    args = ["--meters", "2", "--interval", "0.2", "--algs", "EdDSA", "--no-register"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd.cli", "simulate", *args, "--state", str(tmp_path / "state"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert await heard_from_fleet(broker), "the fleet published nothing"
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(0.5)  # the broker is away for a while; meters keep trying
        assert proc.returncode is None, "simulate exited when the broker went away"
        await asyncio.to_thread(broker.start)
        assert await heard_from_fleet(broker), "the fleet did not publish again after the restart"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    for line in lines:
        orjson.loads(line)  # JSON, every one: no traceback
    events = [orjson.loads(line)["event"] for line in lines]
    assert "simulator_broker_lost" in events
    assert events[-1] == "simulator_done"


async def heard_from_fleet(broker: MosquittoServer) -> bool:
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("meters/+/up", qos=1)
        try:
            async with asyncio.timeout(10):
                await anext(client.messages)
        except TimeoutError:
            return False
    return True
