"""The verification worker processes: verdicts, dead workers, poisonous messages, shutdown."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
import structlog
import structlog.testing

from conftest import running_daemon
from helpers import metric, publish, wait_settled
from ingestd.config import Config
from ingestd.envelope import MeterKey, Signed, prepare
from ingestd.errors import ServiceUnavailable
from ingestd.signature import ALGS, Alg, Signer, public_key_pem
from ingestd.simulator import KeyFactory, build_fleet, register_fleet
from ingestd.store import Store
from ingestd.verifier import WORKER_COMMAND, VerifierPool, serve

NOW = datetime(2026, 11, 30, tzinfo=UTC)
POISON = b"poison"


def misbehaving_worker(marked: str, then: str) -> str:
    """A worker program that is the real one but for messages where ``marked`` (an
    expression of ``signing_input`` and ``body``, the signed body) holds: there it runs
    ``then``, as a library crashing or looping on a hostile input would."""
    return f"""
import base64, os, time
from ingestd import verifier
real = verifier.verify
def verify(alg, key, signature, signing_input):
    payload = signing_input.split(b".")[-1]
    body = base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
    if {marked}:
        {then}
    return real(alg, key, signature, signing_input)
verifier.verify = verify
verifier.main()
"""


POISONED_WORKER = misbehaving_worker(f"{POISON!r} in signing_input", "os._exit(70)")
STUCK_WORKER = misbehaving_worker(f"{POISON!r} in signing_input", "time.sleep(3600)")
POISONED_BODY_WORKER = misbehaving_worker(f"{POISON!r} in body", "os._exit(70)")

# A worker that dies on its first request when the marker file is missing: a worker killed
# from outside, once.
FLAKY_WORKER = """
import os, sys
from pathlib import Path
from ingestd import verifier
marker = Path(sys.argv[1])
real_serve = verifier.serve
def serve(stdin, stdout):
    if not marker.exists():
        stdout.write(verifier._LENGTH.pack(0))
        stdout.flush()
        stdin.read(4)
        marker.touch()
        os._exit(9)
    real_serve(stdin, stdout)
verifier.serve = serve
verifier.main()
"""


class Fleet:
    def __init__(self, factory: KeyFactory) -> None:
        self.signers = {alg: Signer(alg, f"K-{alg}", factory.new(alg)) for alg in ALGS}
        self.keys = {
            s.kid: MeterKey(s.kid, f"M-{alg}", alg, s.key.public_key()) for alg, s in self.signers.items()
        }

    def signed(self, alg: Alg, seq: int) -> Signed:
        body = orjson.dumps({"v": 1, "meter": f"M-{alg}", "seq": seq})
        return prepare(self.signers[alg].sign_body(body), NOW, self.keys)

    def forged(self, alg: Alg, seq: int) -> Signed:
        good = self.signed(alg, seq)
        sig = bytearray(good.header.signature)
        sig[len(sig) // 2] ^= 0x01
        return Signed(dataclasses.replace(good.header, signature=bytes(sig)), good.key)

    def poisonous(self, alg: Alg, seq: int) -> Signed:
        good = self.signed(alg, seq)
        return Signed(
            dataclasses.replace(good.header, signing_input=POISON + good.header.signing_input), good.key
        )


@pytest.fixture(scope="module")
def fleet(key_factory: KeyFactory) -> Fleet:
    return Fleet(key_factory)


def mixed(fleet: Fleet, count: int) -> tuple[list[Signed], list[bool]]:
    """``count`` messages over every algorithm, every third one forged."""
    messages, expected = [], []
    for i in range(count):
        alg = ALGS[i % len(ALGS)]
        forged = i % 3 == 0
        messages.append(fleet.forged(alg, i) if forged else fleet.signed(alg, i))
        expected.append(not forged)
    return messages, expected


def worker_pids(pool: VerifierPool) -> set[int]:
    return {w.proc.pid for w in pool._all}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: the pool reaps its workers on exit.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def test_verdicts_for_every_algorithm(fleet: Fleet) -> None:
    messages, expected = mixed(fleet, 60)
    async with VerifierPool(2) as pool:
        assert await pool.verify(messages) == expected
        assert await pool.verify([]) == []
        # Fewer messages than workers, and one alone.
        assert await pool.verify(messages[:1]) == expected[:1]


async def test_rotated_key_under_the_same_kid(fleet: Fleet, key_factory: KeyFactory) -> None:
    """The pool encodes a kid's key once; a new key object under that kid is encoded anew."""
    old = fleet.signed("ES256", 1)
    new_signer = Signer("ES256", "K-ES256", key_factory.new("ES256"))
    rotated = MeterKey("K-ES256", "M-ES256", "ES256", new_signer.key.public_key())
    body = orjson.dumps({"v": 1, "meter": "M-ES256", "seq": 2})
    new = prepare(new_signer.sign_body(body), NOW, {"K-ES256": rotated})
    async with VerifierPool(1) as pool:
        assert await pool.verify([old]) == [True]
        assert await pool.verify([new]) == [True]
        # The old message checked against the new key: not valid.
        assert await pool.verify([Signed(old.header, rotated)]) == [False]


async def test_a_killed_worker_is_replaced(fleet: Fleet) -> None:
    messages, expected = mixed(fleet, 20)
    restarts = []
    async with VerifierPool(2, on_restart=lambda: restarts.append(1)) as pool:
        victim = next(iter(worker_pids(pool)))
        os.kill(victim, signal.SIGKILL)
        with structlog.testing.capture_logs() as logs:
            assert await pool.verify(messages) == expected
        # The log says how it died: its real exit status, not one made up for a lost child.
        died = [e for e in logs if e["event"] == "verification_worker_died"]
        assert [(e["pid"], e["status"]) for e in died] == [(victim, -signal.SIGKILL)]
        assert len(restarts) == 1
        assert victim not in worker_pids(pool)
        assert len(worker_pids(pool)) == 2


async def test_a_worker_dying_once_mid_request_costs_nothing(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "died-once"
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_WORKER)
    messages, expected = mixed(fleet, 10)
    restarts = []
    async with VerifierPool(
        1, command=[sys.executable, str(script), str(marker)], on_restart=lambda: restarts.append(1)
    ) as pool:
        assert await pool.verify(messages) == expected
    assert marker.exists()
    assert len(restarts) == 1


@pytest.mark.parametrize(
    ("program", "event"),
    [(POISONED_WORKER, "verification_worker_died"), (STUCK_WORKER, "verification_worker_stuck")],
    ids=["crashes", "hangs"],
)
async def test_a_message_that_breaks_the_worker_is_isolated(
    program: str, event: str, fleet: Fleet, tmp_path: Path
) -> None:
    """A message that kills or hangs the worker every time is found by halving, and
    reported as unverifiable (None); every other message gets its true verdict."""
    script = tmp_path / "worker.py"
    script.write_text(program)
    messages, expected = mixed(fleet, 40)
    messages[17] = fleet.poisonous("EdDSA", 17)
    expected[17] = None  # type: ignore[call-overload]
    restarts = []
    async with VerifierPool(
        2, command=[sys.executable, str(script)], on_restart=lambda: restarts.append(1), answer_timeout_s=0.3
    ) as pool:
        with structlog.testing.capture_logs() as logs:
            assert await pool.verify(messages) == expected
        # Bounded: a retry, then one per halving of a 20-message part.
        assert 2 <= len(restarts) <= 2 + 5
        assert sum(e["event"] == event for e in logs) == len(restarts)
        # And the pool is whole afterwards.
        assert len(worker_pids(pool)) == 2
        assert await pool.verify(messages[:5]) == expected[:5]


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ([sys.executable, "-c", "import sys; sys.exit(3)"], "did not start .*exit status 3"),
        (["/nonexistent/python"], "cannot start a verification worker"),
    ],
)
async def test_a_worker_that_cannot_start_stops_the_pool(command: Sequence[str], words: str) -> None:
    with pytest.raises(ServiceUnavailable, match=words):
        async with VerifierPool(2, command=command):
            pytest.fail("started")


async def test_workers_end_with_the_pool(fleet: Fleet) -> None:
    async with VerifierPool(3) as pool:
        pids = worker_pids(pool)
        assert len(pids) == 3
        assert all(alive(p) for p in pids)
        await pool.verify(mixed(fleet, 5)[0])
    assert not any(alive(p) for p in pids)


async def test_workers_ignore_the_stop_signal(fleet: Fleet) -> None:
    """systemd's SIGTERM reaches every process of the service: the daemon is draining
    then, and its workers must see it through."""
    messages, expected = mixed(fleet, 10)
    async with VerifierPool(1) as pool:
        (pid,) = worker_pids(pool)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        assert await pool.verify(messages) == expected
        assert worker_pids(pool) == {pid}


def test_serve_speaks_the_documented_protocol(fleet: Fleet) -> None:
    """The worker's side alone: a ready answer, then a byte per item."""
    good, bad = fleet.signed("ES256", 1), fleet.forged("ES256", 2)
    der = public_key_pem(good.key.key)  # PEM is not DER: that key fails to load
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - this test only

    spki = good.key.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = [("ES256", spki), ("ES256", der)]
    items = [
        (0, good.header.signature, good.header.signing_input),
        (0, bad.header.signature, bad.header.signing_input),
        (1, good.header.signature, good.header.signing_input),
    ]
    body = pickle.dumps((keys, items))
    stdin = io.BytesIO(struct.pack("!I", len(body)) + body)
    stdout = io.BytesIO()
    serve(stdin, stdout)
    assert stdout.getvalue() == struct.pack("!I", 0) + struct.pack("!I", 3) + bytes([1, 0, 0])


def test_the_worker_program_is_quiet_and_light() -> None:
    """Started as the daemon starts it: ready at once, silent on stderr (a warning there
    would reach the journal at every start), done at the end of its input, and without
    the daemon's own dependencies loaded."""
    probe = (
        "import sys, runpy; runpy.run_module('ingestd.verifier', run_name='__main__'); "
        "loaded = [m for m in ('asyncpg', 'aiomqtt', 'prometheus_client') if m in sys.modules]; "
        "sys.stderr.write(' '.join(loaded))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", probe], input=b"", capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert done.stdout == struct.pack("!I", 0)
    assert done.stderr == b""


def test_a_worker_whose_daemon_is_gone_exits_quietly() -> None:
    """Killed daemon, unread answer: the worker ends with status 0 and no traceback."""
    proc = subprocess.Popen(
        [*WORKER_COMMAND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.read(4) == struct.pack("!I", 0)
    proc.stdout.close()  # the daemon is gone: nobody reads the answer
    empty = pickle.dumps(([], []))
    _, stderr = proc.communicate(input=struct.pack("!I", len(empty)) + empty, timeout=60)
    assert proc.returncode == 0
    assert stderr == b""


def test_the_default_command_runs_this_interpreter() -> None:
    assert WORKER_COMMAND[0] == sys.executable
    assert WORKER_COMMAND[1:] == ("-m", "ingestd.verifier")


async def test_a_poisonous_message_through_the_daemon(
    config: Config,
    store: Store,
    db: asyncpg.Connection[asyncpg.Record],
    key_factory: KeyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the real broker and database: the message that kills the verifier is
    quarantined as bad_signature, saying so; every other message is stored."""
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_BODY_WORKER)
    monkeypatch.setattr(
        "ingestd.pipeline.VerifierPool",
        functools.partial(VerifierPool, command=[sys.executable, str(script)]),
    )
    fleet = build_fleet(len(ALGS), prefix="P-", keys=key_factory)
    await register_fleet(store, fleet)
    rng = random.Random(3)
    messages = [
        (f"meters/{meter.meter_id}/up", meter.sign(meter.next_body(datetime.now(UTC), rng)))
        for meter in fleet
        for _ in range(4)
    ]
    victim = fleet[2]
    poisoned = victim.next_body(datetime.now(UTC), rng)
    poisoned["note"] = POISON.decode()
    messages.insert(7, (f"meters/{victim.meter_id}/up", victim.sign(poisoned)))
    async with running_daemon(config) as daemon:
        registry = daemon.metrics.registry
        await publish(config.mqtt.host, config.mqtt.port, messages)
        await wait_settled(registry, len(messages))
        assert metric(registry, "ingestd_messages_accepted_total") == len(messages) - 1
        assert metric(registry, "ingestd_messages_rejected_total", reason="bad_signature") == 1
        assert metric(registry, "ingestd_verify_worker_restarts_total") >= 2
    rows = await db.fetch("SELECT reason, detail, meter_id, payload FROM quarantine")
    assert [(r["reason"], r["meter_id"], bytes(r["payload"])) for r in rows] == [
        ("bad_signature", victim.meter_id, messages[7][1])
    ]
    assert "it crashed the verifier" in rows[0]["detail"]
    assert await db.fetchval("SELECT count(*) FROM raw_messages") == len(messages) - 1
