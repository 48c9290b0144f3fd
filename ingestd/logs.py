"""Logging: JSON lines for journald and log shippers, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from ingestd.config import LogConfig


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's logging (used by aiomqtt and asyncpg)
    once, at start-up: logging is process-wide by nature."""
    stream = stream or sys.stderr
    level = logging.getLevelNamesMapping()[config.level.upper()]
    as_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries below us speak only when something is wrong.
    root.setLevel(max(level, logging.WARNING))
