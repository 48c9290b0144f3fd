"""Prometheus metrics. One registry per daemon (no global state), served over HTTP."""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Final, Self

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ingestd.config import parse_host_port
from ingestd.errors import REJECT_REASONS, ConfigError
from ingestd.events import TAMPER_CODES, is_tamper, metric_code

log = structlog.get_logger("ingestd.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """Every metric ingestd exports; names are a contract with operators' dashboards."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "ingestd_messages_received", "Uplink messages taken from the broker.", registry=r
        )
        self.accepted = Counter(
            "ingestd_messages_accepted",
            "Messages verified and stored for the first time.",
            registry=r,
        )
        self.rejected = Counter(
            "ingestd_messages_rejected",
            "Messages rejected and quarantined, by reason.",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "ingestd_messages_duplicate",
            "Messages already stored with the same content (redeliveries, replays).",
            registry=r,
        )
        self.readings_stored = Counter(
            "ingestd_readings_stored", "Reading rows inserted (not counting repeats).", registry=r
        )
        self.events = Counter("ingestd_events", "Event rows inserted, by event code.", ["code"], registry=r)
        self.mqtt_connected = Gauge(
            "ingestd_mqtt_connected", "1 while connected and subscribed to the broker.", registry=r
        )
        self.mqtt_disconnects = Counter(
            "ingestd_mqtt_disconnects",
            "Broker connections that ended (broker restarts, network faults, timeouts).",
            registry=r,
        )
        self.mqtt_fast_path = Gauge(
            "ingestd_mqtt_fast_path",
            "1 while a fast path of the broker link (receive, batched_ack, keepalive_guard) is in"
            " effect, 0 while its slower fallback is (a paho or aiomqtt other than the pinned ones).",
            ["path"],
            registry=r,
        )
        self.db_up = Gauge(
            "ingestd_db_up", "1 while the database answers (the last batch write or probe).", registry=r
        )
        self.pending = Gauge(
            "ingestd_pending_messages",
            "Messages received and not yet acknowledged (held in memory).",
            registry=r,
        )
        self.pending_bytes = Gauge(
            "ingestd_pending_bytes",
            "Payload bytes of the messages received and not yet acknowledged.",
            registry=r,
        )
        self.intake_paused = Gauge(
            "ingestd_intake_paused",
            "1 while reading from the broker is paused because too much is pending.",
            registry=r,
        )
        self.gaps_pruned = Counter(
            "ingestd_gaps_pruned",
            "Closed gaps deleted for being older than gaps.closed_retention_days.",
            registry=r,
        )
        self.quarantine_pruned = Counter(
            "ingestd_quarantine_pruned",
            "Quarantine rows deleted for being older than ingest.quarantine_retention_days.",
            registry=r,
        )
        self.verify_worker_restarts = Counter(
            "ingestd_verify_worker_restarts",
            "Signature verification worker processes that died and were replaced.",
            registry=r,
        )
        self.db_write_seconds = Histogram(
            "ingestd_db_write_seconds",
            "Time to write and commit one batch.",
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self.db_write_errors = Counter(
            "ingestd_db_write_errors", "Batch writes that failed and were retried.", registry=r
        )
        self.batch_size = Histogram(
            "ingestd_batch_size", "Messages per database batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_delay = Histogram(
            "ingestd_sent_to_commit_seconds",
            "Delay from a message's `sent` time to the commit that stored it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.keys_loaded = Gauge(
            "ingestd_keys_loaded", "Meter keys held in the verifier's cache.", registry=r
        )
        self.gaps_open = Gauge("ingestd_gaps_open", "Gaps open or requested (all instances).", registry=r)
        self.gap_seqs_missing = Gauge(
            "ingestd_gap_seqs_missing", "Seqs missing in open or requested gaps.", registry=r
        )
        self.gaps_detected = Counter(
            "ingestd_gaps_detected", "Gaps opened (after splitting at gaps.max_range).", registry=r
        )
        self.gaps_filled = Counter("ingestd_gaps_filled", "Gaps filled completely.", registry=r)
        self.gaps_lost = Counter(
            "ingestd_gaps_lost", "Gaps (or parts) marked lost: event 010 or too old.", registry=r
        )
        self.replay_requests = Counter(
            "ingestd_replay_requests", "Replay requests published to meters.", registry=r
        )
        self.replay_outstanding_seqs = Gauge(
            "ingestd_replay_outstanding_seqs",
            "Seqs asked for and not yet answered, fleet-wide, as of this instance's last round.",
            registry=r,
        )
        self.replay_held_back = Counter(
            "ingestd_replay_held_back",
            "Replay rounds that held requests back: pipeline too busy (pending) or"
            " gaps.max_outstanding_seqs reached (outstanding).",
            ["reason"],
            registry=r,
        )
        self.replay_publish_failures = Counter(
            "ingestd_replay_publish_failures",
            "Replay requests marked but not published (asked again after their back-off).",
            registry=r,
        )
        self.gap_fill_seconds = Histogram(
            "ingestd_gap_fill_seconds",
            "Time from a gap's detection to its fill.",
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400, 30 * 86400),
            registry=r,
        )
        # Meter health (ingestd.health): refreshed every flags.refresh_s.
        self.meters = Gauge(
            "ingestd_meters", "Registered meters by flag (ok, gray, red, never).", ["flag"], registry=r
        )
        self.health_refreshed = Gauge(
            "ingestd_health_refreshed_timestamp_seconds",
            "When ingestd_meters was last refreshed (Unix time): stale while the database is away.",
            registry=r,
        )
        self.tamper_events = Counter(
            "ingestd_tamper_events", "Tamper event rows inserted, by event code.", ["code"], registry=r
        )
        self.isolated_power_loss = Counter(
            "ingestd_isolated_power_loss",
            "Power losses (001) not shared by enough of the site's other meters: breaker or tampering.",
            registry=r,
        )
        self.gap_oldest_open_age = Gauge(
            "ingestd_gap_oldest_open_age_seconds",
            "Age of the oldest gap not yet filled or lost (0 when there is none).",
            registry=r,
        )
        self.clock_offset = Gauge(
            "ingestd_clock_offset_seconds",
            "The host's clock minus the database's, which the daemon goes by (ingestd.clock).",
            registry=r,
        )
        for reason in ("pending", "outstanding"):
            self.replay_held_back.labels(reason=reason)
        # Billing (ingestd.billing): the current and the previous period only, refreshed
        # every billing.refresh_s; a period that is neither any more loses its series.
        self.billing_meters = Gauge(
            "ingestd_billing_meters",
            "Meters by billing status (ready, estimated, pending, review), current and previous period.",
            ["period", "status"],
            registry=r,
        )
        self.billing_period_end = Gauge(
            "ingestd_billing_period_end_timestamp_seconds",
            "When the billing period ends (Unix time), current and previous period.",
            ["period"],
            registry=r,
        )
        self.billing_cutoff = Gauge(
            "ingestd_billing_cutoff_timestamp_seconds",
            "When the billing period's invoice run happens (Unix time), current and previous period.",
            ["period"],
            registry=r,
        )
        self.billing_adjustments_pending = Gauge(
            "ingestd_billing_adjustments_pending",
            "Changes to closed billing statements not yet marked re-billed.",
            registry=r,
        )
        for reason in REJECT_REASONS:
            # Present from the start at 0, so that rate() and alerts work before the first one.
            self.rejected.labels(reason=reason)
        for code in sorted(TAMPER_CODES):
            self.tamper_events.labels(code=code)

    def set_mqtt_fast_path(self, path: str, in_effect: bool) -> None:
        self.mqtt_fast_path.labels(path=path).set(1 if in_effect else 0)

    def count_events(self, stored: Mapping[str, int]) -> None:
        """Count event rows inserted, by code (unknown codes as one label)."""
        for code, count in stored.items():
            self.events.labels(code=metric_code(code)).inc(count)
            if is_tamper(code):
                self.tamper_events.labels(code=code).inc(count)


class LastSeenCollector(Collector):
    """``ingestd_meter_last_seen_timestamp_seconds{meter}``, when enabled: one series per
    meter, replaced as a whole on each refresh, so a removed meter's series goes away."""

    def __init__(self) -> None:
        # Replaced, never mutated: the HTTP thread reads whichever tuple is current.
        self.snapshot: tuple[tuple[str, float], ...] = ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ingestd_meter_last_seen_timestamp_seconds",
            "When each meter was last heard from (Unix time); absent for meters never heard.",
            labels=["meter"],
        )
        for meter, seen in self.snapshot:
            family.add_metric([meter], seen)
        yield family


class MetricsServer:
    """The HTTP endpoint, served from the event loop, as an async context manager.

    prometheus_client's own server gives every connection a thread and never times one
    out, so idle connections pile up threads without bound. This one is a deliberately
    small HTTP/1.0-1.1 server: one ``GET /metrics`` per connection, then close. A
    connection gets ``request_timeout_s`` to send its request head (at most
    ``HEAD_MAX`` bytes) and as long again to take the answer; at most
    ``max_connections`` are open at once, and a new one pushes out the oldest that has
    not sent its request yet, so that idle or slow clients cannot keep a real scrape
    out.
    """

    HEAD_MAX: Final = 8 * 1024

    def __init__(
        self,
        metrics: Metrics,
        addr: str,
        *,
        max_connections: int = 32,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._metrics = metrics
        self._addr = addr
        self._max_connections = max_connections
        self._timeout = request_timeout_s
        self._server: asyncio.Server | None = None
        # Open connections, oldest first; the value says whether its request head is
        # still awaited (only those may be pushed out).
        self._connections: dict[asyncio.StreamWriter, bool] = {}

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def __aenter__(self) -> Self:
        if self._addr:
            host, port = parse_host_port("metrics.addr", self._addr)
            try:
                self._server = await asyncio.start_server(self._serve, host, port, limit=self.HEAD_MAX)
            except OSError as exc:
                # asyncio's message repeats the address in a sentence of its own.
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ConfigError("metrics.addr", f"cannot listen on {self._addr}: {reason}") from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            waiting = next((w for w, head_awaited in self._connections.items() if head_awaited), None)
            if waiting is None:
                # Every slot is answering a request: this one waits for the next scrape.
                writer.transport.abort()
                return
            del self._connections[waiting]
            waiting.transport.abort()
        self._connections[writer] = True
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                response = _response(431, (), b"431 request head too large\n")
            else:
                self._connections[writer] = False
                response = _response(*await self._answer(head))
            writer.write(response)
            # Until the peer has taken all of it: a client that stops reading must not
            # keep the connection (and what is buffered for it) after the slot is freed.
            async with asyncio.timeout(self._timeout):
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            # A client that is too slow, or gone: nothing to tell it.
            writer.transport.abort()
        finally:
            self._connections.pop(writer, None)

    async def _answer(self, head: bytes) -> tuple[int, Sequence[tuple[str, str]], bytes]:
        request = parse_request_head(head)
        if isinstance(request, int):
            return request, (), f"{request} {HTTPStatus(request).phrase}\n".encode()
        if request.method != "GET":
            return 405, (("Allow", "GET"),), b"405 only GET\n"
        if request.path != "/metrics":
            return 404, (), b"404 the metrics are at /metrics\n"
        # Rendered in a thread: at 10,000 per-meter series it takes 60-150 ms (OpenMetrics
        # four times that), too long to hold the event loop (the README's metrics section).
        try:
            return await asyncio.to_thread(render, self._metrics.registry, request.headers)
        except Exception:
            # A collector that fails is a bug of ours; the scrape says so, the daemon goes on.
            log.exception("metrics_render_failed")
            return 500, (), b"500 rendering the metrics failed; see the log\n"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]


def parse_request_head(head: bytes) -> Request | int:
    """A request line and headers, or the status code saying why they are not one."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return 400
    request_line, *lines = text.removesuffix("\r\n\r\n").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        return 400
    method, target, version = parts
    if version not in {"HTTP/1.0", "HTTP/1.1"}:
        return 505 if version.startswith("HTTP/") else 400
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        # No folded lines, no white space before the colon (RFC 9112 section 5).
        if not colon or not name or name != name.strip() or " " in name:
            return 400
        headers[name.lower()] = value.strip()
    return Request(method, target.partition("?")[0], headers)


def render(
    registry: CollectorRegistry, headers: Mapping[str, str]
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The exposition, in the format the client asked for (text or OpenMetrics), gzipped
    when it accepts gzip, as prometheus_client's own server answers."""
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    body = encoder(registry)
    extra = [("Content-Type", content_type)]
    encodings = {e.split(";")[0].strip().lower() for e in headers.get("accept-encoding", "").split(",")}
    if "gzip" in encodings:
        body = gzip.compress(body, compresslevel=6)
        extra.append(("Content-Encoding", "gzip"))
    return 200, extra, body


def _response(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if not any(name == "Content-Type" for name, _ in headers):
        lines.append("Content-Type: text/plain; charset=utf-8")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii") + body
