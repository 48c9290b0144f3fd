"""Prometheus metrics. One registry per daemon (no global state), served over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Self
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ingestd.config import parse_host_port
from ingestd.errors import REJECT_REASONS
from ingestd.events import TAMPER_CODES, is_tamper, metric_code

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
        self.db_up = Gauge("ingestd_db_up", "1 while the last database write succeeded.", registry=r)
        self.pending = Gauge(
            "ingestd_pending_messages",
            "Messages received and not yet acknowledged (held in memory).",
            registry=r,
        )
        self.intake_paused = Gauge(
            "ingestd_intake_paused",
            "1 while reading from the broker is paused because too much is pending.",
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
    """The HTTP endpoint, as an async context manager (prometheus_client serves from a thread)."""

    def __init__(self, metrics: Metrics, addr: str) -> None:
        self._metrics = metrics
        self._addr = addr
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    async def __aenter__(self) -> Self:
        if self._addr:
            host, port = parse_host_port("metrics.addr", self._addr)
            self._server, self._thread = start_http_server(port, addr=host, registry=self._metrics.registry)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
