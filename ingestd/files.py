"""Files the operator names (keys, secrets, the configuration), read with a size cap.

A path can name anything: ``/dev/zero`` or ``/dev/urandom`` never end, a FIFO blocks
until someone writes to it, a mistyped path can be a multi-gigabyte log. Reading such a
thing whole would exhaust memory or hang start-up, so only regular files are read, and
never more than a cap well above what the file can legitimately hold.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from ingestd.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

KIB: Final = 1024
# A PEM key is at most a few KiB (RSA-4096 private: about 3.3 KiB).
KEY_FILE_MAX: Final = 64 * KIB
# A password or token; systemd credentials are small too.
SECRET_FILE_MAX: Final = 4 * KIB
# The example configuration, with every comment, is about 10 KiB.
CONFIG_FILE_MAX: Final = 1024 * KIB
# One line of a meter import file (`ingestd meter import`): one meter with its keys, PEMs
# inline; a meter with a few RSA-4096 keys takes a few KiB. The file itself has no cap: it
# is read line by line, so what it costs is the rows it holds, not its size.
IMPORT_LINE_MAX: Final = 256 * KIB
# A message to check (`ingestd check-message`): well past the envelope's 64 KiB, so that
# an oversized one is judged (too_large) rather than refused as input.
MESSAGE_FILE_MAX: Final = 1024 * KIB

_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def read_bounded(path: str | Path, setting: str, limit: int) -> bytes:
    """The whole of the regular file ``path``, at most ``limit`` bytes.

    Anything else raises ConfigError naming ``setting`` (a setting such as
    ``database.password_file``, or a command-line option such as ``--key``), the path
    and what is wrong with it, in one line.
    """

    def fail(problem: str) -> ConfigError:
        return ConfigError(setting, f"{path}: {problem}")

    try:
        # stat before open: opening a device can have effects of its own, and opening a
        # FIFO blocks until a writer comes.
        st = Path(path).stat()
        _require_regular(st, fail)
        if st.st_size > limit:
            raise fail(f"larger than the {_size(limit)} allowed for it ({st.st_size} bytes)")
        # O_NONBLOCK: should the path have become a FIFO since, open returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail("no such file") from None
    except OSError as exc:
        raise fail(exc.strerror or type(exc).__name__) from None
    with os.fdopen(fd, "rb") as fh:
        try:
            # Checked again on what was opened, in case the path was replaced meanwhile.
            _require_regular(os.fstat(fd), fail)
            # The size from stat is only a hint (the file may grow): the read is capped.
            data = fh.read(limit + 1)
        except OSError as exc:
            raise fail(exc.strerror or type(exc).__name__) from None
    if len(data) > limit:
        raise fail(f"larger than the {_size(limit)} allowed for it")
    return data


def open_regular(path: str | Path, setting: str) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (see ``read_bounded``); for
    files read piece by piece, with a cap on each piece (``bounded_lines``)."""

    def fail(problem: str) -> ConfigError:
        return ConfigError(setting, f"{path}: {problem}")

    try:
        _require_regular(Path(path).stat(), fail)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail("no such file") from None
    except OSError as exc:
        raise fail(exc.strerror or type(exc).__name__) from None
    fh = os.fdopen(fd, "rb")
    try:
        _require_regular(os.fstat(fd), fail)
    except BaseException:
        fh.close()
        raise
    return fh


def bounded_lines(fh: BinaryIO, path: str | Path, setting: str, limit: int) -> Iterator[tuple[int, str]]:
    """The lines of ``fh`` (numbered from 1, line ends kept) as UTF-8 text; a line longer
    than ``limit`` bytes, or not UTF-8, raises ConfigError naming its number."""
    number = 0
    while True:
        try:
            line = fh.readline(limit + 1)
        except OSError as exc:
            raise ConfigError(setting, f"{path}: {exc.strerror or type(exc).__name__}") from None
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise ConfigError(setting, f"{path} line {number}: longer than the {_size(limit)} allowed")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(setting, f"{path} line {number}: not UTF-8 text") from None
        # A byte order mark, as spreadsheet programs write one, is not part of the header.
        yield number, text.removeprefix("\ufeff") if number == 1 else text


def _require_regular(st: os.stat_result, fail: Callable[[str], ConfigError]) -> None:
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise fail(f"not a regular file ({kind})")
    if not stat.S_ISREG(st.st_mode):
        raise fail("not a regular file")


def _size(n: int) -> str:
    if n % (1024 * KIB) == 0:
        return f"{n // (1024 * KIB)} MiB"
    return f"{n // KIB} KiB" if n % KIB == 0 else f"{n} bytes"
