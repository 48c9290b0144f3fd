"""Provisioning a fleet: ``ingestd meter import`` and ``ingestd meter export``.

The file is CSV with a header (one row per key; a meter with several keys has several rows)
or JSON lines (one meter per line, its keys in a list). Every row is checked first (keys
parsed with the loader ``meter add`` uses), then the whole file goes to the database in one
transaction: COPY into temporary tables, conflicts with what is registered looked up by
join, then one statement per table. Any bad row and nothing is written; every bad row is
reported with its line number.

Re-importing is idempotent. An existing meter takes the site, interval and maximum power
the file gives (an empty field leaves the registered value). An existing kid must be the
same key (same meter, alg and public key), and a validity or revocation time the file gives
must equal the registered one: then the row is a no-op; anything else is an error for that
row (a key is changed with ``meter revoke-key`` and a new kid, never by an import).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TextIO

import orjson

from ingestd.envelope import KID, METER_ID, parse_time
from ingestd.errors import ConfigError, KeyFileError, UsageError
from ingestd.files import IMPORT_LINE_MAX, KEY_FILE_MAX, bounded_lines, open_regular, read_bounded
from ingestd.signature import ALGS, Alg, is_alg, load_public_key, public_key_pem

if TYPE_CHECKING:
    import asyncpg

    Conn = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

Format = Literal["csv", "jsonl"]
FORMATS: Final[tuple[Format, ...]] = ("csv", "jsonl")
METER_FIELDS: Final = ("meter_id", "site", "interval_s", "max_power_w")
KEY_FIELDS: Final = ("alg", "kid", "public_key", "public_key_file", "valid_from", "valid_until", "revoked_at")
CSV_COLUMNS: Final = (*METER_FIELDS, *KEY_FIELDS)
# Bad rows listed before "and N more": enough to see the pattern of a broken export.
ERRORS_SHOWN: Final = 100
_INT32_MAX: Final = 2**31 - 1
_SITE_MAX: Final = 256


@dataclass(frozen=True, slots=True)
class MeterRow:
    line: int
    meter_id: str
    site: str | None
    interval_s: int | None
    max_power_w: int | None


@dataclass(frozen=True, slots=True)
class KeyRow:
    line: int
    meter_id: str
    kid: str
    alg: Alg
    # Re-encoded by the loader: one spelling for one key, whatever the file's line ends.
    public_key: str
    valid_from: datetime | None
    valid_until: datetime | None
    revoked_at: datetime | None


@dataclass(slots=True)
class Plan:
    """What a file asks for, and what is wrong with it (line, problem)."""

    meters: dict[str, MeterRow] = field(default_factory=dict)
    keys: list[KeyRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Outcome:
    meters_new: int
    meters_updated: int
    meters_unchanged: int
    keys_new: int
    keys_registered: int


class BadRowsError(UsageError):
    """Rows of an import file that cannot be imported; nothing was written."""

    def __init__(self, path: str, errors: Sequence[tuple[int, str]]) -> None:
        super().__init__(f"FILE {path}: {len(errors)} bad row(s), nothing imported")
        self.errors = sorted(errors)

    def lines(self, path: str) -> list[str]:
        shown = [f"{path} line {line}: {problem}" for line, problem in self.errors[:ERRORS_SHOWN]]
        if len(self.errors) > ERRORS_SHOWN:
            shown.append(f"... and {len(self.errors) - ERRORS_SHOWN} more")
        return shown


def format_of(path: str, given: str | None) -> Format:
    """``given``, else the file's extension (.csv, .jsonl, .ndjson)."""
    if given is not None:
        return "jsonl" if given == "jsonl" else "csv"
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson"}:
        return "jsonl"
    raise UsageError(f"FILE {path}: cannot tell the format from its extension (use --format csv|jsonl)")


# -- reading a file -----------------------------------------------------------------------


def read_plan(path: str, fmt: Format) -> Plan:
    """Every row of the file, checked on its own and against the file's other rows."""
    base = Path(path).parent
    plan = Plan()
    kid_lines: dict[str, int] = {}
    with open_regular(path, "FILE") as fh:
        lines = bounded_lines(fh, path, "FILE", IMPORT_LINE_MAX)
        records = _csv_records(lines, path) if fmt == "csv" else _jsonl_records(lines)
        for line, record in records:
            try:
                meter, keys = _row(record, line, base, fmt)
                _add(plan, meter, keys, kid_lines, fmt)
            except _RowError as exc:
                plan.errors.append((line, str(exc)))
    if not plan.meters and not plan.errors:
        raise UsageError(f"FILE {path}: no meters in it")
    return plan


class _RowError(Exception):
    """What is wrong with one row."""


# A record: its fields by name, or what makes it no record at all.
_Record = Mapping[str, object] | str


def _csv_records(lines: Iterator[tuple[int, str]], path: str) -> Iterator[tuple[int, _Record]]:
    numbers = [0]

    def text() -> Iterator[str]:
        for number, line in lines:
            numbers[0] = number
            yield line

    reader = csv.reader(text(), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = [c.strip() for c in header]
        unknown = [c for c in columns if c not in CSV_COLUMNS]
        if unknown:
            raise UsageError(
                f"FILE {path} line 1: unknown column {unknown[0]!r} (columns: {', '.join(CSV_COLUMNS)})"
            )
        missing = [c for c in ("meter_id", "alg", "kid") if c not in columns]
        if missing:
            raise UsageError(f"FILE {path} line 1: no column {missing[0]!r}")
        if "public_key" not in columns and "public_key_file" not in columns:
            raise UsageError(f"FILE {path} line 1: no column 'public_key' or 'public_key_file'")
        if len(set(columns)) != len(columns):
            raise UsageError(f"FILE {path} line 1: a column is named twice")
        start = numbers[0] + 1
        for row in reader:
            if row and any(cell.strip() for cell in row):
                if len(row) != len(columns):
                    yield start, f"{len(row)} fields, the header has {len(columns)}"
                else:
                    yield start, dict(zip(columns, row, strict=True))
            start = numbers[0] + 1
    except csv.Error as exc:
        # The reader cannot resynchronise after a broken quote: the rest is not rows.
        raise UsageError(f"FILE {path} line {numbers[0]}: not CSV ({exc})") from None


def _jsonl_records(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, _Record]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield number, f"not JSON ({exc})"
            continue
        if not isinstance(record, dict):
            yield number, "not a JSON object"
            continue
        yield number, record


def _row(record: _Record, line: int, base: Path, fmt: Format) -> tuple[MeterRow, list[KeyRow]]:
    if isinstance(record, str):
        raise _RowError(record)
    if fmt == "jsonl":
        unknown = sorted(set(record) - {*METER_FIELDS, "keys"})
        if unknown:
            raise _RowError(f"unknown member {unknown[0]!r} (members: {', '.join(METER_FIELDS)}, keys)")
    meter_id = _text(record, "meter_id", required=True)
    assert meter_id is not None
    if not METER_ID.fullmatch(meter_id):
        raise _RowError(f"meter_id {meter_id!r} must match [A-Za-z0-9_-]{{1,64}}")
    site = _text(record, "site")
    if site is not None and (len(site) > _SITE_MAX or not site.isprintable()):
        raise _RowError(f"site must be at most {_SITE_MAX} printable characters")
    meter = MeterRow(line, meter_id, site, _count(record, "interval_s"), _count(record, "max_power_w"))
    if fmt == "csv":
        return meter, [_key(record, meter_id, line, base, "")]
    raw_keys = record.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise _RowError("keys must be a list of at least one key")
    keys = []
    for i, raw in enumerate(raw_keys):
        where = f"keys[{i}]."
        if not isinstance(raw, dict):
            raise _RowError(f"keys[{i}] is not an object")
        unknown = sorted(set(raw) - set(KEY_FIELDS))
        if unknown:
            raise _RowError(f"{where}{unknown[0]}: unknown member (members: {', '.join(KEY_FIELDS)})")
        keys.append(_key(raw, meter_id, line, base, where))
    return meter, keys


def _key(record: Mapping[str, object], meter_id: str, line: int, base: Path, where: str) -> KeyRow:
    alg = _text(record, "alg", required=True, where=where)
    if not is_alg(alg):
        raise _RowError(f"{where}alg {alg!r} is not one of {', '.join(ALGS)}")
    kid = _text(record, "kid", required=True, where=where)
    assert kid is not None
    if not KID.fullmatch(kid):
        raise _RowError(f"{where}kid {kid!r} must be 1-128 printable ASCII characters, no spaces")
    inline = _text(record, "public_key", where=where)
    path = _text(record, "public_key_file", where=where)
    if (inline is None) == (path is None):
        raise _RowError(f"{where}public_key or public_key_file: exactly one of them is needed")
    if inline is not None:
        pem = inline.encode("utf-8")
        if len(pem) > KEY_FILE_MAX:
            raise _RowError(
                f"{where}public_key: larger than the {KEY_FILE_MAX // 1024} KiB allowed for a key"
            )
        what = f"{where}public_key"
    else:
        assert path is not None
        # Relative to the import file, so that a directory of keys moves with its list.
        what = f"{where}public_key_file {path}"
        try:
            pem = read_bounded(base / path, f"{where}public_key_file", KEY_FILE_MAX)
        except ConfigError as exc:
            raise _RowError(str(exc)) from None
    try:
        key = load_public_key(pem, alg)
    except KeyFileError as exc:
        raise _RowError(f"{what}: {exc}") from None
    valid_from = _time(record, "valid_from", where)
    valid_until = _time(record, "valid_until", where)
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise _RowError(f"{where}valid_until must be later than valid_from")
    return KeyRow(
        line,
        meter_id,
        kid,
        alg,
        public_key_pem(key).decode("ascii"),
        valid_from,
        valid_until,
        _time(record, "revoked_at", where),
    )


def _text(record: Mapping[str, object], name: str, *, required: bool = False, where: str = "") -> str | None:
    """A text field; None when absent, null or empty (CSV has no null)."""
    value = record.get(name)
    if value is None or value == "":
        if required:
            raise _RowError(f"{where}{name} is missing")
        return None
    if not isinstance(value, str):
        raise _RowError(f"{where}{name} must be a string")
    return value


def _count(record: Mapping[str, object], name: str) -> int | None:
    """A whole number above 0 that fits the database's integer; None when not given."""
    value = record.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise _RowError(f"{name} {value!r} is not a whole number") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _RowError(f"{name} must be a whole number")
    if not 0 < number <= _INT32_MAX:
        raise _RowError(f"{name} {number} must be between 1 and {_INT32_MAX}")
    return number


def _time(record: Mapping[str, object], name: str, where: str) -> datetime | None:
    text = _text(record, name, where=where)
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise _RowError(
            f"{where}{name} {text!r} is not an RFC 3339 time such as 2027-01-01T00:00:00Z"
        ) from None


def _add(
    plan: Plan,
    meter: MeterRow,
    keys: list[KeyRow],
    kid_lines: dict[str, int],
    fmt: Format,
) -> None:
    """Adds a checked row to the plan, if it agrees with the file's earlier rows."""
    first = plan.meters.get(meter.meter_id)
    if first is not None:
        if fmt == "jsonl":
            raise _RowError(f"meter {meter.meter_id} is already on line {first.line}")
        # A meter's fields are its first row's: later rows leave them empty or repeat them.
        for name in METER_FIELDS[1:]:
            mine, theirs = getattr(meter, name), getattr(first, name)
            if mine is not None and mine != theirs:
                raise _RowError(
                    f"{name} {mine!r} of meter {meter.meter_id} differs from its first row's "
                    f"(line {first.line}: {theirs!r})"
                )
    seen: set[str] = set()
    for key in keys:
        earlier = kid_lines.get(key.kid)
        if earlier is not None:
            raise _RowError(f"kid {key.kid!r} is already on line {earlier}")
        if key.kid in seen:
            raise _RowError(f"kid {key.kid!r} is twice in this row")
        seen.add(key.kid)
    for key in keys:
        kid_lines[key.kid] = key.line
    if first is None:
        plan.meters[meter.meter_id] = meter
    plan.keys.extend(keys)


# -- the database ---------------------------------------------------------------------------

_TEMP_TABLES: Final = """
CREATE TEMPORARY TABLE import_meters (
    line integer, meter_id text, site text, interval_s integer, max_power_w integer
) ON COMMIT DROP;
CREATE TEMPORARY TABLE import_keys (
    line integer, kid text, meter_id text, alg text, public_key text,
    valid_from timestamptz, valid_until timestamptz, revoked_at timestamptz
) ON COMMIT DROP;
"""
# Existing rows are updated only where the file changes them: a re-import writes nothing.
_UPDATE_METERS: Final = """
UPDATE meters m SET site = COALESCE(i.site, m.site),
                    interval_s = COALESCE(i.interval_s, m.interval_s),
                    max_power_w = COALESCE(i.max_power_w, m.max_power_w)
FROM import_meters i
WHERE m.meter_id = i.meter_id
  AND (COALESCE(i.site, m.site), COALESCE(i.interval_s, m.interval_s), COALESCE(i.max_power_w, m.max_power_w))
      IS DISTINCT FROM (m.site, m.interval_s, m.max_power_w)
"""
_INSERT_METERS: Final = """
INSERT INTO meters (meter_id, site, interval_s, max_power_w)
SELECT meter_id, site, COALESCE(interval_s, 900), max_power_w FROM import_meters
ON CONFLICT (meter_id) DO NOTHING
"""
_INSERT_KEYS: Final = """
INSERT INTO meter_keys (kid, meter_id, alg, public_key, valid_from, valid_until, revoked_at)
SELECT kid, meter_id, alg, public_key, COALESCE(valid_from, now()), valid_until, revoked_at
FROM import_keys
ON CONFLICT (kid) DO NOTHING
"""
_REGISTERED_KEYS: Final = """
SELECT i.line, i.kid, i.meter_id, i.alg, i.public_key, i.valid_from, i.valid_until, i.revoked_at,
       k.meter_id AS db_meter_id, k.alg AS db_alg, k.public_key AS db_public_key,
       k.valid_from AS db_valid_from, k.valid_until AS db_valid_until, k.revoked_at AS db_revoked_at
FROM import_keys i JOIN meter_keys k USING (kid)
"""
# A new key without valid_from is valid from now (the database's), as with `meter add`.
_EXPIRED_NEW_KEYS: Final = """
SELECT i.line, i.kid FROM import_keys i
WHERE i.valid_from IS NULL AND i.valid_until <= now()
  AND NOT EXISTS (SELECT FROM meter_keys k WHERE k.kid = i.kid)
"""


async def apply_plan(conn: Conn, plan: Plan, path: str, *, dry_run: bool) -> Outcome:
    """Writes the plan in one transaction (rolled back for a dry run); BadRowsError, and
    nothing written, when a row of the file or of the database says no."""
    try:
        async with conn.transaction():
            # Held to the commit: a `meter add` of one of the file's kids between the
            # conflict check and the insert would otherwise be skipped silently (ON CONFLICT
            # DO NOTHING) as if it were this key. The daemon only reads, which this allows.
            await conn.execute("LOCK TABLE meter_keys IN SHARE ROW EXCLUSIVE MODE")
            await conn.execute(_TEMP_TABLES)
            await conn.copy_records_to_table(
                "import_meters",
                records=[
                    (m.line, m.meter_id, m.site, m.interval_s, m.max_power_w) for m in plan.meters.values()
                ],
            )
            await conn.copy_records_to_table(
                "import_keys",
                records=[
                    (
                        k.line,
                        k.kid,
                        k.meter_id,
                        k.alg,
                        k.public_key,
                        k.valid_from,
                        k.valid_until,
                        k.revoked_at,
                    )
                    for k in plan.keys
                ],
            )
            _refuse_bad_rows(path, [*plan.errors, *await _database_conflicts(conn)])
            updated = _row_count(await conn.execute(_UPDATE_METERS))
            inserted = _row_count(await conn.execute(_INSERT_METERS))
            keys_new = _row_count(await conn.execute(_INSERT_KEYS))
            outcome = Outcome(
                meters_new=inserted,
                meters_updated=updated,
                meters_unchanged=len(plan.meters) - inserted - updated,
                keys_new=keys_new,
                keys_registered=len(plan.keys) - keys_new,
            )
            if dry_run:
                # Written and rolled back: a dry run meets every check a real one would.
                _roll_back(outcome)
    except _DryRun as done:
        return done.outcome
    return outcome


class _DryRun(Exception):  # noqa: N818 - not an error: how a dry run rolls back
    def __init__(self, outcome: Outcome) -> None:
        super().__init__("dry run")
        self.outcome = outcome


def _roll_back(outcome: Outcome) -> None:
    raise _DryRun(outcome)


def _refuse_bad_rows(path: str, errors: list[tuple[int, str]]) -> None:
    if errors:
        raise BadRowsError(path, errors)


async def _database_conflicts(conn: Conn) -> list[tuple[int, str]]:
    errors = list(_registered_conflicts(await conn.fetch(_REGISTERED_KEYS)))
    errors.extend(
        (r["line"], f"kid {r['kid']!r}: valid_until is not later than now, when the key would start")
        for r in await conn.fetch(_EXPIRED_NEW_KEYS)
    )
    return errors


def _registered_conflicts(rows: Iterable[asyncpg.Record]) -> Iterator[tuple[int, str]]:
    """Rows whose kid is registered already, unless it is the same key: then a no-op."""
    for r in rows:
        kid = r["kid"]
        if r["db_meter_id"] != r["meter_id"]:
            yield r["line"], f"kid {kid!r} is already registered to meter {r['db_meter_id']}"
            continue
        if r["db_alg"] != r["alg"] or not _same_key(r["db_public_key"], r["public_key"], r["alg"]):
            yield r["line"], f"kid {kid!r} is already registered with another key or alg"
            continue
        for name in ("valid_from", "valid_until", "revoked_at"):
            given, registered = r[name], r[f"db_{name}"]
            if given is not None and given != registered:
                shown = registered.isoformat() if registered is not None else "none"
                yield r["line"], f"kid {kid!r}: {name} differs from the registered one ({shown})"
                break


def _same_key(registered: str, canonical: str, alg: Alg) -> bool:
    if registered == canonical:
        return True
    # Registered by `meter add`, as its file spelled it: compared as keys, not text.
    try:
        return public_key_pem(load_public_key(registered.encode(), alg)).decode() == canonical
    except KeyFileError:
        return False


def _row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])


# -- export ---------------------------------------------------------------------------------

_EXPORT: Final = """
SELECT m.meter_id, m.site, m.interval_s, m.max_power_w,
       k.alg, k.kid, k.public_key, k.valid_from, k.valid_until, k.revoked_at
FROM meters m JOIN meter_keys k USING (meter_id)
ORDER BY m.meter_id, k.valid_from, k.kid
"""


async def export_rows(conn: Conn) -> tuple[list[asyncpg.Record], int]:
    """Every key with its meter's fields; and how many meters have no key (not exported:
    an import needs at least one)."""
    rows = await conn.fetch(_EXPORT)
    keyless = await conn.fetchval(
        "SELECT count(*) FROM meters m "
        "WHERE NOT EXISTS (SELECT FROM meter_keys k WHERE k.meter_id = m.meter_id)"
    )
    return rows, int(keyless)


def _time_text(value: datetime | None) -> str | None:
    # Microseconds kept: a re-import compares the times with the registered ones.
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def render(rows: Sequence[asyncpg.Record], fmt: Format, out: TextIO) -> None:
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        columns = [c for c in CSV_COLUMNS if c != "public_key_file"]
        writer.writerow(columns)
        for r in rows:
            writer.writerow(
                [
                    r["meter_id"],
                    r["site"] or "",
                    r["interval_s"],
                    r["max_power_w"] or "",
                    r["alg"],
                    r["kid"],
                    r["public_key"],
                    _time_text(r["valid_from"]) or "",
                    _time_text(r["valid_until"]) or "",
                    _time_text(r["revoked_at"]) or "",
                ]
            )
        return
    meter: dict[str, object] | None = None
    for r in rows:
        if meter is None or meter["meter_id"] != r["meter_id"]:
            if meter is not None:
                out.write(orjson.dumps(meter).decode() + "\n")
            meter = {
                "meter_id": r["meter_id"],
                "site": r["site"],
                "interval_s": r["interval_s"],
                "max_power_w": r["max_power_w"],
                "keys": [],
            }
        key = {
            "alg": r["alg"],
            "kid": r["kid"],
            "public_key": r["public_key"],
            "valid_from": _time_text(r["valid_from"]),
            "valid_until": _time_text(r["valid_until"]),
            "revoked_at": _time_text(r["revoked_at"]),
        }
        keys = meter["keys"]
        assert isinstance(keys, list)
        keys.append({k: v for k, v in key.items() if v is not None})
    if meter is not None:
        out.write(orjson.dumps(meter).decode() + "\n")


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: a reader never sees half an export."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rendered(rows: Sequence[asyncpg.Record], fmt: Format) -> str:
    buffer = io.StringIO()
    render(rows, fmt, buffer)
    return buffer.getvalue()
