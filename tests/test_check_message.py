"""``ingestd check-message`` as a firmware engineer runs it: a real subprocess, no database,
no broker. Every conformance vector goes through it in test_vectors.py; here the command
line itself: exit statuses, the lines it prints, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import EXIT_FAILURE, EXIT_USAGE, assert_one_line_error, cli_env, ingestd

# The complete example of docs/protocol.md section 4, and its key.
EXAMPLE_KEY = b"""-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAQP/YPcSVkPpjPhoq3WQj/S5aDTEUtaD5Oz5W6Xxni5E=
-----END PUBLIC KEY-----
"""
EXAMPLE = (
    b'{"protected":"eyJhbGciOiJFZERTQSIsImtpZCI6Ik0tMDAwMTIzLWsxIn0","payload":"eyJ2IjoxLCJtZXRl'
    b"ciI6Ik0tMDAwMTIzIiwiZXBvY2giOjAsInNlcSI6MTA0Miwic2VudCI6IjIwMjYtMTEtMjRUMDA6MTU6MDNaIiwicmVw"
    b"bGF5IjpmYWxzZSwicmVhZGluZ3MiOlt7InQiOiIyMDI2LTExLTI0VDAwOjE1OjAwWiIsImltcG9ydF93aCI6MTIzNDU2"
    b"NywiZXhwb3J0X3doIjowfV0sImV2ZW50cyI6W3sidCI6IjIwMjYtMTEtMjRUMDA6MTQ6MTBaIiwiY29kZSI6IjAwMSIs"
    b'ImRldGFpbCI6e319XX0","signature":"r4A3EbTvZf2VYr4jimKWphZE7ZlYMYALqyGU_cBKyLBShwAcOtYXjGy8kgqy'
    b'JPxj-tj1dcD0g4NQvuxSr5JtAg"}'
)


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    message, key = tmp_path / "message.json", tmp_path / "meter.pub.pem"
    message.write_bytes(EXAMPLE)
    key.write_bytes(EXAMPLE_KEY)
    return str(message), str(key)


def check(*args: str) -> tuple[int, list[str]]:
    proc = ingestd("check-message", *args, env=cli_env(None))
    assert proc.stderr == ""
    return proc.returncode, proc.stdout.splitlines()


def test_the_documented_example_is_accepted(files: tuple[str, str]) -> None:
    message, key = files
    status, lines = check(message, "--key", key, "--received-at", "2026-11-24T00:10:03Z")
    assert status == 0
    assert lines == ["accepted: meter M-000123, epoch 0, seq 1042: 1 reading(s), 1 event(s), key M-000123-k1"]


def test_a_second_too_early_is_clock_skew(files: tuple[str, str]) -> None:
    message, key = files
    status, lines = check(message, "--key", key, "--received-at", "2026-11-24T00:10:02Z")
    assert status == EXIT_FAILURE
    assert lines == [
        "rejected: clock_skew: sent 2026-11-24T00:15:03+00:00 is in the future",
        "rule: docs/protocol.md section 6 (Clock skew)",
    ]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--topic", "meters/M-000124/up"], "topic_mismatch"),
        (["--kid", "M-000123-k2"], "unknown_key"),
        (["--alg", "Ed25519"], "alg_mismatch"),
        (["--valid-until", "2026-11-24T00:20:00Z"], "revoked_key"),
        (["--valid-from", "2026-11-24T00:21:00Z"], "revoked_key"),
    ],
)
def test_the_registration_given_on_the_command_line_counts(
    files: tuple[str, str], options: list[str], reason: str
) -> None:
    message, key = files
    status, lines = check(message, "--key", key, "--received-at", "2026-11-24T00:20:00Z", *options)
    assert status == EXIT_FAILURE
    assert lines[0].startswith(f"rejected: {reason}: ")


def test_the_rule_broken_is_named(tmp_path: Path, files: tuple[str, str]) -> None:
    _, key = files
    stray = tmp_path / "stray.json"
    stray.write_bytes(EXAMPLE.replace(b'5JtAg"}', b'5JtAh"}'))
    status, lines = check(str(stray), "--key", key)
    assert status == EXIT_FAILURE
    assert lines[0] == (
        "rejected: bad_envelope: signature is not strict base64url: "
        "its last character has non-zero unused bits (not canonical)"
    )


def test_standard_input(files: tuple[str, str]) -> None:
    _, key = files
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd.cli", "check-message", "-", "--key", key],
        input=EXAMPLE,
        capture_output=True,
        timeout=60,
        env=cli_env(None),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.json", "--key", "{key}"], "FILE: missing.json: no such file"),
        (["{message}", "--key", "{message}"], "not a PEM-encoded public key"),
        (["{message}", "--key", "{key}", "--alg", "ES256"], "ES256 needs an EC P-256 key, got Ed25519"),
        (["{message}", "--key", "{key}", "--received-at", "yesterday"], "--received-at"),
        (["{message}", "--key", "{key}", "--kid", "has space"], "--kid"),
        (["{message}"], "--key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files: tuple[str, str], args: list[str], needle: str) -> None:
    message, key = files
    proc = ingestd("check-message", *(a.format(message=message, key=key) for a in args), env=cli_env(None))
    assert_one_line_error(proc, EXIT_USAGE, needle)
