"""The paho/aiomqtt seam of the broker link (ingestd.mqtt), on a real client and broker.

The link reaches private names of the pinned paho and aiomqtt (pyproject.toml caps
both). These tests fail if, on the installed versions, a fast path is not in effect:
the fast receive path, the batched acknowledgement, the keepalive guard, or the
``on_connect`` wrapper that reads whether the broker kept our session. And when one is
missing, the link says so (a warning, ``ingestd_mqtt_fast_path{path}`` at 0) and its
fallback still delivers and acknowledges every message.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType

import paho.mqtt.client as paho
import pytest
from structlog.testing import capture_logs
from test_mqtt import (
    WITHIN_S,
    Recorder,
    assert_nothing_redelivered,
    mqtt_config,
    reconnect,
    running,
    uplinks,
)

from conftest import running_daemon
from helpers import metric, wait_until
from ingestd import mqtt
from ingestd.config import Config
from ingestd.metrics import Metrics
from ingestd.mqtt import BATCHED_ACK, FAST_RECEIVE, KEEPALIVE_GUARD, MqttLink, missing_internals
from services import MosquittoServer

PATHS = (FAST_RECEIVE, BATCHED_ACK, KEEPALIVE_GUARD)


def inner_client(link: MqttLink) -> paho.Client:
    assert link._client is not None, "not connected"
    return link._client._client


class PahoPath:
    """Spies on the paho client of a connected link: what reached ``on_message`` (paho's own
    receive path) and every write to the socket."""

    def __init__(self, inner: paho.Client, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on_message: list[bytes] = []
        self.writes: list[bytes] = []
        real_send = inner._sock_send
        real_on_message = inner.on_message
        assert real_on_message is not None
        deliver: Callable[[paho.Client, object, paho.MQTTMessage], None] = real_on_message

        def send(buf: bytes | bytearray) -> int:
            self.writes.append(bytes(buf))
            return real_send(buf)

        def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
            self.on_message.append(bytes(message.payload))
            deliver(client, userdata, message)

        monkeypatch.setattr(inner, "_sock_send", send)
        monkeypatch.setattr(inner, "on_message", on_message)

    def pubacks(self) -> list[bytes]:
        """The writes that carried PUBACKs (fixed header 0x40)."""
        return [w for w in self.writes if w[:1] == b"\x40"]


def pubacks(mids: list[int]) -> bytes:
    return b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in mids)


async def test_the_pinned_paho_has_every_internal_the_fast_paths_need(
    broker: MosquittoServer, client_id: str
) -> None:
    reported: dict[str, bool] = {}
    link = MqttLink(mqtt_config(broker, client_id), Recorder(), on_fast_path=reported.__setitem__)
    with capture_logs() as logs:
        async with running(link):
            inner = inner_client(link)
            assert [p for p in PATHS if missing_internals(inner, p)] == []
    assert reported == dict.fromkeys(PATHS, True)
    assert [e for e in logs if e["event"] == "mqtt_fallback"] == []


async def test_messages_take_the_fast_receive_path_and_a_batch_of_acks_is_one_write(
    broker: MosquittoServer, client_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    async with running(link):
        spy = PahoPath(inner_client(link), monkeypatch)
        payloads = await uplinks(broker, 20)
        deliveries = await recorder.wait_count(20)
        assert recorder.payloads == payloads
        # Not one went through paho's own path (its on_message).
        assert spy.on_message == []

        assert link.ack_many(deliveries) == 20
        await wait_until(lambda: bool(spy.pubacks()), within_s=WITHIN_S, what="the PUBACKs written")
        # The same packets as twenty ack() calls, in order, in one write.
        assert spy.pubacks() == [pubacks([d.mid for d in deliveries])]
        # And the broker took them: nothing comes again on the next connection.
        await reconnect(link)
        await assert_nothing_redelivered(broker, recorder, since=20)


async def test_the_keepalive_guard_stands_in_for_unread_pingresps_while_paused(
    broker: MosquittoServer, client_id: str
) -> None:
    link = MqttLink(mqtt_config(broker, client_id), Recorder())
    async with running(link):
        inner = inner_client(link)
        before = inner._last_bytes_received
        link.pause_reading()
        try:
            # Nothing is read while paused: only the guard moves paho's clock on, so that
            # paho does not drop a connection whose PINGRESPs wait unread in the socket.
            await wait_until(
                lambda: inner._last_bytes_received > before, within_s=WITHIN_S, what="the guard's first turn"
            )
            assert inner._ping_t == 0
        finally:
            link.resume_reading()


async def test_on_connect_reads_whether_the_broker_kept_the_session(
    broker: MosquittoServer, client_id: str
) -> None:
    link = MqttLink(mqtt_config(broker, client_id), Recorder())
    async with running(link):
        # A new client id: no session yet. (Connected at all: aiomqtt's own on_connect ran.)
        assert link._session_present is False
        await reconnect(link)
        assert link._session_present is True
    async with running(again := MqttLink(mqtt_config(broker, client_id), Recorder())):
        assert again._session_present is True


def without(*paths: str) -> Mapping[str, tuple[str, ...]]:
    """The fast paths' needs, with a name no paho has added to each of ``paths``."""
    return MappingProxyType(
        {
            path: (*needs, "_not_in_any_paho") if path in paths else needs
            for path, needs in mqtt.FAST_PATH_NEEDS.items()
        }
    )


async def test_a_missing_internal_is_reported_and_its_fallback_loses_nothing(
    broker: MosquittoServer, client_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a paho release without these internals would be.
    monkeypatch.setattr(mqtt, "FAST_PATH_NEEDS", without(*PATHS))
    metrics = Metrics()
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder, on_fast_path=metrics.set_mqtt_fast_path)
    with capture_logs() as logs:
        async with running(link):
            spy = PahoPath(inner_client(link), monkeypatch)
            payloads = await uplinks(broker, 5)
            deliveries = await recorder.wait_count(5)
            # paho's own receive path: every message, through on_message.
            assert spy.on_message == recorder.payloads == payloads

            # One PUBACK per message, each written as paho's ack() writes it.
            assert link.ack_many(deliveries) == 5
            await wait_until(lambda: len(spy.pubacks()) == 5, within_s=WITHIN_S, what="5 PUBACK writes")
            assert spy.pubacks() == [pubacks([d.mid]) for d in deliveries]

            # The guard leaves paho's keepalive clock alone.
            inner = inner_client(link)
            before = inner._last_bytes_received
            link.pause_reading()
            # Two loop turns: the guard's task starts and takes its first turn at once.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert link._guard is not None
            assert not link._guard.done()
            link.resume_reading()
            assert inner._last_bytes_received == before

            # Warned once per link, not on every connection.
            await reconnect(link)
            await assert_nothing_redelivered(broker, recorder, since=5)
    fallbacks = [(e["path"], e["missing"]) for e in logs if e["event"] == "mqtt_fallback"]
    assert fallbacks == [(path, ["_not_in_any_paho"]) for path in PATHS]
    for path in PATHS:
        assert metric(metrics.registry, "ingestd_mqtt_fast_path", path=path) == 0


async def test_the_daemon_exports_which_fast_paths_are_in_effect(config: Config) -> None:
    async with running_daemon(config) as daemon:
        for path in PATHS:
            assert metric(daemon.metrics.registry, "ingestd_mqtt_fast_path", path=path) == 1
