"""ingestd: head-end ingestion of signed smart-meter readings, MQTT to TimescaleDB.

The public names below are imported when first used (PEP 562), not with the package: a
verification worker (``python -m ingestd.verifier``) needs only the signature code, and
should not load the daemon, the database driver and the MQTT client to get it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
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

# Each public name, and the module that defines it.
_EXPORTS: Final = {
    "ALGS": "ingestd.signature",
    "REJECT_REASONS": "ingestd.errors",
    "Alg": "ingestd.signature",
    "Config": "ingestd.config",
    "ConfigError": "ingestd.errors",
    "Daemon": "ingestd.daemon",
    "Event": "ingestd.envelope",
    "IngestdError": "ingestd.errors",
    "KeyFileError": "ingestd.errors",
    "Message": "ingestd.envelope",
    "MeterKey": "ingestd.envelope",
    "Metrics": "ingestd.metrics",
    "Reading": "ingestd.envelope",
    "Rejected": "ingestd.errors",
    "ServiceUnavailable": "ingestd.errors",
    "Signer": "ingestd.signature",
    "Store": "ingestd.store",
    "UsageError": "ingestd.errors",
    "check_message": "ingestd.envelope",
    "load_config": "ingestd.config",
    "parse_body": "ingestd.envelope",
}

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


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ingestd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
