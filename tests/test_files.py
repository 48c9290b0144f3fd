"""ingestd.files.read_bounded: only regular files, never more than the cap, one-line errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.files import KEY_FILE_MAX, read_bounded


def read_error(path: str | Path, limit: int = KEY_FILE_MAX, setting: str = "--key") -> str:
    with pytest.raises(ConfigError) as info:
        read_bounded(path, setting, limit)
    assert info.value.key == setting
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{setting}: {path}: ")
    return text


def test_reads_a_regular_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"x" * KEY_FILE_MAX)
    assert read_bounded(path, "--key", KEY_FILE_MAX) == b"x" * KEY_FILE_MAX


def test_a_file_one_byte_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"x" * (KEY_FILE_MAX + 1))
    assert "larger than the 64 KiB allowed" in read_error(path)


def test_a_huge_sparse_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    with path.open("wb") as fh:
        fh.truncate(64 * 1024**3)  # 64 GiB of nothing: reading it would take minutes
    started = time.monotonic()
    assert "larger than the 1 MiB allowed" in read_error(path, 1024 * 1024, "config")
    assert time.monotonic() - started < 1


def test_dev_zero_is_refused_without_being_read() -> None:
    started = time.monotonic()
    assert "not a regular file (a character device)" in read_error("/dev/zero")
    assert time.monotonic() - started < 1


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    assert "not a regular file (a FIFO)" in read_error(fifo, 4096, "database.password_file")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "not a regular file (a directory)" in read_error(tmp_path)


def test_a_missing_file(tmp_path: Path) -> None:
    assert read_error(tmp_path / "nope.pem").endswith(": no such file")


def test_a_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    # systemd credentials and Kubernetes secrets are often symlinks.
    target = tmp_path / "real"
    target.write_bytes(b"s3cret")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_bounded(link, "mqtt.password_file", 4096) == b"s3cret"


def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/dev/zero")
    assert "character device" in read_error(link)
