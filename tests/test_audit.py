"""``ingestd audit verify`` on the real database: a clean store is clean, and each kind
of tampering is found with the exact meter and seq."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import orjson
import pytest
from test_cli import cli_env, ingestd

from helpers import SignedMeter, register, store_signed
from ingestd.audit import Auditor, Finding, _same_detail, describe_change
from ingestd.config import DatabaseConfig, FlagsConfig
from ingestd.health import classify_power_losses
from ingestd.signature import Alg, generate_private_key, public_key_pem
from ingestd.simulator import KeyFactory
from ingestd.store import Store
from ingestd.verifier import VerifierPool

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

RECEIVED = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
START = datetime(2026, 1, 10, 0, 0, tzinfo=UTC)
QUARTER = timedelta(minutes=15)
MESSAGES = 4  # per meter
ALGS_USED: tuple[Alg, ...] = ("ES256", "EdDSA", "DS256", "PS256")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """No broker: nothing here goes through one."""
    async with Store(DatabaseConfig(url=db_url)) as s:
        yield s


@pytest.fixture
async def fleet(store: Store, key_factory: KeyFactory) -> list[SignedMeter]:
    """Four meters (four algorithms), four messages each with two readings; a power loss
    (classified by the daemon's own query) and a cover opening among them."""
    meters = [
        await register(store, f"A-{i}", alg, key_factory.new(alg)) for i, alg in enumerate(ALGS_USED, start=1)
    ]
    messages = []
    for meter in meters:
        for seq in range(1, MESSAGES + 1):
            t = START + 2 * seq * QUARTER
            events = (
                [{"t": "2026-01-10T01:05:00Z", "code": "001"}]
                if seq == 2
                else [{"t": "2026-01-10T01:35:00Z", "code": "003", "detail": {"lux": 40}}]
                if seq == 3
                else []
            )
            messages.append(
                meter.message(
                    seq,
                    readings=[(t, 1000 * seq), (t + QUARTER, 1000 * seq + 400)],
                    events=events,
                    sent=RECEIVED,
                )
            )
    await store_signed(store, messages, received_at=RECEIVED)
    # A meter reset (epoch 1) that sends an interval already stored under epoch 0 with
    # another value: the first stays, and that is no finding.
    await store_signed(
        store,
        [meters[3].message(1, epoch=1, readings=[(START + 2 * QUARTER, 7)], sent=RECEIVED)],
        received_at=RECEIVED + timedelta(minutes=1),
    )
    async with store.connection() as conn:
        assert len(await classify_power_losses(conn, RECEIVED + timedelta(days=1), FlagsConfig())) == 4
    return meters


def audit(db_url: str, *args: str) -> tuple[int, str]:
    proc = ingestd("audit", "verify", *args, env=cli_env(db_url))
    assert proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout


@pytest.mark.usefixtures("fleet")
async def test_a_clean_store_verifies_clean(db_url: str, db: Conn) -> None:
    # Revoked after its messages were received: they still verify, and the report says so.
    await db.execute(
        "UPDATE meter_keys SET revoked_at = $1 WHERE kid = 'A-2-k1'", RECEIVED + timedelta(hours=1)
    )
    status, out = audit(db_url)
    assert status == 0, out
    assert "17 messages checked (32 readings, 8 events)" in out
    assert ": clean" in out
    assert "key A-2-k1 was revoked after 4 message(s) it signed were received" in out
    assert "1 signed reading(s) are stored under another message" in out

    status, out = audit(db_url, "--json")
    assert status == 0
    document = orjson.loads(out)
    assert document["findings"] == []
    assert document["summary"]["messages_checked"] == 17
    assert document["summary"]["keys_revoked_after_receipt"] == {"A-2-k1": 4}
    assert document["summary"]["clean"] is True


def other_pem() -> str:
    return public_key_pem(generate_private_key("ES256").public_key()).decode()


# (what was done in SQL, the finding expected: kind, meter, seq)
TAMPERING: dict[str, tuple[str, list[str]]] = {
    "reading value changed": (
        (
            "UPDATE readings SET import_wh = 5 "
            "WHERE meter_id = 'A-1' AND seq = 2 AND time = '2026-01-10T01:00:00Z'"
        ),
        [
            (
                "reading_altered: meter A-1 epoch 0 seq 2: "
                "reading at 2026-01-10T01:00:00Z: import_wh stored 5, signed 2000"
            )
        ],
    ),
    "reading inserted with no signed message": (
        (
            "INSERT INTO readings (meter_id, time, import_wh, epoch, seq, received_at) "
            "VALUES ('A-2', '2026-01-11T00:00:00Z', 99, 0, 77, '2026-01-10T12:00:00Z')"
        ),
        [
            (
                "reading_unsigned: meter A-2 epoch 0 seq 77: "
                "reading at 2026-01-11T00:00:00Z (import_wh 99): no message"
            )
        ],
    ),
    "reading inserted into a signed message": (
        (
            "INSERT INTO readings (meter_id, time, import_wh, epoch, seq, received_at) "
            "VALUES ('A-2', '2026-01-11T00:00:00Z', 99, 0, 3, '2026-01-10T12:00:00Z')"
        ),
        [
            (
                "reading_unsigned: meter A-2 epoch 0 seq 3: "
                "reading at 2026-01-11T00:00:00Z (import_wh 99) is not in the message"
            )
        ],
    ),
    "raw message byte flipped": (
        # In the body's base64url: another letter of the same alphabet, so it still parses.
        (
            "UPDATE raw_messages "
            "SET payload = set_byte(payload, 100, CASE get_byte(payload, 100) WHEN 65 THEN 66 ELSE 65 END) "
            "WHERE meter_id = 'A-3' AND seq = 3"
        ),
        ["bad_signature: meter A-3 epoch 0 seq 3: signature does not verify with key 'A-3-k1'"],
    ),
    "event deleted": (
        "DELETE FROM events WHERE meter_id = 'A-1' AND seq = 3",
        [
            (
                "event_missing: meter A-1 epoch 0 seq 3: "
                "signed event 003 at 2026-01-10T01:35:00Z (events[0]) is not stored"
            )
        ],
    ),
    "event detail changed": (
        "UPDATE events SET detail = '{\"lux\": 4}' WHERE meter_id = 'A-4' AND seq = 3",
        [
            (
                "event_altered: meter A-4 epoch 0 seq 3: "
                "event 003 at 2026-01-10T01:35:00Z (events[0]): detail stored {'lux': 4}, signed {'lux': 40}"
            )
        ],
    ),
    "ledger digest changed": (
        "UPDATE message_seqs SET digest = sha256('x') WHERE meter_id = 'A-4' AND seq = 4",
        ["digest_mismatch: meter A-4 epoch 0 seq 4: message_seqs digest"],
    ),
    "raw message deleted": (
        "DELETE FROM raw_messages WHERE meter_id = 'A-2' AND seq = 1",
        [
            "ledger_unsigned: meter A-2 epoch 0 seq 1: message_seqs row with no message",
            (
                "reading_unsigned: meter A-2 epoch 0 seq 1: "
                "reading at 2026-01-10T00:30:00Z (import_wh 1000): no message"
            ),
            (
                "reading_unsigned: meter A-2 epoch 0 seq 1: "
                "reading at 2026-01-10T00:45:00Z (import_wh 1400): no message"
            ),
        ],
    ),
    "key swapped in meter_keys": (
        "UPDATE meter_keys SET public_key = $1 WHERE kid = 'A-1-k1'",
        [
            f"bad_signature: meter A-1 epoch 0 seq {seq}: "
            "signature does not verify with key 'A-1-k1' as registered now"
            for seq in range(1, MESSAGES + 1)
        ],
    ),
    "key revoked before the message was received": (
        "UPDATE meter_keys SET revoked_at = '2026-01-10T11:00:00Z' WHERE kid = 'A-3-k1'",
        [
            f"key_not_valid: meter A-3 epoch 0 seq {seq}: key revoked at 2026-01-10T11:00:00Z, "
            "before the message was received (2026-01-10T12:00:00Z): 'A-3-k1'"
            for seq in range(1, MESSAGES + 1)
        ],
    ),
}


@pytest.mark.usefixtures("fleet")
@pytest.mark.parametrize("case", TAMPERING)
async def test_tampering_is_found_with_meter_and_seq(db_url: str, db: Conn, case: str) -> None:
    sql, expected = TAMPERING[case]
    await (db.execute(sql, other_pem()) if "$1" in sql else db.execute(sql))
    status, out = audit(db_url)
    assert status == 1, out
    findings = [line for line in out.splitlines() if not line.startswith((" ", "17 ", "16 "))]
    for line in expected:
        assert any(found.startswith(line) for found in findings), f"{line!r} not in:\n{out}"
    # Nothing else: each finding is one of those expected.
    assert len(findings) == len(expected), out

    status, out = audit(db_url, "--json")
    assert status == 1
    document = orjson.loads(out)
    assert document["summary"]["clean"] is False
    first = expected[0].split(":", 1)[0]
    assert any(f["kind"] == first for f in document["findings"])


@pytest.mark.usefixtures("fleet")
async def test_only_the_meter_and_time_range_asked_for(db_url: str, db: Conn) -> None:
    await db.execute("DELETE FROM events WHERE meter_id = 'A-1' AND seq = 3")
    assert audit(db_url, "--meter", "A-2")[0] == 0
    status, out = audit(db_url, "--from", "2026-01-10T12:00:30Z")
    assert status == 0
    assert out.startswith("1 messages checked")
    status, out = audit(db_url, "--meter", "A-1", "--to", "2026-01-10T12:00:30Z")
    assert status == 1
    assert out.startswith("event_missing: meter A-1 epoch 0 seq 3")


def test_bad_arguments_are_one_line_and_exit_2(db_url: str) -> None:
    proc = ingestd("audit", "verify", "--meter", "no such/meter", env=cli_env(db_url))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "--meter" in proc.stderr
    proc = ingestd(
        "audit",
        "verify",
        "--from",
        "2026-01-02T00:00:00Z",
        "--to",
        "2026-01-01T00:00:00Z",
        env=cli_env(db_url),
    )
    assert proc.returncode == 2
    assert "--to must be later than --from" in proc.stderr


@pytest.mark.usefixtures("fleet")
async def test_chunks_and_events_by_position(store: Store, db: Conn) -> None:
    """Small chunks (signatures checked while the next chunk is read); and events
    compared by their position in the message once events.idx exists (migration 0005)."""
    await db.execute("ALTER TABLE events ADD COLUMN IF NOT EXISTS idx integer")
    await db.execute("UPDATE events SET idx = 0")
    # A position not known (stored by a daemon older than the column): matched by content.
    await db.execute("UPDATE events SET idx = -1 WHERE meter_id = 'A-4' AND seq = 2")
    found: list[Finding] = []
    async with VerifierPool(2) as pool:
        summary = await Auditor(store, pool, topic_prefix="meters", report=found.append, chunk=3).run()
        assert (summary.messages, summary.readings, summary.events) == (17, 32, 8)
        assert found == []
        assert summary.clean
        await db.execute("UPDATE events SET code = '005' WHERE meter_id = 'A-2' AND seq = 3")
        await db.execute("DELETE FROM events WHERE meter_id = 'A-3' AND seq = 2")
        await db.execute(
            "INSERT INTO events (meter_id, time, code, epoch, seq, idx, received_at) "
            "VALUES ('A-1', '2026-01-10T02:00:00Z', '013', 0, 2, -2, '2026-01-10T12:00:00Z')"
        )
        summary = await Auditor(store, pool, topic_prefix="meters", report=found.append, chunk=3).run()
    assert sorted(f.line() for f in found) == [
        (
            "event_altered: meter A-2 epoch 0 seq 3: "
            "event 003 at 2026-01-10T01:35:00Z (events[0]): code stored 005, signed 003"
        ),
        (
            "event_missing: meter A-3 epoch 0 seq 2: "
            "signed event 001 at 2026-01-10T01:05:00Z (events[0]) is not stored"
        ),
        (
            "event_unsigned: meter A-1 epoch 0 seq 2: "
            "event 013 at 2026-01-10T02:00:00Z (no position) is not in the message"
        ),
    ]
    assert summary.findings == {"event_altered": 1, "event_missing": 1, "event_unsigned": 1}


def test_the_daemons_classification_of_a_power_loss_is_no_finding() -> None:
    classified = {"isolated": True, "site_meters": 3, "site_power_losses": 0}
    assert _same_detail({**classified}, {}, "001")
    assert _same_detail({"phase": 2, **classified}, {"phase": 2}, "001")
    assert not _same_detail({"phase": 3, **classified}, {"phase": 2}, "001")
    # Only on power losses, and only the daemon's three keys together.
    assert not _same_detail({**classified}, {}, "003")
    assert not _same_detail({"isolated": True}, {}, "001")
    # A meter that signed "isolated" itself is never classified: its detail must be as signed.
    assert not _same_detail({**classified, "isolated": False}, {"isolated": True}, "001")


def test_a_change_in_one_line() -> None:
    entry = {
        "action": "UPDATE",
        "table_name": "meter_keys",
        "old_values": {"kid": "K", "public_key": "A", "revoked_at": None},
        "new_values": {"kid": "K", "public_key": "B", "revoked_at": "2026-12-01T00:00:00+00:00"},
    }
    assert describe_change(entry) == (
        "public_key: sha256:559aead08264d579 -> sha256:df7e70e5021544f4, "
        "revoked_at: - -> 2026-12-01T00:00:00+00:00"
    )
    assert describe_change({**entry, "action": "DELETE"}) == "kid=K public_key=sha256:559aead08264d579"
    assert describe_change({**entry, "action": "TRUNCATE", "old_values": None, "new_values": None}) == (
        "every row deleted"
    )
