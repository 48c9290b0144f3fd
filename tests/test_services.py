"""The throw-away servers of tests/services.py behave as the other tests assume."""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import pg_workdir
from services import MosquittoServer, PostgresServer, free_port

TOPIC = "meters/test/readings"


class Subscriber:
    """An MQTT v5 client with a persistent session that never acknowledges on its own."""

    def __init__(self, broker: MosquittoServer, client_id: str, receive_maximum: int | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[bool] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Without a session expiry interval an MQTT v5 session ends at disconnect,
        # whatever clean_start says.
        props.SessionExpiryInterval = 3600
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        self.session_present = self.connacks.get(timeout=5)

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        assert not rc.is_failure, rc
        self.connacks.put(bool(flags.session_present))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def subscribe(self) -> None:
        result, mid = self.client.subscribe(TOPIC, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        # Give SUBACK a moment; the subscription is live once the broker has it.
        deadline = time.monotonic() + 5
        while mid in self.client._out_messages and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)

    def drain(self, expected: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        got: list[mqtt.MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.append(self.messages.get(timeout=0.1))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: MosquittoServer, payloads: list[str]) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub (package mosquitto-clients) is not installed")
    # -l sends one message per stdin line over a single connection, and mosquitto_pub
    # exits only when every QoS 1 message has its PUBACK.
    subprocess.run(
        [
            "mosquitto_pub",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-i",
            "test-publisher",
            "-t",
            TOPIC,
            "-l",
        ],
        input="\n".join(payloads) + "\n",
        text=True,
        check=True,
        timeout=30,
    )


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_mosquitto_runs_on_its_own_port(tmp_path: Path) -> None:
    with (
        MosquittoServer(tmp_path / "a") as a,
        MosquittoServer(tmp_path / "b", extra_conf="# extra line\n") as b,
    ):
        assert a.port != b.port
        assert a.url == f"mqtt://127.0.0.1:{a.port}"
        with socket.create_connection((b.host, b.port), timeout=2):
            pass
        assert "# extra line" in (tmp_path / "b" / "mosquitto.conf").read_text()
        assert "running" in a.log_tail()
    a.stop()  # already stopped by the with block: idempotent
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((a.host, a.port), timeout=2),
    ):
        pass


def test_qos1_message_for_offline_session_survives_restart(tmp_path: Path) -> None:
    with MosquittoServer(tmp_path / "mq") as broker:
        sub = Subscriber(broker, "ingestd-test-sub")
        assert not sub.session_present
        sub.subscribe()
        sub.close()

        publish(broker, ["kept across a restart"])
        broker.restart()

        sub = Subscriber(broker, "ingestd-test-sub")
        try:
            assert sub.session_present
            [msg] = sub.drain(1)
            assert msg.payload == b"kept across a restart"
            assert msg.qos == 1
            sub.client.ack(msg.mid, msg.qos)
        finally:
            sub.close()


def test_manual_ack_subscriber_gets_thousands_in_flight(tmp_path: Path) -> None:
    count = 3000
    with MosquittoServer(tmp_path / "mq") as broker:
        unlimited = Subscriber(broker, "no-receive-maximum")
        windowed = Subscriber(broker, "receive-maximum-50", receive_maximum=50)
        try:
            unlimited.subscribe()
            windowed.subscribe()
            publish(broker, [f"m{i}" for i in range(count)])
            # Nothing is acknowledged, so everything received is in flight at once.
            assert len(unlimited.drain(count)) == count
            # A v5 client's own Receive Maximum overrides max_inflight_messages.
            assert len(windowed.drain(count, timeout=1.0)) == 50
        finally:
            unlimited.close()
            windowed.close()
        assert "dropped" not in broker.log_tail(200)


def _timescaledb_installed(server: PostgresServer) -> bool:
    sharedir = subprocess.run(
        [str(server.bindir / "pg_config"), "--sharedir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return (Path(sharedir) / "extension" / "timescaledb.control").exists()


def test_postgres_lifecycle() -> None:
    with pg_workdir() as workdir:
        _postgres_lifecycle(PostgresServer(workdir / "pg"))


def _postgres_lifecycle(server: PostgresServer) -> None:
    if not _timescaledb_installed(server):
        pytest.skip("TimescaleDB is not installed (deploy/install-timescaledb.sh)")
    with server:
        dsn = server.create_database("ingestd_test")
        assert dsn == f"postgresql://{server.user}@127.0.0.1:{server.port}/ingestd_test"
        server.psql(
            "CREATE EXTENSION timescaledb;"
            " CREATE TABLE r (t timestamptz NOT NULL, v int);"
            " SELECT create_hypertable('r', 't');"
            " INSERT INTO r VALUES (now(), 1);",
            "ingestd_test",
        )

        server.stop()
        server.stop()
        assert not server.running
        server.start()
        server.restart()
        # A commit acknowledged before a crash must survive it.
        server.psql("INSERT INTO r VALUES (now(), 2)", "ingestd_test")
        server.kill()
        assert not server.running
        server.start()
        assert server.psql("SELECT sum(v) FROM r", "ingestd_test").strip() == "3"
        assert server.psql("SHOW synchronous_commit").strip() == "on"
    assert not server.running
