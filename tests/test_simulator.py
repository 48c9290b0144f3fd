"""The simulator behaves as meters do: sequence state survives a clean restart, and an
unclean one starts a new epoch rather than reusing seqs."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

from ingestd.simulator import KeyFactory, build_fleet, save_state


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
