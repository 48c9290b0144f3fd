"""ingestd: head-end ingestion of signed smart-meter readings, MQTT to TimescaleDB."""

from ingestd.config import Config, load_config
from ingestd.daemon import Daemon
from ingestd.envelope import Event, Message, MeterKey, Reading, check_message, parse_body
from ingestd.errors import (
    REJECT_REASONS,
    ConfigError,
    IngestdError,
    KeyFileError,
    Rejected,
    ServiceUnavailable,
    UsageError,
)
from ingestd.metrics import Metrics
from ingestd.signature import ALGS, Alg, Signer
from ingestd.store import Store

__all__ = [
    "ALGS",
    "REJECT_REASONS",
    "Alg",
    "Config",
    "ConfigError",
    "Daemon",
    "Event",
    "IngestdError",
    "KeyFileError",
    "Message",
    "MeterKey",
    "Metrics",
    "Reading",
    "Rejected",
    "ServiceUnavailable",
    "Signer",
    "Store",
    "UsageError",
    "check_message",
    "load_config",
    "parse_body",
]
__version__ = "0.1.0"
