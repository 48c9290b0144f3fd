"""Logging: JSON lines for journald and log shippers, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from ingestd.config import LogConfig


def configure_logging(config: LogConfig, stream: TextIO | None = None, *, cache: bool = True) -> None:
    """Configure structlog and the standard library's logging (used by aiomqtt and asyncpg)
    once, at start-up: logging is process-wide by nature.

    ``cache``: a logger keeps the configuration of its first use for the life of the
    process (cheaper); a test that configures logging in a shared process passes False,
    or every module's logger first used meanwhile would write to its stream for ever."""
    stream = stream or sys.stderr
    level = logging.getLevelNamesMapping()[config.level.upper()]
    as_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    # Libraries' records (asyncpg's pool warnings come with tracebacks) go through the same
    # renderer: one JSON object per line, the traceback inside it. A plain formatter would
    # write the traceback as lines of its own, each a separate journal entry, none JSON.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries below us speak only when something is wrong.
    root.setLevel(max(level, logging.WARNING))
