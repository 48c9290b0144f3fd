"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from ingestd.config import IngestConfig
from ingestd.envelope import MAX_PAYLOAD, MAX_READINGS, check_message, format_time
from ingestd.signature import Alg, PrivateKey, Signer, b64url_encode, public_key_pem
from ingestd.store import Accept, Store


async def wait_until(
    condition: Callable[[], bool], *, within_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def publish(url_host: str, port: int, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish (topic, payload) pairs at QoS 1 as one meter-side client; returns the count."""
    count = 0
    async with aiomqtt.Client(
        url_host, port, identifier=f"test-pub-{uuid.uuid4().hex[:8]}", protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)
            count += 1
    return count


def jws(signer: Signer, body: dict[str, Any] | bytes, *, header: dict[str, Any] | None = None) -> bytes:
    """A JWS over ``body``; ``header`` replaces the protected header (for attack cases)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    protected = b64url_encode(orjson.dumps(header)) if header is not None else None
    return signer.sign_body(raw, protected)


def finished(registry: CollectorRegistry) -> float:
    """Messages whose fate is committed: accepted, duplicate or rejected."""
    rejected = sum(
        s.value
        for m in registry.collect()
        if m.name == "ingestd_messages_rejected"
        for s in m.samples
        if s.name == "ingestd_messages_rejected_total"
    )
    return (
        metric(registry, "ingestd_messages_accepted_total")
        + metric(registry, "ingestd_messages_duplicate_total")
        + rejected
    )


async def wait_settled(registry: CollectorRegistry, received: int, *, within_s: float = 30.0) -> None:
    """Wait until ``received`` messages arrived and every one of them is committed."""
    await wait_until(
        lambda: (
            metric(registry, "ingestd_messages_received_total") == received and finished(registry) == received
        ),
        within_s=within_s,
        what=f"{received} messages received and committed",
    )


async def retained_state(host: str, port: int, instance: str) -> dict[str, object]:
    """The retained message on headend/{instance}/state, as a meter reads it."""
    async with aiomqtt.Client(
        host, port, identifier=f"meter-{uuid.uuid4().hex[:6]}", protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe(f"headend/{instance}/state", qos=1)
        async with asyncio.timeout(10):
            message = await anext(client.messages)
    assert message.retain
    state = orjson.loads(message.payload)
    assert isinstance(state, dict)
    return state


def max_size_messages(
    signers: list[Signer], count: int, *, end: datetime, prefix: str = "meters"
) -> list[tuple[str, bytes]]:
    """``count`` messages as large as the protocol allows, round-robin over the meters: each
    carries MAX_READINGS one-minute readings (consecutive across a meter's messages, the
    last ending before ``end``) and is padded with an ignored top-level member to just
    under MAX_PAYLOAD bytes."""
    per_meter = -(-count // len(signers))
    first = end.replace(second=0, microsecond=0) - timedelta(minutes=per_meter * MAX_READINGS)
    sent = format_time(end)
    messages = []
    for i in range(count):
        signer = signers[i % len(signers)]
        meter = signer.kid.removesuffix("-k1")  # the simulator's and the bench's naming
        seq = i // len(signers) + 1
        start = (seq - 1) * MAX_READINGS
        body: dict[str, Any] = {
            "v": 1,
            "meter": meter,
            "epoch": 0,
            "seq": seq,
            "sent": sent,
            "replay": False,
            "readings": [
                {"t": format_time(first + timedelta(minutes=start + k)), "import_wh": 100_000 + start + k}
                for k in range(MAX_READINGS)
            ],
        }
        payload = signer.sign_body(orjson.dumps(body))
        # Base64url turns 3 body bytes into 4; the margin covers the member's own syntax.
        body["pad"] = "x" * max(0, (MAX_PAYLOAD - len(payload)) * 3 // 4 - 16)
        payload = signer.sign_body(orjson.dumps(body))
        assert MAX_PAYLOAD - 64 < len(payload) <= MAX_PAYLOAD, len(payload)
        messages.append((f"{prefix}/{meter}/up", payload))
    return messages


class FastPublisher:
    """A fast QoS 1 publisher: paho in its own network thread, up to 1000 in flight."""

    MAX_OUTSTANDING = 50_000

    def __init__(self, host: str, port: int, client_id: str | None = None) -> None:
        self.acked = 0
        self.published = 0
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"publisher-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_publish(self, *_args: object) -> None:
        with self._lock:
            self.acked += 1

    def publish(self, messages: Iterable[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            # Packet ids are 16 bits: with more than 65,535 unacknowledged, paho would reuse
            # one still in use and lose a message. Wait for the broker to catch up first.
            if self.published - self.acked >= self.MAX_OUTSTANDING:
                self.wait_acked(self.published - self.MAX_OUTSTANDING // 2)
            self.client.publish(topic, payload, qos=1)
            self.published += 1

    def wait_acked(self, count: int, timeout: float = 120) -> None:
        """Block until the broker acknowledged ``count`` messages (a thread's wait)."""
        deadline = time.monotonic() + timeout
        while self.acked < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker acknowledged {self.acked} of {count} messages")
            time.sleep(0.005)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True, slots=True)
class SignedMeter:
    """A meter registered in the test's database, with the key it signs with."""

    meter_id: str
    signer: Signer

    def message(
        self,
        seq: int,
        *,
        readings: Sequence[tuple[datetime, int]] = (),
        events: Sequence[dict[str, Any]] = (),
        sent: datetime,
        epoch: int = 0,
    ) -> tuple[str, bytes]:
        """(topic, JWS) of one signed message."""
        body = {
            "v": 1,
            "meter": self.meter_id,
            "epoch": epoch,
            "seq": seq,
            "sent": format_time(sent),
            "readings": [{"t": format_time(t), "import_wh": wh} for t, wh in readings],
            "events": list(events),
        }
        return f"meters/{self.meter_id}/up", self.signer.sign_body(orjson.dumps(body))


async def register(
    store: Store, meter_id: str, alg: Alg, key: PrivateKey, *, site: str = "S-1"
) -> SignedMeter:
    signer = Signer(alg, f"{meter_id}-k1", key)
    await store.add_meter(
        meter_id,
        alg=alg,
        kid=signer.kid,
        public_key_pem=public_key_pem(key.public_key()).decode(),
        site=site,
        interval_s=900,
        valid_from=datetime(2020, 1, 1, tzinfo=UTC),
    )
    return SignedMeter(meter_id, signer)


async def store_signed(store: Store, messages: Iterable[tuple[str, bytes]], *, received_at: datetime) -> None:
    """Check and store messages as the daemon does (envelope checks, one batch write),
    without a broker: for tests of what is done with stored data."""
    keys = {k.kid: k for k in await store.load_keys()}
    accepts = [
        Accept(
            check_message(
                topic,
                payload,
                received_at,
                keys,
                topic_prefix="meters",
                max_clock_skew=timedelta(minutes=5),
                max_data_age=timedelta(days=IngestConfig().max_data_age_days),
            ),
            topic,
            payload,
            received_at,
        )
        for topic, payload in messages
    ]
    result = await store.write_batch(accepts, [], now=received_at)
    assert len(result.accepted) == len(accepts)
