"""Errors, grouped by who is at fault (as asyncpg groups its own).

- the operator (a bad setting, a bad command line, a bad key file): ``UsageError``,
  ``ConfigError``, ``KeyFileError``; the CLI prints one line and exits with status 2;
- a meter, or someone posing as one (a message that fails a check): ``Rejected``,
  never raised out of the pipeline: it becomes a quarantine row and a counter;
- the infrastructure (broker or database away): ``ServiceUnavailable``, retried.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

RejectReason = Literal[
    "too_large",
    "bad_json",
    "bad_envelope",
    "unknown_key",
    "revoked_key",
    "alg_mismatch",
    "bad_signature",
    "topic_mismatch",
    "bad_body",
    "clock_skew",
    "seq_conflict",
]
REJECT_REASONS: Final[tuple[RejectReason, ...]] = get_args(RejectReason)


class IngestdError(Exception):
    """Base of every error ingestd raises on purpose."""


class UsageError(IngestdError):
    """The operator asked for something that cannot be done as asked."""


class ConfigError(UsageError):
    """A setting is missing, unknown or out of range; names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class KeyFileError(UsageError):
    """A key file is missing, malformed, of the wrong type or too weak."""


class Rejected(IngestdError):  # noqa: N818 - a verdict, not a failure of ours
    """A message failed a check; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: RejectReason, detail: str, *, kid: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail
        # The key id the (unverified) header claimed, when the header could be read.
        self.kid = kid


class ServiceUnavailable(IngestdError):  # noqa: N818 - reads better at the raise site
    """The broker or the database cannot be reached now; worth retrying."""
