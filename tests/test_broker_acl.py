"""The production broker configuration (deploy/mosquitto/) on a real Mosquitto.

Certificates are made at test time: a CA, the broker's certificate for 127.0.0.1, and
client certificates whose CN is a meter id or ingestd's identity. The broker runs the
shipped mosquitto.conf with only its paths, port and run-as user replaced, and the
shipped ACL file unchanged, so what passes here is what production runs.

What "cannot" means here: a denied publish is answered "not authorised" (MQTT v5 PUBACK
reason code 0x87), and a marker message sent after it proves that nothing got through
(QoS 1 messages from one connection to one subscriber arrive in order). Mosquitto 2.0's
acl_file grants every subscription and checks each message at delivery instead, so for
reading, the marker is the proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import pwd
import random
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.reasoncodes import ReasonCode

from conftest import running_daemon
from helpers import wait_until
from ingestd.config import Config
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from services import MosquittoServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
NOT_AUTHORIZED = 0x87
INGESTD = "ingestd"  # the CN of ingestd's certificate, as deploy/mosquitto/acl expects
METER_A = "M-000001"
METER_B = "M-000002"


# -- certificates ---------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA of our own and the certificates it issued, as PEM files in ``dir``."""

    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path, ca_name: str = "ingestd test CA") -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_name))
            .issuer_name(_name(ca_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    def issue(self, cn: str, *, server: bool = False) -> tuple[Path, Path]:
        """A certificate and key for ``cn``: a client's, or the broker's for 127.0.0.1.

        Made once; later calls return the same files."""
        cert_path, key_path = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        if cert_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path


# -- the broker -----------------------------------------------------------------------


def production_config(
    *, port: int, ca: Path, cert: Path, key: Path, acl: Path, persistence: Path, log: Path, user: str
) -> str:
    """deploy/mosquitto/mosquitto.conf with its paths, port and run-as user replaced.

    Each replaced directive must occur exactly once, so that the shipped file cannot
    drift away from what is tested here without this failing.
    """
    lines = (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
    replacements = {
        "user": user,
        # Bound to the loopback address for the test; production listens on every address.
        "listener": f"{port} 127.0.0.1",
        "cafile": str(ca),
        "certfile": str(cert),
        "keyfile": str(key),
        "acl_file": str(acl),
        "persistence_location": f"{persistence}/",
        "log_dest": f"file {log}",
    }
    for directive, value in replacements.items():
        found = [i for i, line in enumerate(lines) if line.startswith(f"{directive} ")]
        assert len(found) == 1, f"{directive} occurs {len(found)} times in deploy/mosquitto/mosquitto.conf"
        lines[found[0]] = f"{directive} {value}"
    return "\n".join(lines) + "\n"


class ProductionMosquitto(MosquittoServer):
    """A private Mosquitto running the shipped production configuration."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        super().__init__(workdir)
        self.url = f"mqtts://{self.host}:{self.port}"
        self.pki = pki
        self.server_cert, self.server_key = pki.issue("broker", server=True)

    def _config(self) -> str:
        return production_config(
            port=self.port,
            ca=self.pki.ca_file,
            cert=self.server_cert,
            key=self.server_key,
            acl=DEPLOY / "acl",
            persistence=self.workdir,
            log=self.log_path,
            # As root Mosquitto switches to this account, which must read the files above
            # (made by us, in directories only we may enter): keep running as ourselves.
            user=pwd.getpwuid(os.geteuid()).pw_name,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[ProductionMosquitto]:
    with ProductionMosquitto(tmp_path / "mosquitto-tls", pki) as server:
        yield server


# -- clients --------------------------------------------------------------------------


def client_context(pki: Pki, cn: str | None) -> ssl.SSLContext:
    """Verifies the broker against our CA; presents ``cn``'s certificate (None: none)."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cn is not None:
        context.load_cert_chain(*pki.issue(cn))
    return context


class Client:
    """An MQTT v5 client over TLS that records what it receives and its PUBACK codes."""

    def __init__(self, inner: aiomqtt.Client) -> None:
        self.inner = inner
        self.received: list[tuple[str, bytes]] = []
        self.puback: dict[int, ReasonCode] = {}
        self._reader: asyncio.Task[None] | None = None
        paho_client: paho.Client = inner._client  # aiomqtt hides PUBACK reason codes
        aiomqtt_on_publish: Any = paho_client.on_publish

        def on_publish(client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
            self.puback[mid] = rc
            aiomqtt_on_publish(client, userdata, mid, rc, props)

        paho_client.on_publish = on_publish

    async def start_reading(self) -> None:
        async def read() -> None:
            async for message in self.inner.messages:
                self.received.append((str(message.topic), bytes(message.payload)))

        self._reader = asyncio.create_task(read())

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1; returns the PUBACK's reason code."""
        before = set(self.puback)
        await self.inner.publish(topic, payload, qos=1, retain=retain)
        (mid,) = set(self.puback) - before
        return self.puback[mid]

    async def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; returns the SUBACK's reason code (1: granted QoS 1)."""
        (code,) = await self.inner.subscribe(topic, qos=1)
        return code.value if isinstance(code, ReasonCode) else code

    async def wait_for(self, topic: str, payload: bytes) -> None:
        await wait_until(
            lambda: (topic, payload) in self.received, within_s=10, what=f"{payload!r} on {topic}"
        )


@contextlib.asynccontextmanager
async def connect(
    broker: ProductionMosquitto, cn: str | None, *, identifier: str | None = None
) -> AsyncIterator[Client]:
    inner = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier or f"test-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(broker.pki, cn),
        timeout=5,
    )
    async with inner:
        client = Client(inner)
        await client.start_reading()
        try:
            yield client
        finally:
            if client._reader is not None:
                client._reader.cancel()


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


# -- tests ----------------------------------------------------------------------------


async def test_meter_publishes_only_on_its_own_uplink(tls_broker: ProductionMosquitto) -> None:
    async with connect(tls_broker, INGESTD) as ingestd, connect(tls_broker, METER_A) as meter_a:
        assert await ingestd.subscribe("meters/+/up") == 1
        own = marker()
        assert (await meter_a.publish(f"meters/{METER_A}/up", own)).is_failure is False
        await ingestd.wait_for(f"meters/{METER_A}/up", own)

        # Speaking for meter B, or anywhere else, is refused...
        for topic in (
            f"meters/{METER_B}/up",
            f"meters/{METER_A}/down/replay",
            "headend/ingestd/state",
            "other",
        ):
            assert (await meter_a.publish(topic, b"forged")).value == NOT_AUTHORIZED, topic
        # ...and nothing of it arrives: the marker, sent after it, does.
        last = marker()
        await meter_a.publish(f"meters/{METER_A}/up", last)
        await ingestd.wait_for(f"meters/{METER_A}/up", last)
        assert [t for t, p in ingestd.received if p == b"forged"] == []


async def test_meter_reads_only_its_own_downlink(tls_broker: ProductionMosquitto) -> None:
    async with (
        connect(tls_broker, INGESTD) as ingestd,
        connect(tls_broker, METER_A) as meter_a,
        connect(tls_broker, METER_B) as meter_b,
    ):
        # A retained downlink for B, there before A tries to subscribe.
        secret = b"for B only"
        assert (
            await ingestd.publish(f"meters/{METER_B}/down/replay", secret, retain=True)
        ).is_failure is False

        assert await meter_a.subscribe(f"meters/{METER_A}/down/#") == 1
        assert await meter_b.subscribe(f"meters/{METER_B}/down/#") == 1
        # Mosquitto 2.0 grants any subscription (SUBACK success, even for $SYS/#) and
        # applies the read rules to every message it would deliver, retained ones included.
        for broad in (
            f"meters/{METER_B}/down/#",
            "meters/+/down/#",
            "meters/#",
            "#",
            "$share/g/meters/+/down/#",
        ):
            assert await meter_a.subscribe(broad) == 1, broad

        await meter_b.wait_for(f"meters/{METER_B}/down/replay", secret)
        live = b"also for B only"
        await ingestd.publish(f"meters/{METER_B}/down/replay", live)
        await meter_b.wait_for(f"meters/{METER_B}/down/replay", live)
        last = marker()
        await ingestd.publish(f"meters/{METER_A}/down/replay", last)
        await meter_a.wait_for(f"meters/{METER_A}/down/replay", last)
        # The marker came through its own subscription and the broad ones; B's never did.
        assert set(meter_a.received) == {(f"meters/{METER_A}/down/replay", last)}


async def test_ingestd_identity(tls_broker: ProductionMosquitto) -> None:
    async with connect(tls_broker, INGESTD) as ingestd, connect(tls_broker, METER_A) as meter_a:
        assert await ingestd.subscribe("meters/+/up") == 1
        assert await ingestd.subscribe("$share/ingestd/meters/+/up") == 1
        assert await meter_a.subscribe(f"meters/{METER_A}/down/#") == 1
        assert await meter_a.subscribe("headend/+/state") == 1

        request = marker()
        assert (await ingestd.publish(f"meters/{METER_A}/down/replay", request)).is_failure is False
        await meter_a.wait_for(f"meters/{METER_A}/down/replay", request)
        state = b'{"online": true}'
        assert (await ingestd.publish("headend/ingestd/state", state, retain=True)).is_failure is False
        await meter_a.wait_for("headend/ingestd/state", state)

        uplink = marker()
        await meter_a.publish(f"meters/{METER_A}/up", uplink)
        # Once through the plain subscription and once through the shared one.
        await wait_until(lambda: ingestd.received.count((f"meters/{METER_A}/up", uplink)) == 2, within_s=10)


async def test_meter_joining_a_shared_group_takes_nothing_from_ingestd(
    tls_broker: ProductionMosquitto,
) -> None:
    """Why ingestd keeps a plain subscription on this broker (mqtt.shared_group empty).

    Mosquitto 2.0's acl_file never refuses a subscription, so a meter may join any shared
    group; the broker then hands it its turn of the group's messages and drops each one
    at the read check: a shared group of ingestd's silently loses a share of the uplinks.
    A plain subscription is not affected. (Should a later Mosquitto stop the loss, the
    last assertion fails, and shared groups become an option here.)
    """
    async with (
        connect(tls_broker, INGESTD) as ingestd,
        connect(tls_broker, METER_A) as meter_a,
        connect(tls_broker, METER_B) as meter_b,
    ):
        assert await ingestd.subscribe("meters/+/up") == 1
        assert await ingestd.subscribe("$share/ingestd/meters/+/up") == 1
        assert await meter_b.subscribe("$share/ingestd/meters/+/up") == 1
        sent = [marker() for _ in range(10)]
        for payload in sent:
            await meter_a.publish(f"meters/{METER_A}/up", payload)
        # Both copies of each message reach ingestd before any copy of the next one.
        last = marker()
        await meter_a.publish(f"meters/{METER_A}/up", last)
        await ingestd.wait_for(f"meters/{METER_A}/up", last)
        payloads = [p for _, p in ingestd.received]
        # The plain subscription got every message...
        assert all(p in payloads for p in sent)
        assert meter_b.received == []
        # ...while the shared group got only ingestd's turns: B's were dropped.
        assert sum(payloads.count(p) for p in sent) < 2 * len(sent), payloads


def _connect_with_will(topic: str, payload: bytes) -> bytes:
    """An MQTT v5 CONNECT with a retained QoS 1 will (clean start, keepalive 60 s)."""

    def string(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value

    body = (
        string(b"MQTT")
        + bytes([5, 0x2E, 0, 60, 0])  # level 5; flags: will retain, will QoS 1, will, clean start
        + string(b"will-probe")
        + bytes([0])  # no will properties
        + string(topic.encode())
        + string(payload)
    )
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


@pytest.mark.parametrize("cn", [METER_A, INGESTD])
async def test_only_ingestd_will_sets_headend_state(tls_broker: ProductionMosquitto, cn: str) -> None:
    """A meter cannot make the fleet believe the head-end is offline through its will."""
    offline = b'{"online": false}'

    def connect_and_vanish() -> bytes:
        context = client_context(tls_broker.pki, cn)
        with (
            socket.create_connection((tls_broker.host, tls_broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=tls_broker.host) as tls,
        ):
            tls.sendall(_connect_with_will("headend/ingestd/state", offline))
            return tls.recv(64)  # then the socket closes without DISCONNECT: the will fires

    async with connect(tls_broker, METER_B) as meter_b:
        assert await meter_b.subscribe("headend/+/state") == 1
        connack = await asyncio.to_thread(connect_and_vanish)
        # Mosquitto 2.0 accepts the CONNECT either way and checks the will when it fires.
        assert connack[:1] == b"\x20", connack
        assert connack[3:4] == b"\x00", connack  # success
        if cn == INGESTD:
            await meter_b.wait_for("headend/ingestd/state", offline)
        else:
            # The client id in the log is the CN (use_username_as_clientid), not ours.
            gone = f"Client {cn} closed its connection."
            await wait_until(lambda: gone in tls_broker.log_path.read_text(), within_s=10, what=gone)
            last = marker()
            async with connect(tls_broker, INGESTD) as ingestd:
                await ingestd.publish("headend/ingestd/state", last)
            await meter_b.wait_for("headend/ingestd/state", last)
            assert meter_b.received == [("headend/ingestd/state", last)]


async def test_meter_cannot_take_over_ingestd_client_id(tls_broker: ProductionMosquitto) -> None:
    """The broker uses the CN as client id: a meter using ingestd's id takes nothing over."""
    async with connect(tls_broker, INGESTD, identifier=INGESTD) as ingestd:
        assert await ingestd.subscribe("meters/+/up") == 1
        async with connect(tls_broker, METER_A, identifier=INGESTD) as meter_a:
            uplink = marker()
            await meter_a.publish(f"meters/{METER_A}/up", uplink)
            await ingestd.wait_for(f"meters/{METER_A}/up", uplink)


# A minimal MQTT v5 CONNECT: clean start, keepalive 60 s, no properties, client id "probe".
CONNECT = bytes([0x10, 18, 0, 4, *b"MQTT", 5, 0x02, 0, 60, 0, 0, 5, *b"probe"])


def _connect_over_tls(host: str, port: int, context: ssl.SSLContext) -> bytes | Exception:
    """What the broker answers to CONNECT: the CONNACK's first bytes, b"" or the error."""
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(CONNECT)
            return tls.recv(64)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc


@pytest.mark.parametrize("who", ["our certificate", "no certificate", "another CA"])
async def test_client_without_our_certificate_is_refused(
    tls_broker: ProductionMosquitto, tmp_path: Path, who: str
) -> None:
    """The TLS handshake fails without a certificate of our CA: no MQTT at all.

    A raw socket, because paho does not report a TLS alert that arrives before CONNACK
    (aiomqtt just times out)."""
    context = client_context(tls_broker.pki, METER_A if who == "our certificate" else None)
    if who == "another CA":
        context.load_cert_chain(*Pki.create(tmp_path / "other-ca", ca_name="someone else").issue(METER_A))
    answer = await asyncio.to_thread(_connect_over_tls, tls_broker.host, tls_broker.port, context)
    if who == "our certificate":
        assert isinstance(answer, bytes)
        assert answer[:1] == b"\x20", answer  # CONNACK: the control against a test that cannot pass
    else:
        # TLS 1.3 completes the client's side of the handshake before the broker has
        # checked the certificate: its refusal comes as an alert (or a closed socket) on
        # the first read.
        assert isinstance(answer, Exception) or answer == b"", answer


async def test_daemon_over_mutual_tls(
    tls_broker: ProductionMosquitto,
    config: Config,
    store: Store,
    db: asyncpg.Connection[asyncpg.Record],
    key_factory: KeyFactory,
) -> None:
    """The real daemon with ingestd's certificate stores what meter A sends over TLS."""
    fleet = build_fleet(2, prefix="ACL-", interval_s=60, algs=("ES256",), keys=key_factory)
    await register_fleet(store, fleet)
    meter, other = fleet
    cert, key = tls_broker.pki.issue(INGESTD)
    config = dataclasses.replace(
        config,
        mqtt=dataclasses.replace(
            config.mqtt,
            url=tls_broker.url,
            ca_file=str(tls_broker.pki.ca_file),
            cert_file=str(cert),
            key_file=str(key),
        ),
    )
    rng = random.Random(5)
    async with running_daemon(config) as daemon, connect(tls_broker, meter.meter_id) as meter_a:
        assert daemon.ready.is_set()
        # A valid message of meter A on B's uplink: the broker stops it, ingestd never sees it.
        forged = meter.sign(meter.next_body(datetime.now(UTC), rng))
        assert (await meter_a.publish(f"meters/{other.meter_id}/up", forged)).value == NOT_AUTHORIZED
        good = meter.sign(meter.next_body(datetime.now(UTC), rng))
        assert (await meter_a.publish(f"meters/{meter.meter_id}/up", good)).is_failure is False

        async def stored() -> int:
            return int(await db.fetchval("SELECT count(*) FROM raw_messages"))

        deadline = asyncio.get_running_loop().time() + 15
        while await stored() < 1:
            assert asyncio.get_running_loop().time() < deadline, "meter A's message not stored"
            await asyncio.sleep(0.05)
    assert await db.fetchval("SELECT count(*) FROM readings") == 1
    assert await db.fetchval("SELECT meter_id FROM readings") == meter.meter_id
    assert await db.fetchval("SELECT count(*) FROM quarantine") == 0
