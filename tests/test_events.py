"""The event code table is kept in one place (ingestd/events.py); everything that repeats
it (docs/events.md, the table in docs/protocol.md, the event_codes table in the database)
is checked against it here."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

from helpers import metric
from ingestd.events import BY_CODE, EVENT_CODES, TAMPER_CODES, UNKNOWN, markdown, metric_code
from ingestd.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_issue_s_codes_and_tamper_class() -> None:
    assert [e.code for e in EVENT_CODES] == [f"{i:03d}" for i in range(1, 16)]
    assert {"003", "005", "007", "011", "013", "014", "015"} == TAMPER_CODES
    assert len({e.name for e in EVENT_CODES}) == len(EVENT_CODES)


def test_docs_events_md_is_generated_from_the_table() -> None:
    assert (DOCS / "events.md").read_text(encoding="utf-8") == markdown(), (
        "docs/events.md is stale: regenerate it as its first lines say"
    )


def test_protocol_md_table_agrees() -> None:
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\d{3})` \| ([^|]+?) \|(?:\s*([^|]*?)\s*\|)?$", text, flags=re.MULTILINE)
    found = {code: (meaning, cls.strip() == "tamper") for code, meaning, cls in rows}
    assert set(found) == set(BY_CODE)
    for code, (meaning, tamper) in found.items():
        assert tamper == BY_CODE[code].tamper, code
        # protocol.md refers to its own section for 010; the rest is word for word.
        assert meaning.split(" (")[0] == BY_CODE[code].meaning.split(" (")[0], code


async def test_event_codes_table_agrees(db: asyncpg.Connection[asyncpg.Record]) -> None:
    rows = await db.fetch("SELECT code, name, meaning, tamper FROM event_codes ORDER BY code")
    assert [(r["code"], r["name"], r["meaning"], r["tamper"]) for r in rows] == [
        (e.code, e.name, e.meaning, e.tamper) for e in EVENT_CODES
    ]


def test_unknown_codes_are_counted_as_unknown() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.count_events({"003": 2, "004": 1, "099": 3, "700": 1})
    r = metrics.registry
    assert metric(r, "ingestd_events_total", code="003") == 2
    assert metric(r, "ingestd_events_total", code="004") == 1
    assert metric(r, "ingestd_events_total", code=UNKNOWN) == 4
    assert metric(r, "ingestd_tamper_events_total", code="003") == 2
    assert metric(r, "ingestd_tamper_events_total", code="004") == 0
    # Every tamper code is exported from the start, so increase() sees the first one.
    for code in TAMPER_CODES:
        assert r.get_sample_value("ingestd_tamper_events_total", {"code": code}) is not None
    assert metric_code("099") == UNKNOWN
