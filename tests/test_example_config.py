"""The example configuration is the reference operators copy: it must load, name every
setting with its default value, and comment every key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from ingestd.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "ingestd.example.toml"


def test_example_loads_and_equals_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()


def test_example_names_every_setting() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Config):
        expected = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(raw[section.name]) == expected, section.name


def test_every_key_is_commented() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip()
            # A key shares the comment block above it with the keys right after that block.
            j = i - 1
            while j >= 0 and lines[j] and not lines[j].startswith("#") and "=" in lines[j]:
                j -= 1
            assert j >= 0, key
            assert lines[j].startswith("#"), f"{key} has no comment"
