"""The simulator behaves as meters do: sequence state survives a clean restart, and an
unclean one starts a new epoch rather than reusing seqs."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

from ingestd.simulator import Faults, Fleet, KeyFactory, build_fleet, save_state
from services import MosquittoServer


def test_clean_restart_continues_the_sequence(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq, fleet[1].seq = 7, 9
    save_state(fleet, tmp_path, clean=True)
    again = build_fleet(2, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert [(m.epoch, m.seq) for m in again] == [(0, 7), (0, 9)]
    assert again[0].signer.key.public_key() == fleet[0].signer.key.public_key()  # same key from disk


def test_unclean_stop_starts_a_new_epoch(tmp_path: Path, key_factory: KeyFactory) -> None:
    fleet = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    fleet[0].seq = 7
    save_state(fleet, tmp_path)  # as at start-up; the run then died
    again = build_fleet(1, algs=("EdDSA",), state_dir=tmp_path, keys=key_factory)
    assert (again[0].epoch, again[0].seq) == (1, 0)
    assert again[0].next_body(datetime.now(UTC), random.Random(1))["seq"] == 1


async def test_tamper_opens_then_closes_the_cover(broker: MosquittoServer, key_factory: KeyFactory) -> None:
    meters = build_fleet(1, algs=("EdDSA",), keys=key_factory)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        fleet = Fleet(client, meters, topic_prefix="meters", headend=None, faults=Faults(tamper=1.0))
        for _ in range(3):
            await fleet.tick(meters[0])
    codes = [[e["code"] for e in body.get("events", [])] for _, body in meters[0].flash.values()]
    assert codes == [["003"], ["004"], ["003"]]
    assert fleet.stats.published == 3
