"""The daemon's lifecycle on the real broker: the retained head-end state."""

from __future__ import annotations

import asyncio

from conftest import running_daemon
from helpers import retained_state, wait_until
from ingestd.config import Config
from ingestd.daemon import Daemon
from services import MosquittoServer


async def test_state_is_online_while_running_and_offline_after_a_clean_stop(config: Config) -> None:
    async with running_daemon(config):
        assert (await retained_state(config.mqtt.host, config.mqtt.port, config.headend.instance))[
            "online"
        ] is True
    assert (await retained_state(config.mqtt.host, config.mqtt.port, config.headend.instance))[
        "online"
    ] is False


async def test_stop_while_the_broker_is_unreachable_is_prompt(
    config: Config, broker: MosquittoServer
) -> None:
    broker.stop()
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    await wait_until(lambda: daemon.metrics_port is not None, what="daemon started")
    assert not daemon.ready.is_set()
    daemon.should_exit.set()
    async with asyncio.timeout(10):
        await task
    assert not daemon.ready.is_set()
