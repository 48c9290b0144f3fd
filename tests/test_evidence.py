"""``ingestd billing evidence``: a bundle checked by an independent JOSE implementation
(joserfc, not ingestd's code) and by its own verify.py, and any one-byte change to any of
its files detected."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey
from test_cli import cli_env, ingestd

from helpers import SignedMeter, register, store_signed
from ingestd.config import DatabaseConfig
from ingestd.errors import UsageError
from ingestd.evidence import period_bounds
from ingestd.evidence_verify import interpolate
from ingestd.signature import Alg
from ingestd.simulator import KeyFactory
from ingestd.store import Store

RECEIVED = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
# One reading a message: the open boundary read exactly, the close one between two.
READINGS = [
    (datetime(2026, 10, 31, 18, 0, tzinfo=UTC), 4_400),
    (datetime(2026, 11, 1, 0, 0, tzinfo=UTC), 5_000),
    (datetime(2026, 11, 10, 0, 0, tzinfo=UTC), 6_000),
    (datetime(2026, 11, 20, 0, 0, tzinfo=UTC), 7_700),
    (datetime(2026, 11, 30, 18, 0, tzinfo=UTC), 9_000),
    (datetime(2026, 12, 1, 6, 0, tzinfo=UTC), 9_601),
]
# Computed here, not by ingestd: close = 9000 + 601 * 6 h / 12 h = 9300.5, to the even
# Wh 9300; open = 5000 (read).
CONSUMPTION = 9_300 - 5_000
JOSE_KEYS: dict[str, type[ECKey | OKPKey | RSAKey]] = {
    "ES256": ECKey,
    "EdDSA": OKPKey,
    "RS256": RSAKey,
    "PS256": RSAKey,
}


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with Store(DatabaseConfig(url=db_url)) as s:
        yield s


async def meter_with_a_month(store: Store, key_factory: KeyFactory, alg: Alg) -> SignedMeter:
    meter = await register(store, f"E-{alg}", alg, key_factory.new(alg))
    messages = [
        meter.message(seq, readings=[reading], sent=RECEIVED) for seq, reading in enumerate(READINGS, 1)
    ]
    messages.append(
        meter.message(
            len(READINGS) + 1,
            events=[{"t": "2026-11-15T10:00:00Z", "code": "003", "detail": {"lux": 12}}],
            sent=RECEIVED,
        )
    )
    await store_signed(store, messages, received_at=RECEIVED)
    return meter


def evidence(db_url: str, meter: str, out: Path, period: str = "2026-11") -> subprocess.CompletedProcess[str]:
    return ingestd(
        "billing", "evidence", "--meter", meter, "--period", period, "--out", str(out), env=cli_env(db_url)
    )


def run_checker(checker: Path, bundle: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A bundle's verify.py, as anyone runs it: its own directory unless told another."""
    args = [sys.executable, str(checker)] if bundle is None else [sys.executable, str(checker), str(bundle)]
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)


def independent_check(bundle: Path) -> int:
    """Check the bundle without ingestd's code: digests with hashlib, signatures with
    joserfc; returns the consumption the signed readings give. Raises on any mismatch."""
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    assert (bundle / "manifest.json.sha256").read_bytes() == f"{digest}  manifest.json\n".encode()
    manifest = json.loads(manifest_bytes)
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == entry["sha256"], name
    keys = {k["kid"]: k for k in manifest["keys"]}
    signed: dict[datetime, int] = {}
    for entry in manifest["messages"]:
        key = keys[entry["kid"]]
        jose_key = JOSE_KEYS[key["alg"]].import_key((bundle / key["file"]).read_bytes())
        verified = jws.deserialize_json(
            json.loads((bundle / entry["file"]).read_bytes()), jose_key, algorithms=[key["alg"]]
        )
        assert verified.headers()["kid"] == key["kid"]
        body = json.loads(verified.payload)
        assert (body["meter"], body["epoch"], body["seq"]) == (
            manifest["meter_id"],
            entry["epoch"],
            entry["seq"],
        )
        signed.update({datetime.fromisoformat(r["t"]): r["import_wh"] for r in body["readings"]})
    opened = signed[datetime(2026, 11, 1, tzinfo=UTC)]
    before, after = datetime(2026, 11, 30, 18, tzinfo=UTC), datetime(2026, 12, 1, 6, tzinfo=UTC)
    # Half way between the two readings (6 h of 12): the mean, to the even Wh.
    closed = round((signed[before] + signed[after]) / 2)
    assert manifest["boundaries"]["close"]["import_wh"] == closed
    assert manifest["consumption_wh"] == closed - opened
    return closed - opened


def any_files(directory: Path) -> bool:
    return any(directory.iterdir())


@pytest.mark.parametrize("alg", sorted(JOSE_KEYS))
async def test_a_bundle_checks_out_with_an_independent_jose_library(
    db_url: str, store: Store, key_factory: KeyFactory, tmp_path: Path, alg: Alg
) -> None:
    meter = await meter_with_a_month(store, key_factory, alg)
    out = tmp_path / "bundle"
    proc = evidence(db_url, meter.meter_id, out)
    assert proc.returncode == 0, proc.stderr
    assert independent_check(out) == CONSUMPTION
    manifest = json.loads((out / "manifest.json").read_bytes())
    # The boundary messages and every message of the period, and nothing else.
    assert [m["seq"] for m in manifest["messages"]] == [2, 3, 4, 5, 6, 7]
    assert manifest["boundaries"]["open"]["method"] == "read"
    assert manifest["boundaries"]["close"]["method"] == "interpolated"
    assert manifest["status"] == "estimated"
    # Byte for byte what the meter sent.
    async with store.connection() as conn:
        stored = await conn.fetchval(
            "SELECT payload FROM raw_messages WHERE meter_id = $1 AND seq = 5", meter.meter_id
        )
    assert (out / "messages/0-5.jws").read_bytes() == stored

    checker = run_checker(out / "verify.py")
    assert checker.returncode == 0, checker.stdout
    assert f"ok    consumption {CONSUMPTION} Wh, as the manifest says" in checker.stdout


async def test_ds256_is_checked_by_the_bundles_own_verifier(
    db_url: str, store: Store, key_factory: KeyFactory, tmp_path: Path
) -> None:
    """DS256 is no JOSE algorithm: verify.py (cryptography only) is what checks it."""
    meter = await meter_with_a_month(store, key_factory, "DS256")
    out = tmp_path / "bundle"
    assert evidence(db_url, meter.meter_id, out).returncode == 0
    checker = run_checker(out / "verify.py")
    assert checker.returncode == 0, checker.stdout
    assert "ok    6 of 6 signed messages verify" in checker.stdout


async def test_any_one_byte_change_is_detected(
    db_url: str, store: Store, key_factory: KeyFactory, tmp_path: Path
) -> None:
    meter = await meter_with_a_month(store, key_factory, "ES256")
    bundle = tmp_path / "bundle"
    assert evidence(db_url, meter.meter_id, bundle).returncode == 0
    pristine_checker = tmp_path / "verify.py"
    shutil.copy(bundle / "verify.py", pristine_checker)
    files = sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file())
    assert len(files) == 11  # 6 messages, 1 key, manifest, its digest, README, verify.py
    for name in files:
        for where in (0, 0.5, -1):
            copy = tmp_path / f"changed-{str(name).replace('/', '_')}-{where}"
            shutil.copytree(bundle, copy)
            data = bytearray((copy / name).read_bytes())
            at = int(len(data) * where) if where != -1 else len(data) - 1
            data[at] ^= 0x01
            (copy / name).write_bytes(bytes(data))
            checker = run_checker(pristine_checker, copy)
            assert checker.returncode == 1, f"{name} byte {at}: {checker.stdout}"
            assert "bundle does NOT verify" in checker.stdout
            with pytest.raises((AssertionError, ValueError, KeyError)):
                independent_check(copy)
            shutil.rmtree(copy)


async def test_bad_input_is_one_line_and_nothing_is_written(
    db_url: str, store: Store, key_factory: KeyFactory, tmp_path: Path
) -> None:
    meter = await meter_with_a_month(store, key_factory, "EdDSA")
    out = tmp_path / "bundle"
    for args, expected in (
        (
            ("--meter", meter.meter_id, "--period", "2026-13"),
            "--period '2026-13': expected a month as YYYY-MM",
        ),
        (("--meter", "NOBODY", "--period", "2026-11"), "--meter 'NOBODY': no such meter"),
        (("--meter", "a/b", "--period", "2026-11"), "--meter 'a/b' must match"),
    ):
        proc = ingestd("billing", "evidence", *args, "--out", str(out), env=cli_env(db_url))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert expected in proc.stderr
        assert not out.exists()
    assert not any_files(tmp_path)
    out.mkdir()
    (out / "something").write_text("x")
    proc = evidence(db_url, meter.meter_id, out)
    assert proc.returncode == 2
    assert "exists and is not an empty directory" in proc.stderr


def test_period_bounds_are_utc_calendar_months() -> None:
    assert period_bounds("2026-11") == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    assert period_bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    for bad in ("2026-13", "2026-1", "26-11", "2026-11-01", "2026-00"):
        with pytest.raises(UsageError, match="expected a month as YYYY-MM"):
            period_bounds(bad)


def test_interpolation_is_exact_to_the_even_wh() -> None:
    t0 = datetime(2026, 11, 30, 18, tzinfo=UTC)
    t1 = datetime(2026, 12, 1, 6, tzinfo=UTC)
    midnight = datetime(2026, 12, 1, tzinfo=UTC)
    assert interpolate(t0, 9_000, t1, 9_601, midnight) == 9_300  # 9300.5: to the even Wh
    assert interpolate(t0, 9_000, t1, 9_603, midnight) == 9_302  # 9301.5
    assert interpolate(t0, 9_000, t1, 9_900, t0 + timedelta(hours=4)) == 9_300
    # Registers of 2^62 Wh: no float would keep them exact.
    big = 2**62
    assert interpolate(t0, big, t1, big + 2, midnight) == big + 1
