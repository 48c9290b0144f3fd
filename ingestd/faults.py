"""Database errors, by what the batch writer must do about them.

The rule that guards the money: **a message is quarantined (and so acknowledged) only
when the database refused that message's own data, alone.** Every other failure, however
permanent it looks (a full disk, a lock or statement timeout, a revoked grant, a read-only
server after a fail-over), is the infrastructure's: the batch is held, nothing is
acknowledged, and it is written again, after a back-off, until the database takes it.

- ``LOST``: no answer (connection lost or refused, a client-side timeout). The commit may
  have happened; the retry must recognise the batch's own rows (``write_batch(retry=True)``).
- ``TRANSIENT``: the server answered and rolled the transaction back for a reason that
  is not the data: SQLSTATE classes 08 (connection), 25 (read-only transaction), 40
  (serialization, deadlock), 42 (privileges, a missing object), 53 (disk full, out of
  memory or shared memory, too many connections), 55 (lock not available), 57 (statement
  timeout, cancelled, shutdown), 58 (I/O), XX (internal), and anything not listed below.
- ``DATA``: classes 22 (data exception) and 23 (integrity violation), and 54 (a program
  limit such as an index row too large, which a message's content can reach): the batch
  is split to find the message the server refuses.
"""

from __future__ import annotations

import enum
from typing import Final

import asyncpg

from ingestd.store import CONNECTION_ERRORS

__all__ = ["Fault", "classify", "describe", "timed_out"]


class Fault(enum.Enum):
    LOST = "lost"
    TRANSIENT = "transient"
    DATA = "data"


# SQLSTATE classes (the first two characters) whose errors are about the data sent.
_DATA_CLASSES: Final = frozenset({"22", "23", "54"})
# Errors that mean the statement ran out of time: repeated, they make the writer split the
# batch, since one message that is slow to write must not hold every other one back.
_TIMED_OUT: Final = frozenset({"57014"})


def classify(exc: BaseException) -> Fault | None:
    """What a failed write means; None for an exception that is not the database's."""
    if isinstance(exc, CONNECTION_ERRORS):
        return Fault.LOST
    if isinstance(exc, asyncpg.PostgresError):
        state = _sqlstate(exc)
        if state[:2] in _DATA_CLASSES:
            return Fault.DATA
        return Fault.TRANSIENT
    return None


def timed_out(exc: BaseException) -> bool:
    """A client-side timeout, or the server's statement timeout or cancellation."""
    if isinstance(exc, TimeoutError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and _sqlstate(exc) in _TIMED_OUT


def describe(exc: BaseException) -> str:
    """One line for the log: the SQLSTATE, when there is one, and the first line of the message."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if isinstance(exc, asyncpg.PostgresError):
        return f"{_sqlstate(exc)}: {text}"
    return text


def _sqlstate(exc: asyncpg.PostgresError) -> str:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else "XX000"
