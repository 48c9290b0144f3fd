"""Property: whatever check_message accepts, the database stores, exactly as signed.

test_envelope.py shows that arbitrary signed bodies end as a Message or a Rejected, never
another exception. This closes the other half on the real database: hypothesis builds
signed bodies that pass every check but lie at the edges of what the protocol allows
(times with any offset and up to 9 fraction digits, within the data window of `sent` and
now and then anywhere in years 1-9999 (refused: clock_skew or bad_body), registers up to
2^63-1, epoch and seq anywhere in range, any Unicode and numbers up to 2^64-1 or 1e308 in
a reading's extra fields and an event's detail, unknown members), and writes batches of
them with Store.write_batch. No batch may fail, each message ends new, duplicate or
conflicting, and what is stored is what was signed: the raw bytes, and every reading
and event with its extra data, compared as exact decimals. (It found that the first and
last instants of years 1-9999 reached the database as -infinity and infinity; those are
now refused by the check, which this test also exercises.) About 7 s.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.envelope import MAX_INT64, MeterKey, check_message, format_time, parse_time
from ingestd.errors import Rejected
from ingestd.signature import Signer, generate_private_key
from ingestd.store import Accept, Store

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

METER = "FZ-1"
TOPIC = f"meters/{METER}/up"
SIGNER = Signer("ES256", "fz-1", generate_private_key("ES256"))
KEYS = {SIGNER.kid: MeterKey(SIGNER.kid, METER, "ES256", SIGNER.key.public_key())}

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
NUMBERS = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([2**64 - 1, -(2**63), 1e308, -1.7976931348623157e308, 5e-324, -0.0, 1.2345e19])
)
VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
EXTRA_KEYS = TEXT.filter(lambda k: k not in {"t", "import_wh", "export_wh"})


# Naive on purpose: the local clock text, to which an offset is then appended.
FIRST, LAST = datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)  # noqa: DTZ001
# The first and last representable instants, reached with and without offsets, and the
# ends themselves, which the database driver would turn into -infinity and infinity and
# check_message therefore refuses.
EDGES = [
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "0001-01-01T00:00:00.000001Z",
    "0001-01-01T23:59:00.000001+23:59",
    "9999-12-31T23:59:59.999998999Z",
    "9999-12-31T00:00:59.999998-23:59",
    "1970-01-01T00:00:00Z",
]


@st.composite
def local_times(draw: st.DrawFn, last: datetime = LAST) -> str:
    """RFC 3339 text anywhere in years 1-9999, any offset, 0 to 9 fraction digits."""
    local = draw(st.datetimes(min_value=FIRST, max_value=last))
    digits = draw(st.integers(min_value=0, max_value=9))
    fraction = "." + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits)))
    minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    sign = "-" if minutes < 0 else "+"
    numeric = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    offset = draw(st.sampled_from(["Z", "z", "-00:00", numeric])) if minutes == 0 else numeric
    text = f"{local.year:04d}-{local:%m-%dT%H:%M:%S}"
    return text + (fraction if digits else "") + offset


def times(last: datetime = LAST) -> st.SearchStrategy[str]:
    return local_times(last) | st.sampled_from([e for e in EDGES if int(e[:4]) <= last.year])


@st.composite
def times_near(draw: st.DrawFn, sent: str) -> str:
    """Mostly a time within the data window of ``sent`` (100 days before it to 5 minutes
    after, in any offset and with 0 to 9 fraction digits), sometimes one anywhere in years
    1-9999 (refused by the window unless it happens to fall inside)."""
    try:
        instant = parse_time(sent)
    except ValueError:
        return draw(times())
    if draw(st.integers(0, 19)) == 0:
        return draw(times())
    # A second inside both ends: fewer fraction digits than six truncate the time.
    seconds = draw(st.integers(min_value=-(100 * 86400 - 1), max_value=299))
    micro = draw(st.integers(min_value=0, max_value=999_999))
    minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    try:
        local = instant + timedelta(seconds=seconds, microseconds=micro, minutes=minutes)
    except OverflowError:
        return sent
    if not 1 <= local.year <= 9999 or local in {
        datetime.min.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=UTC),
    }:
        return sent
    sign = "-" if minutes < 0 else "+"
    offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}" if minutes else "Z"
    digits = draw(st.integers(min_value=0, max_value=9))
    fraction = (f"{local.microsecond:06d}" + draw(st.from_regex(r"[0-9]{3}", fullmatch=True)))[:digits]
    return f"{local.year:04d}-{local:%m-%dT%H:%M:%S}" + (f".{fraction}" if digits else "") + offset


def readings(sent: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda t, imp, exp, extra: {
            "t": t,
            "import_wh": imp,
            **({"export_wh": exp} if exp is not None else {}),
            **extra,
        },
        times_near(sent),
        st.integers(min_value=0, max_value=MAX_INT64),
        st.none() | st.integers(min_value=0, max_value=MAX_INT64),
        st.dictionaries(EXTRA_KEYS, VALUES, max_size=3),
    )


def events(sent: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"t": times_near(sent), "code": st.from_regex(r"[0-9]{3}", fullmatch=True)},
        optional={"detail": st.dictionaries(TEXT, VALUES, max_size=3)},
    )


# Before the test's receive time, and after the data window's start (else clock_skew), in
# any offset and precision, and now and then anywhere; a sent in the future is
# test_envelope's. The readings and events are drawn around it, as a meter's are.
RECENT = format_time(datetime.now(UTC) - timedelta(days=1))
BODIES = times_near(RECENT).flatmap(
    lambda sent: st.fixed_dictionaries(
        {
            "v": st.just(1),
            "meter": st.just(METER),
            "epoch": st.integers(min_value=0, max_value=MAX_INT64) | st.integers(min_value=0, max_value=3),
            "seq": st.integers(min_value=1, max_value=MAX_INT64) | st.integers(min_value=1, max_value=5),
            "sent": st.just(sent),
            "readings": st.lists(readings(sent), max_size=4),
        },
        optional={
            "replay": st.booleans(),
            "events": st.lists(events(sent), max_size=3),
            "firmware": VALUES,  # an unknown member: kept in the raw copy only
        },
    )
)


def exact(value: Any, *, parse: bool = False) -> Any:
    """A JSON value with its numbers as exact decimals (as jsonb keeps them); JSON text
    (jsonb as this test's plain connection returns it) is parsed first."""
    if parse and value is not None:
        value = orjson.loads(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return Decimal(repr(value))
    if isinstance(value, list):
        return [exact(v) for v in value]
    return {k: exact(v) for k, v in value.items()}


async def write_and_check(store: Store, db: Conn, batch: list[Accept]) -> None:
    result = await store.write_batch(batch, [])
    outcomes = len(result.accepted) + result.duplicates + len(result.late_rejects)
    assert outcomes == len(batch)
    assert all(r.reason == "seq_conflict" for r in result.late_rejects)
    for accept in result.accepted:
        m = accept.message
        key = (m.meter_id, m.epoch, m.seq)
        raw = await db.fetch(
            "SELECT payload FROM raw_messages WHERE (meter_id, epoch, seq) = ($1, $2, $3)", *key
        )
        assert [r["payload"] for r in raw] == [accept.payload]
        stored = await db.fetch(
            "SELECT time, import_wh, export_wh, extra FROM readings WHERE (meter_id, epoch, seq) = ($1, $2, $3)",  # noqa: E501
            *key,
        )
        # A reading for an interval already stored is not stored again: each stored row
        # is one of the message's readings, exactly.
        signed = [(r.time, r.import_wh, r.export_wh, exact(r.extra)) for r in m.readings]
        for row in stored:
            assert (
                row["time"],
                row["import_wh"],
                row["export_wh"],
                exact(row["extra"], parse=True),
            ) in signed
        events = await db.fetch(
            "SELECT time, code, detail FROM events WHERE (meter_id, epoch, seq) = ($1, $2, $3)", *key
        )
        expected = [(e.time, e.code, exact(e.detail)) for e in m.events]
        for row in events:
            assert (row["time"], row["code"], exact(row["detail"], parse=True)) in expected


async def test_property_whatever_is_accepted_is_stored_as_signed(store: Store, db: Conn) -> None:
    loop = asyncio.get_running_loop()
    now = datetime.now(UTC)
    outcomes = {"accepted": 0, "rejected": 0}
    fresh = itertools.count(10**15)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        bodies=st.lists(st.tuples(st.integers(0, 3).map(lambda n: n == 3), BODIES), min_size=1, max_size=4)
    )
    def prop(bodies: list[tuple[int, dict[str, Any]]]) -> None:
        batch: list[Accept] = []
        seen: set[tuple[int, int]] = set()
        for keep_epoch, body in bodies:
            if not keep_epoch:
                # Mostly a new (epoch, seq), so that most messages are stored; the generated
                # ones repeat, making duplicates and conflicts.
                body["epoch"] = next(fresh)
            payload = SIGNER.sign_body(orjson.dumps(body))
            verdict: Rejected | None = None
            try:
                message = check_message(
                    TOPIC,
                    payload,
                    now,
                    KEYS,
                    topic_prefix="meters",
                    max_clock_skew=timedelta(minutes=5),
                    max_data_age=timedelta(days=100),
                )
            except Rejected as exc:
                verdict = exc
            if verdict is not None:
                # Only what the generator cannot avoid: a sent in the future or older than
                # the window, a time that leaves years 1-9999 once its offset is applied, or
                # one drawn outside the data window on purpose.
                assert verdict.reason in {"clock_skew", "bad_body"}, verdict
                assert (
                    verdict.reason == "clock_skew"
                    or "RFC 3339" in verdict.detail
                    or " before sent " in verdict.detail
                    or " after sent " in verdict.detail
                ), verdict
                outcomes["rejected"] += 1
                continue
            outcomes["accepted"] += 1
            # The pipeline passes each (meter, epoch, seq) once per batch.
            if (message.epoch, message.seq) not in seen:
                seen.add((message.epoch, message.seq))
                batch.append(Accept(message, TOPIC, payload, now))
        if batch:
            asyncio.run_coroutine_threadsafe(write_and_check(store, db, batch), loop).result(timeout=60)

    await asyncio.to_thread(prop)
    # The generator is aimed at acceptance: most messages must get through to the store,
    # and a good share of them with readings (not only heartbeats and conflicts).
    assert outcomes["accepted"] > outcomes["rejected"], outcomes
    assert await db.fetchval("SELECT count(*) FROM readings") >= 20
