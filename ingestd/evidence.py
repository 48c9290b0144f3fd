"""``ingestd billing evidence``: a self-contained bundle that proves one meter's billed
figure for one period to anyone, offline, without trusting the operator's database.

The bundle holds the signed messages (byte for byte as received) that carry the readings
of the period and the boundary readings, the meter's public keys with their validity, a
manifest tying them together with SHA-256 digests, a README and a standalone checker
(``verify.py``: ``ingestd/evidence_verify.py``, which needs only ``cryptography``).

Periods are calendar months in UTC. A boundary's register is the reading at the boundary
when there is one; else it is interpolated linearly between the nearest readings on
either side; with a reading on one side only, it is missing and the figure pending.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson

from ingestd import __version__
from ingestd.envelope import format_time
from ingestd.errors import UsageError
from ingestd.evidence_verify import interpolate

if TYPE_CHECKING:
    Conn = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

FORMAT: Final = "ingestd-evidence/1"
_PERIOD: Final = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
_STATEMENT_NOTE: Final = (
    "No statement file: billing statements (ingestd billing close) are not part of this "
    "version. open, close and consumption_wh above are the head-end's figures from the "
    "stored readings; verify.py recomputes them from the signed messages."
)

_NEAREST: Final = """
(SELECT time, import_wh, epoch, seq FROM readings
 WHERE meter_id = $1 AND time <= $2 ORDER BY time DESC LIMIT 1)
UNION ALL
(SELECT time, import_wh, epoch, seq FROM readings
 WHERE meter_id = $1 AND time > $2 ORDER BY time LIMIT 1)
"""
# Every message with a reading or event in the period, and those with the boundary readings.
_MESSAGES: Final = """
WITH wanted AS (
    SELECT epoch, seq FROM readings WHERE meter_id = $1 AND time >= $2 AND time <= $3
    UNION SELECT epoch, seq FROM events WHERE meter_id = $1 AND time >= $2 AND time < $3
    UNION SELECT * FROM unnest($4::bigint[], $5::bigint[]))
SELECT w.epoch, w.seq, r.received_at, r.kid, r.payload
FROM wanted w LEFT JOIN raw_messages r ON r.meter_id = $1 AND (r.epoch, r.seq) = (w.epoch, w.seq)
ORDER BY w.epoch, w.seq, r.received_at
"""
_KEYS: Final = """
SELECT kid, alg, public_key, valid_from, valid_until, revoked_at FROM meter_keys
WHERE meter_id = $1
  AND (kid = ANY($2) OR (valid_from < $4 AND (valid_until IS NULL OR valid_until > $3)
                         AND (revoked_at IS NULL OR revoked_at > $3)))
ORDER BY valid_from, kid
"""


def period_bounds(text: str) -> tuple[datetime, datetime]:
    """The UTC calendar month YYYY-MM as [start, end)."""
    match = _PERIOD.fullmatch(text)
    if match is None:
        raise UsageError(f"--period {text!r}: expected a month as YYYY-MM, e.g. 2026-11")
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


@dataclass(frozen=True, slots=True)
class _Reading:
    time: datetime
    import_wh: int
    epoch: int
    seq: int

    def message_file(self) -> str:
        return _message_file(self.epoch, self.seq)

    def as_json(self) -> dict[str, Any]:
        return {
            "time": format_time(self.time),
            "import_wh": self.import_wh,
            "epoch": self.epoch,
            "seq": self.seq,
            "message": self.message_file(),
        }


def _message_file(epoch: int, seq: int) -> str:
    return f"messages/{epoch}-{seq}.jws"


async def _boundary(conn: Conn, meter_id: str, at: datetime) -> dict[str, Any]:
    rows = [
        _Reading(r["time"], r["import_wh"], r["epoch"], r["seq"])
        for r in await conn.fetch(_NEAREST, meter_id, at)
    ]
    before = next((r for r in rows if r.time <= at), None)
    after = next((r for r in rows if r.time > at), None)
    if before is not None and before.time == at:
        method, value, used = "read", before.import_wh, [before]
    elif before is not None and after is not None:
        value = interpolate(before.time, before.import_wh, after.time, after.import_wh, at)
        method, used = "interpolated", [before, after]
    else:
        method, value, used = "missing", None, [r for r in (before, after) if r is not None]
    return {
        "time": format_time(at),
        "method": method,
        "import_wh": value,
        "readings": [r.as_json() for r in used],
    }


def check_out(out: Path) -> None:
    """``out`` must not exist, or be an empty directory, in a directory that does."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a bundle holds, as read from the database in one snapshot."""

    meter_id: str
    period: str
    bounds: tuple[datetime, datetime]
    boundaries: tuple[dict[str, Any], dict[str, Any]]
    messages: list[asyncpg.Record]
    keys: list[asyncpg.Record]


async def collect(conn: Conn, meter_id: str, period: str) -> Evidence:
    start, end = period_bounds(period)
    if not await conn.fetchval("SELECT EXISTS (SELECT FROM meters WHERE meter_id = $1)", meter_id):
        raise UsageError(f"--meter {meter_id!r}: no such meter")
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        opening = await _boundary(conn, meter_id, start)
        closing = await _boundary(conn, meter_id, end)
        boundary_readings = [*opening["readings"], *closing["readings"]]
        messages = await conn.fetch(
            _MESSAGES,
            meter_id,
            start,
            end,
            [r["epoch"] for r in boundary_readings],
            [r["seq"] for r in boundary_readings],
        )
        unsigned = [m for m in messages if m["payload"] is None]
        if unsigned:
            m = unsigned[0]
            raise UsageError(
                f"meter {meter_id} epoch {m['epoch']} seq {m['seq']}: rows in readings or events with no "
                "stored signed message (run 'ingestd audit verify')"
            )
        kids = sorted({m["kid"] for m in messages})
        keys = await conn.fetch(_KEYS, meter_id, kids, start, end)
    return Evidence(meter_id, period, (start, end), (opening, closing), messages, keys)


def write(out: Path, evidence: Evidence) -> dict[str, Any]:
    """Write the bundle to ``out``: it appears there whole or not at all (written beside
    it, then renamed). Returns the manifest."""
    check_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = _write(tmp, evidence)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(bundle: Path, evidence: Evidence) -> dict[str, Any]:
    meter_id, period, bounds = evidence.meter_id, evidence.period, evidence.bounds
    files: dict[str, dict[str, Any]] = {}

    def put(name: str, data: bytes) -> None:
        path = bundle / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    listed = []
    for m in evidence.messages:
        name = _message_file(m["epoch"], m["seq"])
        if name in files:
            continue  # a second stored copy: the audit reports it; the first is the one billed
        put(name, bytes(m["payload"]))
        listed.append(
            {
                "file": name,
                "epoch": m["epoch"],
                "seq": m["seq"],
                "kid": m["kid"],
                "received_at": format_time(m["received_at"]),
            }
        )
    key_entries = []
    for k in evidence.keys:
        name = f"keys/{_safe(k['kid'])}.pem"
        put(name, k["public_key"].encode("ascii"))
        key_entries.append(
            {
                "kid": k["kid"],
                "alg": k["alg"],
                "file": name,
                "valid_from": format_time(k["valid_from"]),
                "valid_until": format_time(k["valid_until"]) if k["valid_until"] else None,
                "revoked_at": format_time(k["revoked_at"]) if k["revoked_at"] else None,
            }
        )
    checker = resources.files("ingestd").joinpath("evidence_verify.py").read_bytes()
    put("verify.py", checker)
    opening, closing = evidence.boundaries
    consumption = (
        closing["import_wh"] - opening["import_wh"]
        if opening["import_wh"] is not None and closing["import_wh"] is not None
        else None
    )
    methods = {opening["method"], closing["method"]}
    status = "pending" if "missing" in methods else "estimated" if "interpolated" in methods else "ready"
    put("README.txt", _readme(meter_id, period, consumption, status).encode())
    manifest = {
        "format": FORMAT,
        "created_by": f"ingestd {__version__}",
        "created_at": format_time(datetime.now(UTC)),
        "meter_id": meter_id,
        "period": period,
        "period_start": format_time(bounds[0]),
        "period_end": format_time(bounds[1]),
        "boundaries": {"open": opening, "close": closing},
        "consumption_wh": consumption,
        "status": status,
        "statement": None,
        "statement_note": _STATEMENT_NOTE,
        "messages": listed,
        "keys": key_entries,
        "files": files,
    }
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.json.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    for path in bundle.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() or path.name == "verify.py" else 0o644)  # noqa: PTH101
    return manifest


def _safe(kid: str) -> str:
    # A kid is printable ASCII; a file name must not climb out of keys/.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", kid)


def _readme(meter_id: str, period: str, consumption: int | None, status: str) -> str:
    figure = (
        f"{consumption} Wh" if consumption is not None else "not known yet (a boundary reading is missing)"
    )
    return f"""Evidence bundle: meter {meter_id}, period {period} (UTC calendar month)
Consumption (import): {figure}; status: {status}.

What is here
  messages/EPOCH-SEQ.jws  the meter's signed messages, byte for byte as received: JWS
                          (RFC 7515) in the flattened JSON serialization. The signed
                          body (the "payload" member, base64url) is JSON: meter, epoch,
                          seq, sent, readings [{{t, import_wh, export_wh}}], events.
  keys/KID.pem            the meter's public keys (SubjectPublicKeyInfo PEM); their
                          algorithm and validity are in manifest.json "keys".
  manifest.json           what ties it together: the boundary readings and the messages
                          that carry them, every file with its SHA-256.
  manifest.json.sha256    the SHA-256 of manifest.json (sha256sum format).
  verify.py               a standalone checker: python3 verify.py (needs Python 3.11+
                          and the "cryptography" package only).

How to check it without verify.py
  1. sha256sum -c manifest.json.sha256, then compare each file's SHA-256 with the one
     manifest.json lists for it ("files").
  2. Verify each messages/*.jws with any JOSE library: the protected header's "kid"
     names the key (manifest.json "keys" -> its file), "alg" must be that key's alg.
     RS256, PS256, ES256, EdDSA and Ed25519 are registered JOSE algorithms. DS256 is
     not: it is DSA with SHA-256 over the JWS signing input (protected.payload), the
     signature being r||s, each as wide as the key's q; openssl checks it after
     converting r||s to DER:  openssl dgst -sha256 -verify KEY.pem -signature SIG.der INPUT
  3. The key must have been valid when the message was received ("received_at"):
     valid_from <= received_at < valid_until, and not revoked before it.
  4. The register at each boundary (manifest "boundaries") is the signed reading at
     that time, or else the straight line between the two signed readings around it,
     to the nearest Wh (halves to even). Consumption = close - open.
"""
