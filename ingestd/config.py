"""Typed configuration: a TOML file, overridden by ``INGESTD_<SECTION>_<KEY>`` variables.

Everything is validated once, at start-up; the rest of the program receives frozen
dataclasses and never looks at the environment or the file again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingestd.errors import ConfigError
from ingestd.files import CONFIG_FILE_MAX, SECRET_FILE_MAX, read_bounded

ENV_PREFIX = "INGESTD_"
CONFIG_ENV = "INGESTD_CONFIG"
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The most seqs a meter must answer in one replay request (docs/protocol.md section 9).
MAX_REPLAY_RANGE = 1000
# Settings renamed since a release: an old file gets told the new name, not just "unknown".
_RENAMED: typing.Final = {"ingest.verify_threads": "ingest.verify_workers"}


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    # The password, if any, belongs in password_file (or a credential), not in the URL.
    url: str = "postgresql://ingestd@127.0.0.1:5432/ingestd"
    password_file: str = ""
    pool_size: int = 4
    connect_timeout_s: float = 10.0
    # A statement still running after this long is cancelled and its batch retried: a
    # connection that went silent (a network partition) must not hang the writer.
    command_timeout_s: float = 60.0
    # At shutdown, connections still busy after this long are cut: a server that stopped
    # answering would otherwise hold the exit for command_timeout_s, past systemd's
    # TimeoutStopSec. Nothing is lost: what was not committed was not acknowledged.
    close_timeout_s: float = 5.0
    # The daemon checks the database this often (and within this time) on a connection of
    # its own, so ingestd_db_up is true even when no uplink traffic flows.
    probe_s: float = 15.0

    def validate(self) -> None:
        _require_url("database.url", self.url, ("postgresql", "postgres"))
        _require_range("database.pool_size", self.pool_size, 2, 64)
        _require_range("database.connect_timeout_s", self.connect_timeout_s, 0.1, 600)
        _require_range("database.command_timeout_s", self.command_timeout_s, 0.1, 3600)
        _require_range("database.close_timeout_s", self.close_timeout_s, 0.1, 600)
        _require_range("database.probe_s", self.probe_s, 0.1, 3600)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    # Fixed, so that the broker keeps our persistent session (and its queue) across restarts.
    client_id: str = "ingestd"
    topic_prefix: str = "meters"
    # When set, several ingestd instances share one subscription ($share/GROUP/...).
    shared_group: str = ""
    # How long the broker keeps our session and queues uplinks while we are away.
    session_expiry_s: int = 7 * 24 * 3600
    keepalive_s: int = 30
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0

    def validate(self) -> None:
        _require_url("mqtt.url", self.url, ("mqtt", "mqtts"))
        if not _CLIENT_ID.fullmatch(self.client_id):
            raise ConfigError("mqtt.client_id", "must be 1-64 of A-Z a-z 0-9 _ . -")
        if not _TOPIC_PREFIX.fullmatch(self.topic_prefix):
            raise ConfigError("mqtt.topic_prefix", "must be topic levels of A-Z a-z 0-9 _ -")
        if self.shared_group and not _CLIENT_ID.fullmatch(self.shared_group):
            raise ConfigError("mqtt.shared_group", "must be 1-64 of A-Z a-z 0-9 _ . -")
        _require_range("mqtt.session_expiry_s", self.session_expiry_s, 0, 2**32 - 1)
        _require_range("mqtt.keepalive_s", self.keepalive_s, 5, 3600)
        _require_range("mqtt.reconnect_initial_s", self.reconnect_initial_s, 0.01, 60)
        _require_range("mqtt.reconnect_max_s", self.reconnect_max_s, self.reconnect_initial_s, 3600)

    def validate_client_files(self) -> None:
        """Checked only for commands that connect to the broker (see ``load_config``)."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("mqtt.cert_file", "cert_file and key_file go together")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def uplink_filter(self) -> str:
        topic = f"{self.topic_prefix}/+/up"
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic


@dataclass(frozen=True, slots=True)
class IngestConfig:
    # A batch is written when it holds batch_max messages or its oldest waited batch_wait_ms.
    batch_max: int = 1000
    batch_wait_ms: int = 50
    # A batch also ends before it holds batch_max_bytes of payload (at least one message):
    # parsed, a large message takes several times its size, and three batches are in
    # memory at once (being verified, waiting, being written).
    batch_max_bytes: int = 4 * 1024 * 1024
    # Unacknowledged messages held in memory; past this, we stop reading the broker socket
    # and the broker keeps the rest (it never loses a QoS 1 message it has not delivered).
    max_pending: int = 20000
    # The same bound in payload bytes, for large messages: 20000 of 64 KiB would be 1.3 GB.
    # Sized for the systemd unit's MemoryMax=1G, with the workers and three batches beside.
    max_pending_bytes: int = 128 * 1024 * 1024
    # Processes that verify signatures beside the event loop (about one per core).
    verify_workers: int = 2
    max_clock_skew_s: int = 300
    # Readings and events may be at most this much older than their message's `sent`
    # (and at most max_clock_skew_s after it), and `sent` this much older than its receipt:
    # the meters' 90 days of flash and a margin. Bounds the hypertable chunks one message,
    # and all messages together, can touch.
    max_data_age_days: float = 100.0
    quarantine_payload_max: int = 4096
    # Quarantine rows older than this are deleted (hourly); 0 keeps them for ever.
    quarantine_retention_days: float = 365.0
    # Keys are cached; unknown kids are looked up at once, the whole set every refresh.
    key_refresh_s: float = 60.0
    # Back-off while the database is unreachable.
    db_retry_initial_s: float = 0.5
    db_retry_max_s: float = 30.0
    shutdown_timeout_s: float = 15.0

    def validate(self) -> None:
        _require_range("ingest.batch_max", self.batch_max, 1, 10000)
        _require_range("ingest.batch_wait_ms", self.batch_wait_ms, 1, 10000)
        _require_range("ingest.max_pending", self.max_pending, self.batch_max, 10_000_000)
        # Neither below one message of the largest size the protocol allows (64 KiB).
        _require_range("ingest.batch_max_bytes", self.batch_max_bytes, 65536, 2**30)
        _require_range("ingest.max_pending_bytes", self.max_pending_bytes, self.batch_max_bytes, 2**40)
        _require_range("ingest.verify_workers", self.verify_workers, 1, 64)
        _require_range("ingest.max_clock_skew_s", self.max_clock_skew_s, 0, 86400)
        _require_range("ingest.max_data_age_days", self.max_data_age_days, 1, 3650)
        _require_range("ingest.quarantine_payload_max", self.quarantine_payload_max, 0, 65536)
        _require_range("ingest.quarantine_retention_days", self.quarantine_retention_days, 0, 36500)
        _require_range("ingest.key_refresh_s", self.key_refresh_s, 0.1, 86400)
        _require_range("ingest.db_retry_initial_s", self.db_retry_initial_s, 0.01, 60)
        _require_range("ingest.db_retry_max_s", self.db_retry_max_s, self.db_retry_initial_s, 3600)
        _require_range("ingest.shutdown_timeout_s", self.shutdown_timeout_s, 0.1, 3600)


@dataclass(frozen=True, slots=True)
class GapsConfig:
    # A gap is acted on only after this long: out-of-order arrival is normal.
    grace_s: float = 60.0
    # Seqs per replay request; a longer outage becomes several requests. At most 1,000:
    # the most a meter must answer in one request (docs/protocol.md section 9).
    max_range: int = 1000
    # Unanswered requests are repeated after retry_initial_s, doubling up to retry_max_s.
    retry_initial_s: float = 60.0
    retry_max_s: float = 21600.0
    # What a meter keeps in flash: an older gap is lost.
    retention_days: float = 90.0
    # How often due gaps are looked for, and how many are taken per round.
    poll_s: float = 1.0
    requests_per_round: int = 100
    # Filled and lost gaps are deleted this long after they closed (0: kept for ever).
    closed_retention_days: float = 400.0
    # A meter with this many requests unanswered (gaps `requested`) gets no new ones until
    # some are answered; it is also the most a meter gets in one round, so that one meter's
    # thousands of gaps cannot hold back the others'.
    max_outstanding_per_meter: int = 10
    # Gaps chased (open or requested) per meter, over all its epochs: a new gap beyond it
    # is recorded lost at once, so that a stolen key cannot grow the gaps table without end.
    max_active_per_meter: int = 1000
    # Admission control, so that a backfill storm cannot bury live data: the answers join
    # live messages in the broker's queue and the pipeline. At most this many seqs asked
    # for and not yet answered (retry not yet due), fleet-wide; a round may pass it by one
    # request (at most max_range seqs), so that any request can go out.
    max_outstanding_seqs: int = 2000
    # No new requests while the pipeline holds more than this share of ingest.max_pending.
    pause_at_pending_share: float = 0.05

    def validate(self) -> None:
        _require_range("gaps.grace_s", self.grace_s, 0, 86400)
        _require_range("gaps.max_range", self.max_range, 1, MAX_REPLAY_RANGE)
        _require_range("gaps.retry_initial_s", self.retry_initial_s, 0.01, 86400)
        _require_range("gaps.retry_max_s", self.retry_max_s, self.retry_initial_s, 30 * 86400)
        _require_range("gaps.retention_days", self.retention_days, 0.001, 3650)
        _require_range("gaps.poll_s", self.poll_s, 0.01, 3600)
        _require_range("gaps.requests_per_round", self.requests_per_round, 1, 100000)
        _require_range("gaps.closed_retention_days", self.closed_retention_days, 0, 36500)
        _require_range("gaps.max_outstanding_per_meter", self.max_outstanding_per_meter, 1, 10000)
        _require_range("gaps.max_active_per_meter", self.max_active_per_meter, 1, 1_000_000)
        _require_range("gaps.max_outstanding_seqs", self.max_outstanding_seqs, 1, 100_000_000)
        _require_range("gaps.pause_at_pending_share", self.pause_at_pending_share, 0.001, 1)


@dataclass(frozen=True, slots=True)
class HeadendConfig:
    # The head-end's private key (PEM), which signs replay requests so that a meter can
    # refuse forged ones; `ingestd keygen` makes one. Empty: no replay requests are sent.
    # The algorithm follows the key: EC P-256 ES256, Ed25519 EdDSA, RSA PS256, DSA DS256.
    key_file: str = ""
    kid: str = ""
    # Names this head-end in its retained state topic headend/{instance}/state.
    instance: str = "ingestd"

    def validate(self) -> None:
        if not _CLIENT_ID.fullmatch(self.instance):
            raise ConfigError("headend.instance", "must be 1-64 of A-Z a-z 0-9 _ . -")

    def validate_signer(self) -> None:
        """Checked only for commands that use the head-end key (see ``load_config``)."""
        if bool(self.key_file) != bool(self.kid):
            raise ConfigError("headend.kid", "key_file and kid go together")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # host:port of the Prometheus endpoint; empty disables it.
    addr: str = "127.0.0.1:9108"

    def validate(self) -> None:
        if self.addr:
            parse_host_port("metrics.addr", self.addr)


@dataclass(frozen=True, slots=True)
class LogConfig:
    # auto: readable lines on a terminal, JSON lines otherwise (journald, files).
    format: str = "auto"
    level: str = "info"

    def validate(self) -> None:
        if self.format not in {"auto", "json", "console"}:
            raise ConfigError("log.format", "must be one of auto, json, console")
        if self.level not in {"debug", "info", "warning", "error"}:
            raise ConfigError("log.level", "must be one of debug, info, warning, error")


@dataclass(frozen=True, slots=True)
class FlagsConfig:
    # A meter silent (no valid message) for longer than this is flagged gray, then red.
    gray_after_s: int = 48 * 3600
    red_after_s: int = 7 * 24 * 3600
    # A power loss is isolated (a breaker, tampering) unless at least isolation_share of the
    # site's other meters also reported one within isolation_window_s of it.
    isolation_window_s: int = 300
    isolation_share: float = 0.5
    # Seconds between refreshes of ingestd_meters{flag} and isolation checks.
    refresh_s: float = 60.0
    # ingestd_meter_last_seen_timestamp_seconds{meter}: one series per meter, off by default.
    per_meter_metrics: bool = False

    def validate(self) -> None:
        _require_range("flags.gray_after_s", self.gray_after_s, 60, 365 * 86400)
        _require_range("flags.red_after_s", self.red_after_s, self.gray_after_s + 1, 3650 * 86400)
        _require_range("flags.isolation_window_s", self.isolation_window_s, 1, 86400)
        if not 0 < self.isolation_share <= 1:
            raise ConfigError(
                "flags.isolation_share", f"must be above 0 and at most 1, got {self.isolation_share:g}"
            )
        _require_range("flags.refresh_s", self.refresh_s, 1, 86400)


@dataclass(frozen=True, slots=True)
class BillingConfig:
    # Billing periods are local calendar months: they start at 00:00 in this IANA time
    # zone on cycle_day, so a period across a DST change is an hour longer or shorter.
    timezone: str = "UTC"
    # 1 to 28: every month has that day.
    cycle_day: int = 1
    # The invoice run is this many days after a period ends; gaps may be filled until then.
    cutoff_days: int = 3
    # Seconds between refreshes of ingestd_billing_meters{period,status} and of the
    # adjustment check. Each costs a pass over two periods' readings, so not every minute.
    refresh_s: float = 900.0

    def validate(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError("billing.timezone", f"unknown IANA time zone {self.timezone!r}") from None
        _require_range("billing.cycle_day", self.cycle_day, 1, 28)
        _require_range("billing.cutoff_days", self.cutoff_days, 0, 27)
        _require_range("billing.refresh_s", self.refresh_s, 1, 86400)


@dataclass(frozen=True, slots=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    gaps: GapsConfig = field(default_factory=GapsConfig)
    headend: HeadendConfig = field(default_factory=HeadendConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    flags: FlagsConfig = field(default_factory=FlagsConfig)
    billing: BillingConfig = field(default_factory=BillingConfig)

    def validate(self, *, broker: bool = True) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        # The head-end asks for gaps up to retention_days old, and replies carry readings
        # that old; a message re-sent with its original bytes (and sent) may be that old
        # too, and then wait at the broker until our session expires. Neither may be refused.
        honest_days = self.gaps.retention_days + self.mqtt.session_expiry_s / 86400
        if self.ingest.max_data_age_days < honest_days:
            raise ConfigError(
                "ingest.max_data_age_days",
                f"must be at least gaps.retention_days plus mqtt.session_expiry_s ({honest_days:g} days),"
                " or honest replays and redeliveries are rejected",
            )
        if broker:
            self.mqtt.validate_client_files()
            self.headend.validate_signer()


def load_config(
    path: str | Path | None = None, env: typing.Mapping[str, str] | None = None, *, broker: bool = True
) -> Config:
    """Read the file (``path``, else ``$INGESTD_CONFIG``, else defaults), apply the
    environment, validate; raise ConfigError naming the offending key.

    ``broker=False`` is for commands that neither connect to the broker nor sign (migrate,
    meter, gaps, status): under systemd the client key and the head-end key are the unit's
    credentials, which such a command run by hand does not have and does not need."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = path if path is not None else env.get(CONFIG_ENV)
    if source:
        data = read_bounded(source, "config", CONFIG_FILE_MAX)
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError("config", f"{source} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{source} is not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for variable in env:
        prefix = variable.removeprefix(ENV_PREFIX).split("_", 1)[0].lower()
        if variable.startswith(ENV_PREFIX) and variable != CONFIG_ENV and prefix not in sections:
            raise ConfigError(variable, "unknown setting (no such section; see ingestd --help)")
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(name, "unknown section")
        if not isinstance(value, dict):
            raise ConfigError(name, "must be a table")
    built: dict[str, Any] = {}
    for name, section in sections.items():
        cls = _section_class(section)
        built[name] = _build_section(name, cls, raw.get(name, {}), _env_overrides(name, cls, env))
    config = Config(**built)
    config.validate(broker=broker)
    return config


def parse_host_port(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # Port 0 asks the kernel for a free port (tests, several instances on one host).
    valid_port = port.isascii() and port.isdigit() and 0 <= int(port) < 65536
    # An IPv6 address must be in brackets, or its colons are read as the port's.
    valid_host = ":" not in host or (host.startswith("[") and host.endswith("]"))
    if not sep or not valid_port or not valid_host:
        raise ConfigError(key, f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an empty host means all


def read_secret(key: str, path: str) -> str:
    """A secret from a file (systemd credentials, Kubernetes secrets), trailing newline cut."""
    try:
        return read_bounded(path, key, SECRET_FILE_MAX).decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not UTF-8 text") from None


def _section_class(section: dataclasses.Field[Any]) -> type[Any]:
    factory = section.default_factory
    assert callable(factory)
    return type(factory())


def _env_overrides(section: str, cls: type[Any], env: typing.Mapping[str, str]) -> dict[str, str]:
    prefix = f"{ENV_PREFIX}{section.upper()}_"
    known = {f.name for f in dataclasses.fields(cls)}
    found: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix) :].lower()
        if key not in known:
            renamed = _RENAMED.get(f"{section}.{key}")
            if renamed is not None:
                new = ENV_PREFIX + renamed.replace(".", "_").upper()
                raise ConfigError(name, f"renamed: use {new}")
            raise ConfigError(name, f"unknown setting (section [{section}] has no key {key!r})")
        found[key] = value
    return found


def _build_section(section: str, cls: type[Any], from_file: dict[str, Any], from_env: dict[str, str]) -> Any:  # noqa: ANN401
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in from_file.items():
        if key not in known:
            renamed = _RENAMED.get(f"{section}.{key}")
            raise ConfigError(f"{section}.{key}", f"renamed: use {renamed}" if renamed else "unknown key")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value, from_env=False)
    for key, text in from_env.items():
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], text, from_env=True)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any, *, from_env: bool) -> Any:  # noqa: ANN401
    """A setting's value as its type. Text from the environment is parsed; a TOML value
    must already have the right type (`batch_max = "500"` is a mistake worth reporting)."""
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, f"unsupported setting type {hint!r}")  # pragma: no cover


def _require_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {_number(low)} and {_number(high)}, got {_number(value)}")


def _number(value: float) -> str:
    # Whole numbers in full: a byte bound read as 4.1943e+06 helps nobody.
    return str(value) if isinstance(value, int) else f"{value:g}"


def _require_url(key: str, value: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"malformed URL: {exc}") from None
    # PostgreSQL URLs may name a Unix socket in their query instead of a host.
    needs_host = schemes[0] != "postgresql"
    if parts.scheme not in schemes or (needs_host and not parts.hostname):
        raise ConfigError(key, f"expected {schemes[0]}://host:port/..., got {value!r}")
    del port
