"""The fast receive path must hand over exactly what paho's own path does."""

from __future__ import annotations

import socket
import struct

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingestd.mqtt import _FastReceive


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, mid: int, *, flags: int = 0x02, props: bytes = b"") -> bytes:
    variable = struct.pack("!H", len(topic)) + topic
    if flags & 0x06:
        variable += struct.pack("!H", mid)
    variable += _varint(len(props)) + props
    return bytes([0x30 | flags]) + _varint(len(variable) + len(payload)) + variable + payload


STREAM = b"".join(
    [
        _publish(b"meters/M-1/up", b'{"a":1}', 1),
        _publish(b"meters/M-2/up", b"x" * 300, 2, flags=0x0A),  # DUP
        _publish(b"meters/M-3/up", b"expiring", 3, props=b"\x02\x00\x00\x00\x3c"),  # expiry 60 s
        _publish(b"meters/M-4/up", b"qos0", 0, flags=0x00),
        _publish(b"meters/\xc3\xa9/up", b"", 5),
        _publish(b"meters/M-6/up", b"y" * 70000, 6),  # longer than one read
    ]
)


def _receive(*, fast: bool, chunk: int) -> list[tuple[str, bytes, int, int]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 - the socket API
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.manual_ack_set(on=True)
    got: list[tuple[str, bytes, int, int]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload), m.mid, m.qos))
    client._sock = ours
    if fast:
        _FastReceive(client, lambda t, p, m: got.append((t, p, m, 1))).install()
    try:
        for start in range(0, len(STREAM), chunk):
            theirs.sendall(STREAM[start : start + chunk])
            client.loop_read()
        # paho's own path takes one packet per call: call it until nothing more comes.
        before = -1
        while len(got) != before:
            before = len(got)
            client.loop_read()
        return got
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("chunk", [1, 7, 1000, len(STREAM)])
def test_fast_receive_matches_paho(chunk: int) -> None:
    expected = _receive(fast=False, chunk=chunk)
    assert len(expected) == 6
    assert _receive(fast=True, chunk=chunk) == expected
