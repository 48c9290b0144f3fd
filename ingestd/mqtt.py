"""The broker link: aiomqtt for the connection, paho underneath for manual acknowledgement.

aiomqtt 2.5 has no public manual-ack API (its issue #345). This module is the one place
that reaches beneath it, so that a PUBACK leaves only after our database commit:

- ``manual_ack_set(True)`` on the paho client, before any message arrives;
- paho's ``on_message`` goes straight to our sink, skipping aiomqtt's queue and message
  wrapper (measurably cheaper per message, and we need the packet id to ack);
- the socket's read callback can be paused, so that when too much is pending the broker,
  not our memory, holds the backlog (its QoS 1 queue for our persistent session).
  Receive Maximum cannot do this: Mosquitto 2.0 honours it only for the first window and
  then delivers the whole backlog. It does bound that first window, though: what a
  persistent session's queue pours in right after the CONNACK, while the subscription and
  the online state are still waiting for their answers behind it and intake cannot pause
  yet, so the caller sizes it to the pending bounds. While paused, paho would see no PINGRESP and drop the
  connection after one keepalive; ``_KeepaliveGuard`` tells it the broker is alive (it is:
  TCP would say otherwise), so PINGREQs keep going out and the broker keeps us too.

Packet ids are only meaningful on the connection that delivered them: every delivery
carries its connection's number, and an ack for an earlier connection is dropped. The
broker redelivers what was not acknowledged on the next connection, and the ledger in
the database recognises it as a duplicate.

**The seam.** What this module reaches is private to paho 2.x and aiomqtt 2.x, which is
why pyproject.toml caps both at the versions tests/test_mqtt_adapter.py runs on. Two
kinds of private names:

- those the link cannot do without, whose change the broker tests (test_mqtt.py,
  test_mqtt_adapter.py) catch: aiomqtt's ``Client._client`` (the paho client) and
  ``Client._disconnected``, and the ``on_connect`` wrapper around aiomqtt's own, which
  reads ``session_present`` from paho's flags;
- the three fast paths, each of which has a slower public equivalent that loses no
  data: ``receive`` (``_FastReceive``: paho's ``_handle_publish``, ``_sock_recv``,
  ``_in_packet``, ``_sock``, ``_logger``, ``_easy_log``), ``batched_ack`` (``ack_many``:
  ``_packet_queue``) and ``keepalive_guard`` (``_last_bytes_received``, ``_ping_t``).
  Each is checked on every new client; one that is missing is reported (a warning, and
  ``ingestd_mqtt_fast_path{path}`` at 0) and its fallback is used: paho's own receive
  path (about 40 us more per message), one PUBACK write per message, or a reconnect
  after a pause longer than the keepalive (its messages come again, as duplicates).

The way out: a maintained public manual-ack API (aiomqtt's issue #345; e.g. a
``Client.puback()`` in aiomqtt 3, once released) would replace ``manual_ack_set``, the
``on_message`` swap and ``batched_ack``; what is left (``receive``, pausing the socket,
``keepalive_guard``) would then be the only private code here, or go too if the library
gains a receive window that a broker honours.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import aiomqtt
import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingestd.config import MqttConfig, read_secret

log = structlog.get_logger("ingestd.mqtt")

# The largest Receive Maximum MQTT v5 allows: the broker may have this many QoS 1 messages
# unacknowledged with us. Batching with ack-after-commit needs several batches' worth.
RECEIVE_MAXIMUM: Final = 65535
# The largest packet the broker may send us (MQTT v5 Maximum Packet Size; larger ones it
# drops, and Mosquitto logs "Dropping too large outgoing PUBLISH"). A payload over 64 KiB
# is refused anyway: up to here it still arrives, to be quarantined as too_large; a larger
# one (MQTT allows 256 MB) would be read whole into memory before it could be refused.
MAXIMUM_PACKET_SIZE: Final = 1024 * 1024
# PUBACK: fixed header, remaining length 2, packet id (MQTT v5 allows omitting the reason).
_PUBACK: Final = struct.Struct("!BBH")

# The fast paths, and the private paho 2.x attributes each needs (see the module's note).
FAST_RECEIVE: Final = "receive"
BATCHED_ACK: Final = "batched_ack"
KEEPALIVE_GUARD: Final = "keepalive_guard"
FAST_PATH_NEEDS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        FAST_RECEIVE: ("_handle_publish", "_sock_recv", "_in_packet", "_sock", "_logger", "_easy_log"),
        BATCHED_ACK: ("_packet_queue",),
        KEEPALIVE_GUARD: ("_last_bytes_received", "_ping_t"),
    }
)


def missing_internals(inner: object, path: str) -> list[str]:
    """The attributes ``path`` needs that this paho client lacks (none: it can be used)."""
    return [name for name in FAST_PATH_NEEDS[path] if not hasattr(inner, name)]


# Not frozen: one is built for every message, and a frozen dataclass costs about 85 ns a
# field to build (object.__setattr__); nothing changes it after construction.
@dataclass(slots=True)
class Delivery:
    """One message as the broker handed it to us."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime
    connection: int


class MqttLink:
    """A persistent-session subscription that reconnects, with acknowledgement left to us.

    ``run()`` connects, subscribes and keeps the connection up until cancelled, calling
    ``sink(delivery)`` on the event loop for every uplink message.
    """

    def __init__(
        self,
        config: MqttConfig,
        sink: Callable[[Delivery], None],
        *,
        on_state: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_fast_path: Callable[[str, bool], None] | None = None,
        state_topic: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        receive_maximum: int = RECEIVE_MAXIMUM,
    ) -> None:
        self._config = config
        self._receive_maximum = receive_maximum
        self._sink = sink
        # Stamps received_at; the daemon's is the database's clock (ingestd.clock).
        self._now = now
        self._on_state = on_state or (lambda _up: None)
        self._on_disconnect = on_disconnect or (lambda: None)
        # (path, in effect) for each fast path, on every new client: the daemon's gauge.
        self._on_fast_path = on_fast_path or (lambda _path, _on: None)
        # The paths found missing, warned about once per link rather than per connection.
        self._warned: set[str] = set()
        self._batched_ack = False
        self._keepalive_guarded = False
        # From the last CONNACK: the broker kept our session (subscription and queue).
        self._session_present = False
        # Retained {"online": ...}; the broker publishes the offline one (the will) if we die.
        self._state_topic = state_topic
        self._client: aiomqtt.Client | None = None
        self._connection = 0
        self._paused = False
        self._subscribed = asyncio.Event()
        self._guard: asyncio.Task[None] | None = None
        self._established = False

    @property
    def connected(self) -> bool:
        return self._client is not None and self._subscribed.is_set()

    async def wait_subscribed(self) -> None:
        await self._subscribed.wait()

    async def run(self) -> None:
        try:
            await self._reconnect_forever()
        finally:
            if self._guard is not None:
                self._guard.cancel()
            self._on_state(False)  # noqa: FBT003 - the callback's one argument

    async def _reconnect_forever(self) -> None:
        delay = self._config.reconnect_initial_s
        while True:
            self._established = False
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                log.warning("mqtt_disconnected", error=str(exc))
            if self._established:
                # The back-off is for a broker that keeps refusing us, not for the
                # outages of one that worked: after a good session, start again quickly.
                delay = self._config.reconnect_initial_s
            self._subscribed.clear()
            self._on_state(False)  # noqa: FBT003 - the callback's one argument
            # Full jitter: a fleet of head-ends (or a restarted broker) must not reconnect in step.
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 - not cryptographic
            delay = min(delay * 2, self._config.reconnect_max_s)

    async def _session(self) -> None:
        client = self._make_client()
        async with client:
            self._connection += 1
            self._client = client
            requests: list[asyncio.Task[object]] = []
            try:
                if self._session_present:
                    # The broker kept our session and sends its queue straight after the
                    # CONNACK; its answer to anything we ask now (SUBACK, PUBACK) comes
                    # behind that backlog. With intake paused at max_pending it would not
                    # be read before a timeout ended the session, and the whole backlog
                    # would begin again, for ever. So ask (the filter may have changed) but
                    # do not wait: the answers arrive as the backlog is drained.
                    requests = [
                        asyncio.create_task(self._subscribe(client, wait=False), name="mqtt-subscribe"),
                        asyncio.create_task(self.announce(online=True, within_s=None), name="mqtt-announce"),
                    ]
                else:
                    await self._subscribe(client, wait=True)
                    await self.announce(online=True, within_s=self._config.keepalive_s)
                if self._paused:
                    self._set_reading(paused=True)
                self._subscribed.set()
                self._established = True
                self._on_state(True)  # noqa: FBT003 - the callback's one argument
                log.info(
                    "mqtt_subscribed",
                    topic=self._config.uplink_filter,
                    url=self._config.url,
                    session_present=self._session_present,
                )
                await _disconnected(client)
            except asyncio.CancelledError:
                raise  # our shutdown, not a lost connection
            except BaseException:
                self._on_disconnect()
                raise
            else:
                self._on_disconnect()
            finally:
                for request in requests:
                    request.cancel()
                self._client = None
                self._subscribed.clear()

    async def _subscribe(self, client: aiomqtt.Client, *, wait: bool) -> None:
        """Subscribe; ``wait``: within the client's timeout, else as long as it takes."""
        # Retain handling 2: no retained messages on subscribe. We subscribe again on every
        # connection, and with the default (0) each time the broker would hand us every
        # meter topic's retained message once more, to be quarantined again if it is
        # garbage. A retained message is never news to us: while our session lives we got
        # it live when it was published; before our first subscription, or after the
        # session expired, it is a past message, which gap replay recovers from the
        # meter's flash if it mattered.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        try:
            await client.subscribe(
                self._config.uplink_filter, options=options, timeout=None if wait else math.inf
            )
        except aiomqtt.MqttError:
            if wait:
                raise
            # The session's own subscription still delivers; only a changed filter waits
            # for the next connection.
            log.warning("mqtt_subscribe_failed", topic=self._config.uplink_filter)

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge (PUBACK) a delivery; False when its connection is gone."""
        client = self._client
        if client is None or delivery.connection != self._connection or delivery.qos == 0:
            return False
        _paho(client).ack(delivery.mid, delivery.qos)
        return True

    def ack_many(self, deliveries: Sequence[Delivery]) -> int:
        """Acknowledge a committed batch; returns how many PUBACKs went out.

        The same PUBACK packets as ``ack``, in the same order, but queued as one write:
        one ``send`` per batch rather than one per message.
        """
        client = self._client
        if client is None:
            return 0
        connection = self._connection
        mids = [d.mid for d in deliveries if d.connection == connection and d.qos == 1]
        inner = _paho(client)
        logger = getattr(inner, "_logger", None)
        if (
            not self._batched_ack
            or len(mids) != sum(1 for d in deliveries if d.connection == connection and d.qos)
            or (logger is not None and logger.isEnabledFor(logging.DEBUG))
        ):
            # A paho without the internals (reported when the client was made), QoS 2
            # (never subscribed to), or paho's per-packet debug log.
            return sum(self.ack(d) for d in deliveries)
        if mids:
            packets = b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids])
            inner._packet_queue(PUBACK, packets, 0, 1)  # noqa: SLF001
        return len(mids)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(topic, payload, qos=qos, retain=retain)

    async def announce(self, *, online: bool, within_s: float | None) -> bool:
        """Publish the retained head-end state (QoS 1, waits for the broker's PUBACK, for
        ``within_s`` seconds or, with None, as long as the connection lasts)."""
        client = self._client
        if self._state_topic is None or client is None:
            return False
        try:
            async with asyncio.timeout(within_s):
                await client.publish(
                    self._state_topic,
                    _state(online=online, at=self._now()),
                    qos=1,
                    retain=True,
                    timeout=math.inf if within_s is None else within_s,
                )
        except (TimeoutError, aiomqtt.MqttError) as exc:
            log.warning("state_publish_failed", online=online, error=str(exc) or type(exc).__name__)
            return False
        return True

    def pause_reading(self) -> None:
        """Stop reading the socket: TCP back-pressure makes the broker hold the backlog."""
        if not self._paused:
            self._paused = True
            self._set_reading(paused=True)
            self._guard = asyncio.get_running_loop().create_task(self._keepalive_guard(), name="mqtt-guard")

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._set_reading(paused=False)
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None

    async def _keepalive_guard(self) -> None:
        """While reading is paused, keep paho from timing out on unread PINGRESPs."""
        while True:
            client = self._client
            if client is not None and self._keepalive_guarded:
                inner = _paho(client)
                # paho 2.x internals: the time bytes last arrived, and the time of an
                # unanswered PINGREQ (0: none). Absent in another paho (reported when the
                # client was made), a long pause costs a reconnect, never data.
                inner._last_bytes_received = paho.time_func()  # noqa: SLF001
                inner._ping_t = 0  # noqa: SLF001
            await asyncio.sleep(1.0)

    async def disconnect(self) -> None:
        """Close the connection cleanly (the session and its queue stay at the broker)."""
        client = self._client
        if client is not None:
            _paho(client).disconnect()

    def _make_client(self) -> aiomqtt.Client:
        cfg = self._config
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry_s
        props.ReceiveMaximum = self._receive_maximum
        props.MaximumPacketSize = MAXIMUM_PACKET_SIZE
        password = read_secret("mqtt.password_file", cfg.password_file) if cfg.password_file else None
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            # Never a clean start: the broker keeps our subscription and queues uplinks while
            # we are away (MQTT_CLEAN_START_FIRST_ONLY, aiomqtt's default, would throw them away).
            clean_start=False,
            properties=props,
            keepalive=cfg.keepalive_s,
            username=cfg.username or None,
            password=password,
            will=(
                aiomqtt.Will(self._state_topic, _state(online=False, at=self._now()), qos=1, retain=True)
                if self._state_topic
                else None
            ),
            tls_context=_tls_context(cfg) if cfg.tls else None,
            timeout=10,
        )
        inner = _paho(client)
        inner.manual_ack_set(on=True)
        aiomqtt_on_connect = inner.on_connect
        assert aiomqtt_on_connect is not None, "aiomqtt sets on_connect in its constructor"

        def on_connect(*args: Any) -> None:  # noqa: ANN401
            # paho 2.x (callback API 2): (client, userdata, flags, reason_code, properties).
            self._session_present = bool(getattr(args[2], "session_present", False))
            aiomqtt_on_connect(*args)

        inner.on_connect = on_connect
        connection = self._connection + 1
        sink = self._sink
        now = self._now

        def on_message(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:  # noqa: ANN401
            sink(
                Delivery(
                    topic=message.topic,
                    payload=bytes(message.payload),
                    mid=message.mid,
                    qos=message.qos,
                    received_at=now(),
                    connection=connection,
                )
            )

        def on_qos1(topic: str, payload: bytes, mid: int) -> None:
            sink(Delivery(topic, payload, mid, 1, now(), connection))

        inner.on_message = on_message
        self._fast_path(inner, FAST_RECEIVE, _FastReceive(inner, on_qos1, lambda: self._paused).install())
        self._batched_ack = self._fast_path(inner, BATCHED_ACK, not missing_internals(inner, BATCHED_ACK))
        self._keepalive_guarded = self._fast_path(
            inner, KEEPALIVE_GUARD, not missing_internals(inner, KEEPALIVE_GUARD)
        )
        return client

    def _fast_path(self, inner: paho.Client, path: str, installed: bool) -> bool:
        """Report whether a fast path is in effect on a new client; warn when it is not:
        a paho or aiomqtt other than the pinned ones (pyproject.toml) lacks what it needs."""
        self._on_fast_path(path, installed)
        if not installed and path not in self._warned:
            self._warned.add(path)
            log.warning("mqtt_fallback", path=path, missing=missing_internals(inner, path))
        return installed

    def _set_reading(self, *, paused: bool) -> None:
        client = self._client
        if client is None:
            return
        inner = _paho(client)
        sock = inner.socket()
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        loop.remove_reader(fd)
        if not paused:
            callback = _read_callback(client)
            loop.add_reader(fd, callback)
            # What the receive buffer already holds does not make the socket readable.
            loop.call_soon(callback)


def _state(*, online: bool, at: datetime) -> bytes:
    return orjson.dumps({"online": online, "at": at.isoformat(timespec="seconds")})


class _FastReceive:
    """A cheaper receive path for paho, installed on one client: ~40 us less per message.

    paho reads a packet with three or four ``recv`` calls (command byte, length bytes,
    body) and returns to the event loop after each packet; every PUBLISH then builds a
    ``Properties`` and an ``MQTTMessage`` and matches the topic against per-topic
    callbacks. At thousands of messages a second that is most of the event loop's time.

    - ``recv`` is served from a buffer filled by one large read;
    - ``loop_read`` keeps going while the buffer holds bytes, and so returns with it
      empty: the socket's readiness still tells the event loop all there is to know;
    - a QoS 1 PUBLISH without properties (what a meter sends) goes straight to
      ``on_qos1``. Anything else (QoS 0 or 2, properties such as a topic alias, a topic
      that is not UTF-8, a short packet, debug logging on) takes paho's own path,
      unchanged, so MQTT v5 semantics and error handling stay paho's.

    These are paho 2.x internals; ``install`` leaves a paho without them untouched, and
    says so.
    """

    _READ_SIZE: Final = 256 * 1024

    def __init__(
        self,
        inner: paho.Client,
        on_qos1: Callable[[str, bytes, int], None],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self._inner = inner
        self._on_qos1 = on_qos1
        # Checked after every packet: a pause stops delivery at once, not at the end of the
        # buffer (up to 256 KiB of messages past max_pending).
        self._paused = paused
        self._buffer = b""
        self._pos = 0
        self._sock: object = None

    def install(self) -> bool:
        """Install on the client; False (and paho's own path kept) when it lacks what this needs."""
        inner = self._inner
        if missing_internals(inner, FAST_RECEIVE):
            return False
        self._paho_handle_publish = inner._handle_publish  # noqa: SLF001
        self._paho_sock_recv = inner._sock_recv  # noqa: SLF001
        self._paho_loop_read = inner.loop_read
        # Instance attributes shadow the methods; aiomqtt's read callback calls loop_read.
        inner._handle_publish = self._handle_publish  # type: ignore[method-assign]  # noqa: SLF001
        inner._sock_recv = self._recv  # type: ignore[method-assign]  # noqa: SLF001
        inner.loop_read = self._loop_read  # type: ignore[method-assign]
        return True

    def _loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        while True:
            rc = self._paho_loop_read(max_packets)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._pos >= len(self._buffer) or self._paused():
                return rc

    def _recv(self, bufsize: int) -> bytes:
        if self._sock is not self._inner._sock:  # noqa: SLF001 - a new socket: the rest is stale
            self._sock = self._inner._sock  # noqa: SLF001
            self._buffer, self._pos = b"", 0
        pos = self._pos
        if pos >= len(self._buffer):
            # Raises BlockingIOError when nothing is there, as paho expects; b"" is EOF.
            data = self._paho_sock_recv(max(bufsize, self._READ_SIZE))
            if len(data) <= bufsize:
                self._buffer, self._pos = b"", 0
                return data
            self._buffer, pos = data, 0
        end = pos + bufsize
        self._pos = end
        return self._buffer[pos:end]

    def _handle_publish(self) -> MQTTErrorCode:
        inner = self._inner
        packet: bytearray = inner._in_packet["packet"]  # noqa: SLF001
        # Fixed header 0x32 (PUBLISH, QoS 1, no DUP, no RETAIN) or 0x3A (DUP).
        if inner._in_packet["command"] & 0x0F not in {0x02, 0x0A} or (  # noqa: SLF001
            inner._logger is not None and inner._logger.isEnabledFor(logging.DEBUG)  # noqa: SLF001
        ):
            return self._paho_handle_publish()
        topic_end = 2 + ((packet[0] << 8) | packet[1]) if len(packet) >= 2 else 0
        # Topic, packet id, then the properties' length: one byte 0 means no properties.
        if len(packet) <= topic_end + 2 or packet[topic_end + 2] != 0:
            return self._paho_handle_publish()
        try:
            topic = packet[2:topic_end].decode("utf-8")
        except UnicodeDecodeError:
            return self._paho_handle_publish()
        mid = (packet[topic_end] << 8) | packet[topic_end + 1]
        try:
            self._on_qos1(topic, bytes(packet[topic_end + 3 :]), mid)
        except Exception as err:
            # As paho's own path reports a failing on_message.
            inner._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)  # noqa: SLF001
            if not inner.suppress_exceptions:
                raise
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _paho(client: aiomqtt.Client) -> paho.Client:
    return client._client  # noqa: SLF001 - the documented purpose of this module


def _read_callback(client: aiomqtt.Client) -> Callable[[], None]:
    """What aiomqtt registers as the socket's reader, for re-registering after a pause."""
    inner = _paho(client)

    def callback() -> None:
        try:
            while True:
                inner.loop_read()
                # An SSL socket may hold decrypted bytes that select() does not report.
                sock = inner.socket()
                pending = getattr(sock, "pending", None)
                if pending is None or pending() <= 0:
                    break
        except Exception as exc:  # noqa: BLE001 - any failure here means the connection broke
            disconnected: asyncio.Future[None] = client._disconnected  # noqa: SLF001
            if not disconnected.done():
                disconnected.set_exception(exc)

    return callback


async def _disconnected(client: aiomqtt.Client) -> None:
    """Wait until the connection ends; raise MqttError if it broke."""
    fut: asyncio.Future[None] = client._disconnected  # noqa: SLF001 - no public equivalent
    try:
        await asyncio.shield(fut)
    except aiomqtt.MqttError:
        raise
    except Exception as exc:  # a socket error that paho surfaced
        raise aiomqtt.MqttError(str(exc) or type(exc).__name__) from exc


def _tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cfg.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
    return context
