"""Signature verification in worker processes, beside the event loop.

Why processes and not threads: ``cryptography`` releases the GIL while it verifies, but a
thread must take the GIL back after every verification, and while the event loop has work
it waits up to the interpreter's switch interval (5 ms) for it. Measured here: two verify
threads fell from 27,000 to 520 ES256 verifications/s whenever the event loop was busy, so
verifying and everything else took turns instead of running side by side. Worker processes
have no GIL to share; what crosses to them is small (key, signature, signing input) and
the verdicts come back as one byte each.

The protocol on a worker's stdin and stdout (``python -m ingestd.verifier``): the worker
first writes an empty answer (it is ready); then each request is a 4-byte big-endian
length and a pickle of ``(keys, items)``, ``keys`` a list of (alg, SubjectPublicKeyInfo
DER), ``items`` a list of (key index, signature, signing input); the answer is a 4-byte
length and one byte per item, 1 where the signature verifies. Only the daemon writes to
a worker's stdin, so unpickling there trusts nobody else; the daemon unpickles nothing.

A worker that dies (killed, out of memory, a crash in a library) is replaced and its
request sent again; a request that kills a worker twice is split in halves until the one
message that does it is found, and that message is reported as unverifiable (``None``):
one poisonous message can neither stop ingestion nor be stored. A worker that cannot even
start is an installation fault: ``ServiceUnavailable``, and the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import BinaryIO, Final, Self

import structlog
from cryptography.hazmat.primitives import serialization

from ingestd.envelope import Signed
from ingestd.errors import ServiceUnavailable
from ingestd.signature import Alg, PublicKey, verify

log = structlog.get_logger("ingestd.verifier")

WORKER_COMMAND: Final = (sys.executable, "-m", "ingestd.verifier")
_LENGTH: Final = struct.Struct("!I")
# Loaded keys a worker keeps (about 2 KiB each): a fleet larger than this still works,
# at the cost of loading a key again now and then (7 us against a 60 us verification).
_KEY_CACHE_SIZE: Final = 20_000
_START_TIMEOUT_S: Final = 30.0
_STOP_TIMEOUT_S: Final = 5.0
# A verification takes well under a millisecond (DSA-2048, the slowest, 0.25 ms): a worker
# that has not answered in this time plus 10 ms a message is stuck, and is treated as dead.
ANSWER_TIMEOUT_S: Final = 5.0
_ANSWER_TIMEOUT_PER_ITEM_S: Final = 0.01

# One request: the distinct keys, and (key index, signature, signing input) per message.
Request = tuple[list[tuple[Alg, bytes]], list[tuple[int, bytes, bytes]]]


class _WorkerDiedError(Exception):
    """The worker process ended (or its pipes broke) while it held a request."""


class _Worker:
    """One worker process: one request at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, command: Sequence[str]) -> _Worker:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise ServiceUnavailable(f"cannot start a verification worker: {exc}") from exc
        worker = cls(proc)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await worker._read_answer()
        except asyncio.CancelledError:
            worker.kill()
            raise
        except (_WorkerDiedError, TimeoutError) as exc:
            await worker.stop()
            raise ServiceUnavailable(
                f"verification worker did not start ({' '.join(command)}; exit status {proc.returncode})"
            ) from exc
        if ready:
            await worker.stop()
            raise ServiceUnavailable("verification worker sent an unexpected greeting")
        return worker

    async def call(self, request: bytes) -> bytes:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            stdin.write(request)
            await stdin.drain()
        except (OSError, RuntimeError) as exc:
            # OSError: the pipe broke; RuntimeError: asyncio's "write to closed transport".
            raise _WorkerDiedError from exc
        return await self._read_answer()

    async def _read_answer(self) -> bytes:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            (size,) = _LENGTH.unpack(await stdout.readexactly(_LENGTH.size))
            return await stdout.readexactly(size)
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise _WorkerDiedError from exc

    def kill(self) -> None:
        # Only for a worker that is alive (or may be): killing polls the process first,
        # and a poll that reaps it takes its exit status from asyncio (which reports 255).
        # A worker whose pipes broke is ending: stop() waits for its status instead.
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._close_stdin()

    async def wait(self) -> None:
        await self.proc.wait()
        # asyncio closes a subprocess's transport a loop turn after the exit; a transport
        # still open when the loop closes complains from its finaliser. Close it now.
        self.proc._transport.close()  # type: ignore[attr-defined]  # noqa: SLF001

    async def stop(self) -> None:
        """Close its stdin (the worker exits on end of input, if it has not already ended);
        kill it if it lingers."""
        self._close_stdin()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await self.proc.wait()
        except TimeoutError:
            self.kill()
        await self.wait()

    def _close_stdin(self) -> None:
        # With its last pipe closed and the process reaped, asyncio closes the transport.
        if self.proc.stdin is not None:
            self.proc.stdin.close()


class VerifierPool:
    """Worker processes that verify signatures; an async context manager owning them."""

    def __init__(
        self,
        workers: int,
        *,
        command: Sequence[str] = WORKER_COMMAND,
        on_restart: Callable[[], None] = lambda: None,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self._size = workers
        self._answer_timeout_s = answer_timeout_s
        self._command = tuple(command)
        self._on_restart = on_restart
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        # Killed while cancelled mid-request; reaped on exit.
        self._killed: list[_Worker] = []
        # SubjectPublicKeyInfo DER by kid, with the key object it was made from: the key
        # cache reloads keys now and then, and a new object is encoded again.
        self._der: dict[str, tuple[PublicKey, bytes]] = {}

    async def __aenter__(self) -> Self:
        started = await asyncio.gather(
            *(_Worker.start(self._command) for _ in range(self._size)), return_exceptions=True
        )
        workers = [w for w in started if isinstance(w, _Worker)]
        failed = [e for e in started if not isinstance(e, _Worker)]
        if failed:
            await asyncio.gather(*(w.stop() for w in workers))
            raise failed[0]
        for worker in workers:
            self._add(worker)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        workers, self._all = list(self._all), set()
        killed, self._killed = self._killed, []
        await asyncio.gather(*(w.stop() for w in workers), *(w.wait() for w in killed))

    async def verify(self, signed: Sequence[Signed]) -> list[bool | None]:
        """A verdict per message: True (valid), False (not), None (could not be checked:
        it killed the worker every time it was tried)."""
        if not signed:
            return []
        size = -(-len(signed) // self._size)
        parts = await asyncio.gather(
            *(self._verify_part(signed[i : i + size]) for i in range(0, len(signed), size))
        )
        return [verdict for part in parts for verdict in part]

    async def _verify_part(self, signed: Sequence[Signed], *, retried: bool = False) -> list[bool | None]:
        try:
            answer = await self._call(self._request(signed), len(signed))
        except _WorkerDiedError:
            if not retried:
                # Most likely the worker was killed from outside: once more, whole.
                return await self._verify_part(signed, retried=True)
            if len(signed) == 1:
                # The news is the worker's death (or hang); a traceback of ours adds nothing.
                log.error("verification_crashed", kid=signed[0].header.kid)  # noqa: TRY400
                return [None]
            half = len(signed) // 2
            return [
                *await self._verify_part(signed[:half], retried=True),
                *await self._verify_part(signed[half:], retried=True),
            ]
        if len(answer) != len(signed):
            raise ServiceUnavailable(f"verification worker answered {len(answer)} of {len(signed)}")
        return [byte == 1 for byte in answer]

    async def _call(self, request: bytes, count: int) -> bytes:
        worker = await self._idle.get()
        try:
            async with asyncio.timeout(self._answer_timeout_s + count * _ANSWER_TIMEOUT_PER_ITEM_S):
                answer = await worker.call(request)
        except TimeoutError:
            # Stuck (a hostile input looping in a library, a stopped process): as if dead,
            # so that the halving finds the message that does it.
            log.warning("verification_worker_stuck", pid=worker.proc.pid, messages=count)
            worker.kill()
            await self._replace(worker)
            raise _WorkerDiedError from None
        except _WorkerDiedError:
            await self._replace(worker)
            raise
        except BaseException:
            # Cancelled half-way through a request: its pipes are out of step now.
            self._all.discard(worker)
            worker.kill()
            self._killed.append(worker)
            raise
        self._idle.put_nowait(worker)
        return answer

    async def _replace(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await worker.stop()
        log.warning("verification_worker_died", pid=worker.proc.pid, status=worker.proc.returncode)
        self._on_restart()
        self._add(await _Worker.start(self._command))

    def _add(self, worker: _Worker) -> None:
        self._all.add(worker)
        self._idle.put_nowait(worker)

    def _request(self, signed: Sequence[Signed]) -> bytes:
        keys: list[tuple[Alg, bytes]] = []
        index: dict[str, int] = {}
        items: list[tuple[int, bytes, bytes]] = []
        for s in signed:
            kid = s.key.kid
            i = index.get(kid)
            if i is None:
                i = index[kid] = len(keys)
                keys.append((s.key.alg, self._key_der(kid, s.key.key)))
            items.append((i, s.header.signature, s.header.signing_input))
        body = pickle.dumps((keys, items), protocol=pickle.HIGHEST_PROTOCOL)
        return _LENGTH.pack(len(body)) + body

    def _key_der(self, kid: str, key: PublicKey) -> bytes:
        cached = self._der.get(kid)
        if cached is not None and cached[0] is key:
            return cached[1]
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self._der[kid] = (key, der)
        return der


# -- the worker process ---------------------------------------------------------------


def _load_key(der: bytes) -> PublicKey | None:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        return None
    # X25519 and the like load too, and can verify nothing of ours: verify() refuses them.
    return key if isinstance(key, PublicKey) else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The worker's loop: answer requests until the end of input."""
    load = functools.lru_cache(maxsize=_KEY_CACHE_SIZE)(_load_key)
    stdout.write(_LENGTH.pack(0))
    stdout.flush()
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        (size,) = _LENGTH.unpack(head)
        request: Request = pickle.loads(stdin.read(size))  # noqa: S301 - written by our parent only
        keys, items = request
        loaded = [(alg, load(der)) for alg, der in keys]
        verdicts = bytearray(len(items))
        for n, (i, signature, signing_input) in enumerate(items):
            alg, key = loaded[i]
            verdicts[n] = key is not None and verify(alg, key, signature, signing_input)
        stdout.write(_LENGTH.pack(len(verdicts)) + verdicts)
        stdout.flush()


def main() -> None:
    # Ctrl-C in a terminal and systemd's stop signal reach the whole process group: the
    # daemon is then draining, and still needs its workers. A worker ends with its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        # The daemon is gone (killed while we verified): nothing to answer, nothing to say.
        # Point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
