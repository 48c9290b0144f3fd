"""Billing period arithmetic and the statement's pure parts: no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingestd.billing import (
    Boundary,
    check_reportable,
    cutoff,
    expected_intervals,
    grid_after,
    interpolate,
    parse_period,
    period_containing,
    period_of,
    previous_period,
    status_of,
)
from ingestd.config import BillingConfig, load_config
from ingestd.errors import ConfigError, UsageError

UTC_CFG = BillingConfig()
BERLIN = BillingConfig(timezone="Europe/Berlin")
NEW_YORK = BillingConfig(timezone="America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_a_utc_month() -> None:
    p = parse_period("2026-11", UTC_CFG)
    assert (p.name, p.start, p.end) == ("2026-11", utc(2026, 11, 1), utc(2026, 12, 1))
    assert expected_intervals(p.start, p.end, 900) == 30 * 96


@pytest.mark.parametrize(
    ("config", "period", "start", "end", "hours"),
    [
        # Berlin: CEST (UTC+2) until the last Sunday of October, then CET (UTC+1).
        (BERLIN, "2026-10", utc(2026, 9, 30, 22), utc(2026, 10, 31, 23), 31 * 24 + 1),
        (BERLIN, "2026-03", utc(2026, 2, 28, 23), utc(2026, 3, 31, 22), 31 * 24 - 1),
        (BERLIN, "2026-11", utc(2026, 10, 31, 23), utc(2026, 11, 30, 23), 30 * 24),
        # New York: EDT (UTC-4) ends on the first Sunday of November (1 Nov 2026).
        (NEW_YORK, "2026-11", utc(2026, 11, 1, 4), utc(2026, 12, 1, 5), 30 * 24 + 1),
        (NEW_YORK, "2026-03", utc(2026, 3, 1, 5), utc(2026, 4, 1, 4), 31 * 24 - 1),
    ],
)
def test_local_months_across_dst(
    config: BillingConfig, period: str, start: datetime, end: datetime, hours: int
) -> None:
    p = parse_period(period, config)
    assert (p.start, p.end) == (start, end)
    assert p.end - p.start == timedelta(hours=hours)
    assert expected_intervals(p.start, p.end, 900) == hours * 4
    assert expected_intervals(p.start, p.end, 3600) == hours


def test_cycle_day_and_year_wrap() -> None:
    cfg = BillingConfig(cycle_day=15)
    p = parse_period("2026-12", cfg)
    assert (p.start, p.end) == (utc(2026, 12, 15), utc(2027, 1, 15))
    assert previous_period(parse_period("2027-01", cfg), cfg) == p
    assert period_containing(utc(2027, 1, 14, 23, 59, 59), cfg) == p
    assert period_containing(utc(2027, 1, 15), cfg).name == "2027-01"
    assert period_containing(utc(2026, 12, 14, 23), cfg).name == "2026-11"


def test_period_containing_uses_local_time() -> None:
    # 23:30 UTC on 31 October is already 1 November in Berlin.
    assert period_containing(utc(2026, 10, 31, 23, 30), BERLIN).name == "2026-11"
    assert period_containing(utc(2026, 10, 31, 22, 59), BERLIN).name == "2026-10"
    assert period_containing(utc(2026, 10, 31, 22, 59), UTC_CFG).name == "2026-10"


def test_cutoff_is_local_midnight_days_after_the_end() -> None:
    p = parse_period("2026-10", BERLIN)
    assert cutoff(p, BERLIN) == utc(2026, 11, 3, 23)  # 4 November 00:00 CET
    assert cutoff(p, BillingConfig(timezone="Europe/Berlin", cutoff_days=0)) == p.end
    assert cutoff(parse_period("2026-11", UTC_CFG), UTC_CFG) == utc(2026, 12, 4)


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026/11", "26-11", "2026-1", "november", ""])
def test_bad_period_names_the_option(text: str) -> None:
    with pytest.raises(UsageError, match=r"--period .*expected YYYY-MM"):
        parse_period(text, UTC_CFG)


def test_future_period_is_refused() -> None:
    p = parse_period("2027-01", UTC_CFG)
    with pytest.raises(UsageError, match="in the future"):
        check_reportable(p, utc(2026, 12, 31, 23, 59))
    check_reportable(p, utc(2027, 1, 1))


def test_grid_is_unix_multiples_of_the_interval() -> None:
    # Kathmandu is UTC+05:45: its local midnights are off an hourly grid.
    cfg = BillingConfig(timezone="Asia/Kathmandu")
    p = parse_period("2026-11", cfg)
    assert p.start == utc(2026, 10, 31, 18, 15)
    assert grid_after(p.start, 3600) == utc(2026, 10, 31, 19)
    assert expected_intervals(p.start, p.end, 3600) == 30 * 24
    assert expected_intervals(p.start, p.start + timedelta(minutes=30), 3600) == 0
    assert expected_intervals(p.start, p.start + timedelta(minutes=45), 3600) == 1


def test_interpolation_is_exact_integer_arithmetic() -> None:
    t0, t1 = utc(2026, 11, 1), utc(2026, 11, 1, 0, 30)
    assert interpolate(utc(2026, 11, 1, 0, 15), (t0, 1000), (t1, 1101)) == 1051  # 1050.5 rounds up
    assert interpolate(utc(2026, 11, 1, 0, 10), (t0, 1000), (t1, 1100)) == 1033  # 1033.33
    assert interpolate(utc(2026, 11, 1, 0, 20), (t0, 1000), (t1, 1100)) == 1067  # 1066.67
    # Large registers: no float rounding.
    big = 9_007_199_254_740_993
    assert interpolate(utc(2026, 11, 1, 0, 15), (t0, big), (t1, big + 2)) == big + 1
    # A register that went down (rolled back) interpolates downwards.
    assert interpolate(utc(2026, 11, 1, 0, 15), (t0, 1000), (t1, 899)) == 949


def test_status_precedence() -> None:
    read = Boundary("read", 1, None, ())
    est = Boundary("estimated", 1, None, ())
    missing = Boundary("missing", None, None, ())
    assert status_of(read, read, {}) == "ready"
    assert status_of(read, read, {"clock": {}, "power_loss": {}}) == "ready"
    assert status_of(est, read, {}) == "estimated"
    assert status_of(est, read, {"spike": {}}) == "review"
    assert status_of(read, missing, {"tamper": []}) == "pending"
    for flag in ("rollback", "spike", "tamper", "profile_mismatch"):
        assert status_of(read, read, {flag: {"x": 1}}) == "review"


def test_config_validation_and_environment() -> None:
    cfg = load_config(env={"INGESTD_BILLING_TIMEZONE": "Europe/Berlin", "INGESTD_BILLING_CYCLE_DAY": "5"})
    assert (cfg.billing.timezone, cfg.billing.cycle_day) == ("Europe/Berlin", 5)
    assert period_of(2026, 11, cfg.billing).start == utc(2026, 11, 4, 23)
    with pytest.raises(ConfigError, match=r"billing\.timezone.*Mars/Olympus"):
        load_config(env={"INGESTD_BILLING_TIMEZONE": "Mars/Olympus"})
    with pytest.raises(ConfigError, match=r"billing\.cycle_day"):
        load_config(env={"INGESTD_BILLING_CYCLE_DAY": "29"})
    with pytest.raises(ConfigError, match=r"billing\.cutoff_days"):
        load_config(env={"INGESTD_BILLING_CUTOFF_DAYS": "-1"})
