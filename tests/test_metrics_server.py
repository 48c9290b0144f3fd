"""The metrics endpoint over real TCP connections: what it answers, and that idle, slow
or too many clients cost no threads and cannot keep a real scrape out."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from helpers import wait_until
from ingestd.errors import ConfigError
from ingestd.metrics import Metrics, MetricsServer, parse_request_head

GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextlib.asynccontextmanager
async def serving(
    *, max_connections: int = 32, request_timeout_s: float = 5.0
) -> AsyncIterator[MetricsServer]:
    metrics = Metrics()
    metrics.received.inc(3)
    server = MetricsServer(
        metrics, "127.0.0.1:0", max_connections=max_connections, request_timeout_s=request_timeout_s
    )
    async with server:
        yield server


def port_of(server: MetricsServer) -> int:
    assert server.port is not None
    return server.port


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request``, read to the end; the status, the headers and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split(" ")[1]), headers, body


async def test_scrape_in_the_text_format() -> None:
    async with serving() as server:
        status, headers, body = await exchange(port_of(server), GET)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"ingestd_messages_received_total 3.0\n" in body


async def test_scrape_by_urllib_over_http_1_0_and_1_1() -> None:
    async with serving() as server:
        url = f"http://127.0.0.1:{port_of(server)}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        _, _, body = await exchange(port_of(server), b"GET /metrics HTTP/1.0\r\n\r\n")
    assert "ingestd_messages_received_total 3.0" in text
    assert b"ingestd_messages_received_total 3.0" in body


async def test_openmetrics_and_gzip_when_the_client_asks() -> None:
    # What Prometheus sends.
    request = (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nAccept: "
        b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n"
    )
    async with serving() as server:
        status, headers, body = await exchange(port_of(server), request)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert headers["content-encoding"] == "gzip"
    text = gzip.decompress(body)
    assert b"ingestd_messages_received_total 3.0\n" in text
    assert text.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"POST /metrics HTTP/1.1\r\n\r\n", 405, id="POST"),
        pytest.param(b"HEAD /metrics HTTP/1.1\r\n\r\n", 405, id="HEAD"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 404, id="other path"),
        pytest.param(b"GET /metrics HTTP/2.0\r\n\r\n", 505, id="HTTP/2.0"),
        pytest.param(b"GET /metrics\r\n\r\n", 400, id="HTTP/0.9"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n", 400, id="header without colon"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", 400, id="space before colon"),
        pytest.param(b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", 400, id="not ASCII"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431, id="head too large"),
    ],
)
async def test_what_is_not_a_scrape_gets_an_error_status(request_bytes: bytes, status: int) -> None:
    async with serving() as server:
        answer, _, _ = await exchange(port_of(server), request_bytes)
        assert answer == status
        assert server.open_connections == 0


def test_parse_request_head() -> None:
    request = parse_request_head(b"GET /metrics?name[]=x HTTP/1.1\r\nAccept: text/plain\r\nHOST:  h \r\n\r\n")
    assert not isinstance(request, int)
    assert (request.method, request.path) == ("GET", "/metrics")
    assert request.headers == {"accept": "text/plain", "host": "h"}


async def test_idle_connections_take_no_threads_and_do_not_block_a_scrape() -> None:
    # A long timeout: what lets the scrape in must be the cap, not idle clients timing out.
    async with serving(max_connections=32, request_timeout_s=300) as server:
        port = port_of(server)
        threads = threading.active_count()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(500)]
        try:
            await wait_until(lambda: sum(r.at_eof() for r, _ in idle) == 500 - 32, what="oldest idle closed")
            assert server.open_connections == 32
            assert threading.active_count() == threads
            # The newest idle connections are still open, and a scrape still gets through.
            status, _, body = await exchange(port, GET)
            assert status == 200
            assert b"ingestd_messages_received_total 3.0" in body
            assert not any(r.at_eof() for r, _ in idle[-31:])
        finally:
            for _, writer in idle:
                writer.close()


async def test_a_slow_client_is_closed_after_the_request_timeout() -> None:
    # Slowloris: a request head that never ends, one header line at a time.
    async with serving(request_timeout_s=0.5) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"GET /metrics HTTP/1.1\r\n")

        async def trickle() -> None:
            for i in range(100):
                writer.write(f"X-{i}: a\r\n".encode())
                await asyncio.sleep(0.05)  # the attacker's pace, not a wait for the server

        trickling = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        finally:
            trickling.cancel()
            writer.close()
        assert 0.5 <= loop.time() - started < 3
        await wait_until(lambda: server.open_connections == 0, what="connection forgotten")


async def test_a_port_in_use_is_one_line_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            async with MetricsServer(Metrics(), f"127.0.0.1:{port}"):
                pass
    assert info.value.key == "metrics.addr"
    assert str(info.value) == f"metrics.addr: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_an_empty_address_serves_nothing() -> None:
    async with MetricsServer(Metrics(), "") as server:
        assert server.port is None


class _Broken(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector bug")


async def test_a_failing_collector_gives_500_and_the_endpoint_goes_on() -> None:
    metrics = Metrics()
    broken = _Broken()
    metrics.registry.register(broken)
    async with MetricsServer(metrics, "127.0.0.1:0") as server:
        status, _, _ = await exchange(port_of(server), GET)
        assert status == 500
        metrics.registry.unregister(broken)
        status, _, _ = await exchange(port_of(server), GET)
        assert status == 200
