"""The broker link (ingestd.mqtt) on a real, private Mosquitto: delivery, manual
acknowledgement across connections, the persistent session, pausing and reconnecting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest
from paho.mqtt.enums import MQTTErrorCode

from helpers import publish, wait_until
from ingestd.config import MqttConfig
from ingestd.mqtt import Delivery, MqttLink
from services import MosquittoServer

UP = "meters/M1/up"
WITHIN_S = 10.0


class Recorder:
    """A sink that keeps every delivery, in arrival order."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    @property
    def payloads(self) -> list[bytes]:
        return [d.payload for d in self.deliveries]

    async def wait_count(self, count: int, *, within_s: float = WITHIN_S) -> list[Delivery]:
        await wait_until(lambda: len(self.deliveries) >= count, within_s=within_s, what=f"{count} deliveries")
        return list(self.deliveries)


def mqtt_config(broker: MosquittoServer, client_id: str, *, keepalive_s: int = 30) -> MqttConfig:
    # Built directly, not validated: test 7 needs a keepalive below validate()'s minimum.
    return MqttConfig(
        url=broker.url,
        client_id=client_id,
        keepalive_s=keepalive_s,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
    )


@contextlib.asynccontextmanager
async def running(link: MqttLink) -> AsyncIterator[asyncio.Task[None]]:
    """``link.run()`` as a task, subscribed on entry, cancelled (and awaited) on exit."""
    task = asyncio.create_task(link.run(), name="mqtt-link")
    try:
        await wait_until(lambda: link.connected or task.done(), within_s=WITHIN_S, what="subscribed")
        if task.done():
            task.result()  # raises what stopped it
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def send(broker: MosquittoServer, *messages: tuple[str, bytes]) -> None:
    await publish(broker.host, broker.port, messages)


async def send_retained(broker: MosquittoServer, topic: str, payload: bytes) -> None:
    """Publish a retained message as a meter would (the broker keeps it for subscribers)."""
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"test-retain-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.publish(topic, payload, qos=1, retain=True)


async def uplinks(broker: MosquittoServer, count: int, tag: str = "m") -> list[bytes]:
    payloads = [f"{tag}-{i}".encode() for i in range(count)]
    await send(broker, *((UP, p) for p in payloads))
    return payloads


async def reconnect(link: MqttLink) -> int:
    """Drop the link's connection cleanly and wait until it is back on the next one."""
    before = link._connection
    await link.disconnect()
    await wait_until(
        lambda: link.connected and link._connection == before + 1, within_s=WITHIN_S, what="reconnected"
    )
    return link._connection


async def assert_nothing_redelivered(broker: MosquittoServer, recorder: Recorder, *, since: int) -> None:
    """The broker sends a session's unacknowledged messages first (they may already have
    arrived, before SUBACK), so a marker published now must be the only delivery after
    the first ``since``."""
    await send(broker, (UP, b"marker"))
    await recorder.wait_count(since + 1)
    assert recorder.payloads[since:] == [b"marker"]


def has_unread_bytes(link: MqttLink) -> bool:
    client = link._client
    if client is None:
        return False
    sock = client._client.socket()
    if not isinstance(sock, socket.socket):
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


async def test_deliveries_carry_the_message_and_only_uplinks_arrive(
    broker: MosquittoServer, client_id: str
) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    payload = bytes(range(256)) + b"\x00\xff not utf-8 \xc3\x28"
    before = datetime.now(UTC)
    async with running(link):
        await send(
            broker,
            (UP, payload),
            ("meters/M1/down/replay", b"downlink"),
            ("other/x", b"other"),
            ("meters/M2/up", b"last"),
        )
        # Same publisher, same QoS: order is kept, so "last" arrives after anything else.
        await recorder.wait_count(2)
    after = datetime.now(UTC)
    first, last = recorder.deliveries
    assert (first.topic, first.payload, first.qos) == (UP, payload, 1)
    assert (last.topic, last.payload, last.qos) == ("meters/M2/up", b"last", 1)
    for delivery in recorder.deliveries:
        assert delivery.connection == 1
        assert delivery.mid > 0
        assert delivery.received_at.utcoffset() == timedelta(0)
        assert before <= delivery.received_at <= after


async def test_unacknowledged_deliveries_are_redelivered(broker: MosquittoServer, client_id: str) -> None:
    first = Recorder()
    async with running(MqttLink(mqtt_config(broker, client_id), first)):
        payloads = await uplinks(broker, 5)
        await first.wait_count(5)
    assert first.payloads == payloads

    # A new link with the same client id resumes the session (clean_start False).
    second = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), second)
    async with running(link):
        await second.wait_count(5)
        assert second.payloads == payloads
        # And within one link, a later connection gets them again, under its own number.
        assert await reconnect(link) == 2
        await second.wait_count(10)
    assert second.payloads[5:] == payloads
    assert [d.connection for d in second.deliveries] == [1] * 5 + [2] * 5


async def test_acknowledged_deliveries_are_not_redelivered(broker: MosquittoServer, client_id: str) -> None:
    first = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), first)
    async with running(link):
        payloads = await uplinks(broker, 5)
        for delivery in await first.wait_count(5):
            assert link.ack(delivery) is True
    assert first.payloads == payloads

    second = Recorder()
    async with running(MqttLink(mqtt_config(broker, client_id), second)):
        await assert_nothing_redelivered(broker, second, since=0)


async def test_an_ack_from_an_earlier_connection_is_dropped(
    broker: MosquittoServer, client_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    async with running(link):
        await send(broker, (UP, b"once"))
        (old,) = await recorder.wait_count(1)
        assert old.connection == 1

        assert await reconnect(link) == 2
        _, redelivered = await recorder.wait_count(2)
        assert (redelivered.payload, redelivered.connection) == (b"once", 2)

        # Spy on the PUBACKs the current connection sends.
        assert link._client is not None
        inner = link._client._client
        sent: list[int] = []
        real_ack = inner.ack

        def spy(mid: int, qos: int) -> MQTTErrorCode:
            sent.append(mid)
            return real_ack(mid, qos)

        monkeypatch.setattr(inner, "ack", spy)
        assert link.ack(old) is False
        assert sent == []
        assert link.ack(redelivered) is True
        assert sent == [redelivered.mid]

        assert await reconnect(link) == 3
        await assert_nothing_redelivered(broker, recorder, since=2)


async def test_the_session_keeps_messages_while_the_link_is_away(
    broker: MosquittoServer, client_id: str
) -> None:
    async with running(MqttLink(mqtt_config(broker, client_id), Recorder())):
        pass  # subscribed: the broker now holds the session and its subscription
    payloads = await uplinks(broker, 20)

    recorder = Recorder()
    async with running(MqttLink(mqtt_config(broker, client_id), recorder)):
        await recorder.wait_count(20)
    assert recorder.payloads == payloads


async def test_pause_reading_holds_deliveries_until_resumed(broker: MosquittoServer, client_id: str) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    async with running(link):
        link.pause_reading()
        payloads = await uplinks(broker, 10)
        # The messages have reached our socket; nobody reads them.
        await wait_until(lambda: has_unread_bytes(link), within_s=WITHIN_S, what="unread bytes on the socket")
        await asyncio.sleep(0)  # one more loop pass, in case a reader were still registered
        assert recorder.deliveries == []

        link.resume_reading()
        await recorder.wait_count(10)
        assert recorder.payloads == payloads
        assert link._connection == 1


@pytest.mark.slow
async def test_a_pause_longer_than_the_keepalive_keeps_the_connection(
    broker: MosquittoServer, client_id: str
) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id, keepalive_s=1), recorder)
    async with running(link):
        connection = link._connection
        link.pause_reading()
        # Real time on purpose: neither the broker's nor paho's keepalive clock can be
        # injected. Unguarded, paho gives up after about two keepalives.
        await asyncio.sleep(4)
        assert link.connected
        assert link._connection == connection

        link.resume_reading()
        await send(broker, (UP, b"after the pause"))
        (delivery,) = await recorder.wait_count(1)
        # Had the broker dropped us, this would come on a new connection.
        assert (delivery.payload, delivery.connection) == (b"after the pause", connection)
        assert link._connection == connection


async def test_the_link_reconnects_after_a_broker_restart(broker: MosquittoServer, client_id: str) -> None:
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    async with running(link):
        await send(broker, (UP, b"before"))
        (before,) = await recorder.wait_count(1)  # not acknowledged

        await asyncio.to_thread(broker.restart)
        await wait_until(
            lambda: link.connected and link._connection > before.connection,
            within_s=WITHIN_S,
            what="reconnected after the restart",
        )
        await send(broker, (UP, b"after"))
        await recorder.wait_count(3)
    # The broker kept the session: the unacknowledged message comes first, then the new one.
    assert recorder.payloads == [b"before", b"before", b"after"]
    assert [d.connection for d in recorder.deliveries[1:]] == [link._connection] * 2


async def test_on_state_reports_subscribe_and_disconnect(broker: MosquittoServer, client_id: str) -> None:
    states: list[bool] = []
    link = MqttLink(mqtt_config(broker, client_id), Recorder(), on_state=states.append)
    async with running(link):
        assert states == [True]

        await asyncio.to_thread(broker.stop)
        await wait_until(lambda: len(states) > 1, within_s=WITHIN_S, what="a disconnect reported")
        assert states[1] is False
        assert not link.connected

        await asyncio.to_thread(broker.start)
        await wait_until(lambda: states[-1], within_s=WITHIN_S, what="a reconnect reported")
        assert link.connected
        # While the broker was down, every failed attempt reported False again.
        assert set(states[1:-1]) == {False}


async def test_a_retained_uplink_is_not_delivered_again_on_each_subscribe(
    broker: MosquittoServer, client_id: str
) -> None:
    # Retained garbage on a meter's uplink: a meter's firmware bug, or someone with its
    # credentials. Delivered once, live, and acknowledged (quarantined, in the daemon).
    recorder = Recorder()
    link = MqttLink(mqtt_config(broker, client_id), recorder)
    async with running(link):
        await send_retained(broker, UP, b"retained garbage")
        (live,) = await recorder.wait_count(1)
        assert live.payload == b"retained garbage"
        assert link.ack(live) is True
        # Every connection subscribes again; the broker must not hand it over again.
        await reconnect(link)
        await reconnect(link)
        await assert_nothing_redelivered(broker, recorder, since=1)
    # Nor to a new session (a new client id: first start, or the session expired): what
    # was published before it existed is the past, for gap replay to recover.
    fresh = Recorder()
    async with running(MqttLink(mqtt_config(broker, f"{client_id}-new"), fresh)):
        await assert_nothing_redelivered(broker, fresh, since=0)
