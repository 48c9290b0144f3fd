"""Meter event codes: the one table of codes, their meaning and which ones are tampering.

``docs/events.md`` is generated from this table (see :func:`markdown`), and the tests
check it, the table in ``docs/protocol.md`` and the ``event_codes`` table that the
migrations create (for Grafana) against this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True, slots=True)
class EventCode:
    code: str
    # A stable identifier for dashboards and scripts; `meaning` is for people.
    name: str
    meaning: str
    tamper: bool


EVENT_CODES: Final[tuple[EventCode, ...]] = (
    EventCode("001", "power_loss", "power loss", tamper=False),
    EventCode("002", "power_restored", "power restored", tamper=False),
    EventCode("003", "meter_cover_opened", "meter cover opened (light sensor)", tamper=True),
    EventCode("004", "meter_cover_closed", "meter cover closed", tamper=False),
    EventCode("005", "programming_switch_enabled", "programming switch enabled", tamper=True),
    EventCode("006", "programming_switch_disabled", "programming switch disabled", tamper=False),
    EventCode("007", "admin_auth_failure", "administrative authentication failure", tamper=True),
    EventCode("008", "settings_changed", "settings changed", tamper=False),
    EventCode("009", "clock_adjusted", "clock adjusted", tamper=False),
    EventCode("010", "replay_range_unavailable", "replay range unavailable (backfill issue)", tamper=False),
    EventCode("011", "comm_module_replaced", "communication module restarted or replaced", tamper=True),
    EventCode("012", "flash_near_capacity", "flash storage near capacity", tamper=False),
    EventCode("013", "terminal_cover_opened", "terminal cover opened", tamper=True),
    EventCode("014", "magnetic_field", "strong magnetic field detected", tamper=True),
    EventCode("015", "event_log_cleared", "event log cleared", tamper=True),
)
BY_CODE: Final = MappingProxyType({e.code: e for e in EVENT_CODES})
TAMPER_CODES: Final = frozenset(e.code for e in EVENT_CODES if e.tamper)
POWER_LOSS: Final = "001"
POWER_RESTORED: Final = "002"
# The metric label of a code outside the table: a meter may send any 3-digit code, and a
# label per invented code would let one meter grow our metrics without bound.
UNKNOWN: Final = "unknown"


def is_tamper(code: str) -> bool:
    return code in TAMPER_CODES


def metric_code(code: str) -> str:
    """The ``code`` label for ``ingestd_events_total``: the code, or ``unknown``."""
    return code if code in BY_CODE else UNKNOWN


def markdown() -> str:
    """The text of ``docs/events.md``."""
    lines = [
        "# Meter event codes",
        "",
        "<!-- Generated from ingestd/events.py: python -c 'import ingestd.events as e;",
        '     print(e.markdown(), end="")\' > docs/events.md (a test fails when they differ) -->',
        "",
        "Meters report events in the `events` array of an uplink message (see `protocol.md`,",
        "section 4). Every event is stored in the `events` table with its code and `detail`,",
        "whether or not its code is known, and also when another event of the same message",
        "has the same time and code (each is identified by its position in the message);",
        "`ingestd_events_total{code}` counts every event stored: known codes by",
        f"code and all others as `{UNKNOWN}`. Tamper events are also counted in",
        "`ingestd_tamper_events_total{code}`, shown in `meter_health` and in `ingestd status`,",
        "and raise the `IngestdTamperEvent` alert.",
        "",
        "| Code | Name | Meaning | Tamper |",
        "|---|---|---|---|",
        *(f"| `{e.code}` | `{e.name}` | {e.meaning} | {'yes' if e.tamper else ''} |" for e in EVENT_CODES),
        "",
        f"A power loss (`{POWER_LOSS}`) is classified once the isolation window has passed: when",
        "fewer than `flags.isolation_share` of the other meters of the same site also reported a",
        "power loss within `flags.isolation_window_s` of it, the event's `detail` gets",
        '`"isolated": true` (a breaker flipped in one unit, or tampering), otherwise',
        '`"isolated": false` (a building outage), together with `site_meters` (the other',
        "meters of the site) and `site_power_losses` (how many of them reported one).",
        "Isolated ones are counted in `ingestd_isolated_power_loss_total`. A meter with no",
        "site, or alone at its site, has nothing to be compared with: its power losses are",
        "marked isolated.",
        "",
    ]
    return "\n".join(lines)
