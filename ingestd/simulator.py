"""A fleet of virtual meters: the demo, the test driver and the benchmark driver.

Each meter behaves as the firmware does: its own key (the fleet mixes every
algorithm), a sequence number per epoch kept across restarts, cumulative registers
that only grow, one reading per metering interval, occasional power events, and a
flash store of what it sent (about 90 days on a real meter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric import dsa

from ingestd.config import MAX_REPLAY_RANGE, Config
from ingestd.envelope import format_time, parse_envelope, parse_time
from ingestd.errors import Rejected, UsageError
from ingestd.gaps import headend_signer
from ingestd.signature import (
    ALGS,
    Alg,
    PrivateKey,
    PublicKey,
    Signer,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_pem,
    verify,
)
from ingestd.store import Store

log = structlog.get_logger("ingestd.simulator")

POWER_LOSS = "001"
POWER_RESTORED = "002"
REPLAY_UNAVAILABLE = "010"
COVER_OPENED = "003"
COVER_CLOSED = "004"
# docs/protocol.md section 9: a meter answers a replay request only while its `sent` is
# this fresh by the meter's clock (a captured request re-published later would drain its
# battery and airtime), and at most once per `req`; the head-end signs every request,
# retries included, anew with a new `req` and the time of sending.
REQUEST_MAX_AGE = timedelta(minutes=15)
REQUEST_MAX_AHEAD = timedelta(minutes=5)
MAX_INT64 = 2**63 - 1


@dataclass(slots=True)
class VirtualMeter:
    meter_id: str
    signer: Signer
    site: str
    interval_s: int
    epoch: int = 0
    seq: int = 0
    import_wh: int = 0
    export_wh: int = 0
    # Mean load in W; a few meters have solar and export in daylight.
    load_w: float = 500.0
    solar: bool = False
    power_lost: bool = False
    cover_open: bool = False
    last_interval: datetime | None = None
    # Until then the meter has no connectivity: it meters into flash and publishes nothing.
    offline_until: datetime | None = None
    # What the meter created, by (epoch, seq): when, and the body (signed anew when sent).
    flash: dict[tuple[int, int], tuple[datetime, dict[str, Any]]] = field(default_factory=dict)
    # The last seq of each earlier epoch this meter remembers: it answers 010 only for
    # seqs it knows it created.
    last_seqs: dict[int, int] = field(default_factory=dict)
    # Replay requests answered, by req, with their `sent`: each is answered once. Older
    # than REQUEST_MAX_AGE they would be refused anyway, so they are forgotten then.
    answered: dict[str, datetime] = field(default_factory=dict)

    def next_body(self, now: datetime, rng: random.Random, *, event_rate: float = 0.0) -> dict[str, Any]:
        """The next uplink body, kept in flash: one reading for the interval that just ended."""
        self.seq += 1
        # One reading per interval, never two for the same one, even when the simulation
        # runs faster than the metering interval (tests, sub-second demos). Then no interval
        # has ended since the last reading: the next is stamped a millisecond after it, not
        # an interval ahead, since no meter reads an interval that has not ended, and the
        # head-end refuses readings later than `sent` (docs/protocol.md section 4).
        end = _interval_end(now, self.interval_s)
        if self.last_interval is not None and end <= self.last_interval:
            end = self.last_interval + timedelta(milliseconds=1)
        self.last_interval = end
        used = max(0.0, rng.gauss(self.load_w, self.load_w / 4)) * self.interval_s / 3600
        self.import_wh += round(used)
        if self.solar and 7 <= end.hour < 18:
            self.export_wh += round(rng.uniform(0, 3000) * self.interval_s / 3600)
        reading: dict[str, Any] = {"t": format_time(end), "import_wh": self.import_wh}
        if self.solar:
            reading["export_wh"] = self.export_wh
        return self._body(now, readings=[reading], events=self._events(now, rng, event_rate))

    def _body(
        self, now: datetime, *, readings: list[dict[str, Any]], events: list[dict[str, Any]]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": 1,
            "meter": self.meter_id,
            "epoch": self.epoch,
            "seq": self.seq,
            "sent": format_time(now),
            "replay": False,
            "readings": readings,
        }
        if events:
            body["events"] = events
        self.flash[(self.epoch, self.seq)] = (now, body)
        return body

    def sign(self, body: dict[str, Any]) -> bytes:
        return self.signer.sign_body(orjson.dumps(body))

    def reset_epoch(self) -> None:
        """A firmware reset: the sequence state is gone; a new epoch starts at seq 1."""
        self.last_seqs[self.epoch] = self.seq
        self.epoch += 1
        self.seq = 0

    def prune(self, now: datetime, retention: timedelta) -> None:
        for key in [k for k, (created, _) in self.flash.items() if created < now - retention]:
            del self.flash[key]

    def answer_replay(
        self, request: dict[str, Any], now: datetime, *, forget: float = 0.0, rng: random.Random | None = None
    ) -> list[dict[str, Any]]:
        """The bodies that answer a replay request: each stored message of the range again
        (``replay`` true, ``sent`` now), and for what is not in flash one new message with
        event 010 per missing range. Seqs it never created (beyond the last of their epoch,
        or of an epoch it has no record of) get no answer at all. ``forget`` drops that
        share of the range from flash first (fault injection: answered with 010)."""
        epoch, low, high = request["epoch"], request["from_seq"], request["to_seq"]
        last = self.seq if epoch == self.epoch else self.last_seqs.get(epoch)
        if last is None:
            return []
        high = min(high, last)
        if forget and rng is not None and rng.random() < forget:
            for seq in range(low, high + 1):
                self.flash.pop((epoch, seq), None)
        answers: list[dict[str, Any]] = []
        missing: list[tuple[int, int]] = []
        for seq in range(low, high + 1):
            stored = self.flash.get((epoch, seq))
            if stored is None:
                if missing and missing[-1][1] == seq - 1:
                    missing[-1] = (missing[-1][0], seq)
                else:
                    missing.append((seq, seq))
                continue
            answers.append(dict(stored[1], replay=True, sent=format_time(now)))
        if missing:
            self.seq += 1
            events = [
                {
                    "t": format_time(now),
                    "code": REPLAY_UNAVAILABLE,
                    "detail": {"req": request["req"], "epoch": epoch, "from_seq": a, "to_seq": b},
                }
                for a, b in missing[:100]
            ]
            answers.append(self._body(now, readings=[], events=events))
        return answers

    def _events(self, now: datetime, rng: random.Random, rate: float) -> list[dict[str, Any]]:
        if self.power_lost:
            self.power_lost = False
            return [{"t": format_time(now - timedelta(seconds=1)), "code": POWER_RESTORED, "detail": {}}]
        if rate > 0 and rng.random() < rate:
            self.power_lost = True
            return [{"t": format_time(now - timedelta(seconds=2)), "code": POWER_LOSS, "detail": {}}]
        return []


def _interval_end(now: datetime, interval_s: int) -> datetime:
    stamp = int(now.timestamp()) // interval_s * interval_s
    return datetime.fromtimestamp(stamp, UTC)


class KeyFactory:
    """Keys for virtual meters. DSA domain parameters are made once and shared, as a
    manufacturer's meters share them (making 2048-bit parameters takes seconds)."""

    def __init__(self) -> None:
        self._dsa: dsa.DSAParameters | None = None

    def new(self, alg: Alg) -> PrivateKey:
        if alg == "DS256":
            if self._dsa is None:
                self._dsa = dsa.generate_parameters(key_size=2048)
            return self._dsa.generate_private_key()
        return generate_private_key(alg)


def build_fleet(
    count: int,
    *,
    prefix: str = "SIM-",
    interval_s: int = 900,
    per_site: int = 10,
    algs: Sequence[Alg] = ALGS,
    state_dir: Path | None = None,
    seed: int = 1,
    keys: KeyFactory | None = None,
) -> list[VirtualMeter]:
    """``count`` meters, keys taken from ``state_dir`` when there, else made (and saved)."""
    rng = random.Random(seed)  # noqa: S311 - simulation, not security
    keys = keys or KeyFactory()
    fleet = []
    for i in range(count):
        meter_id = f"{prefix}{i + 1:06d}"
        alg = algs[i % len(algs)]
        key = _meter_key(meter_id, alg, state_dir, keys)
        meter = VirtualMeter(
            meter_id=meter_id,
            signer=Signer(alg, f"{meter_id}-{alg}", key),
            site=f"{prefix}SITE-{i // per_site + 1:04d}",
            interval_s=interval_s,
            load_w=rng.uniform(150, 2500),
            solar=rng.random() < 0.15,
            import_wh=rng.randrange(100_000, 50_000_000),
        )
        fleet.append(meter)
    if state_dir is not None:
        _load_state(fleet, state_dir)
    return fleet


async def register_fleet(store: Store, fleet: Sequence[VirtualMeter]) -> int:
    """Register meters whose key is not yet in the database; returns how many were added."""
    known = {k.kid for k in await store.load_keys([m.signer.kid for m in fleet])}
    added = 0
    for meter in fleet:
        if meter.signer.kid in known:
            continue
        await store.add_meter(
            meter.meter_id,
            alg=meter.signer.alg,
            kid=meter.signer.kid,
            public_key_pem=public_key_pem(meter.signer.key.public_key()).decode("ascii"),
            site=meter.site,
            interval_s=meter.interval_s,
        )
        added += 1
    return added


def _meter_key(meter_id: str, alg: Alg, state_dir: Path | None, keys: KeyFactory) -> PrivateKey:
    path = state_dir / "keys" / f"{meter_id}-{alg}.pem" if state_dir is not None else None
    if path is not None and path.exists():
        return load_private_key(path.read_bytes())
    key = keys.new(alg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(private_key_pem(key))
        path.chmod(0o600)
    return key


def _load_state(fleet: Sequence[VirtualMeter], state_dir: Path) -> None:
    path = state_dir / "state.json"
    if not path.exists():
        return
    state = orjson.loads(path.read_bytes())
    clean = state.pop("_clean", False)
    for meter in fleet:
        saved = state.get(meter.meter_id)
        if saved:
            meter.epoch, meter.seq = saved["epoch"], saved["seq"]
            meter.import_wh, meter.export_wh = saved["import_wh"], saved["export_wh"]
            if not clean:
                # The last run did not stop cleanly: its seqs after the last save are
                # unknown, and reusing one for other content is a seq_conflict. A real
                # meter in that state starts a new epoch, and so does this one.
                meter.reset_epoch()


def save_state(fleet: Sequence[VirtualMeter], state_dir: Path, *, clean: bool = False) -> None:
    """Sequence numbers and registers survive a restart, as in a meter's flash."""
    state: dict[str, Any] = {
        m.meter_id: {"epoch": m.epoch, "seq": m.seq, "import_wh": m.import_wh, "export_wh": m.export_wh}
        for m in fleet
    }
    state["_clean"] = clean
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "state.json.tmp"
    tmp.write_bytes(orjson.dumps(state))
    tmp.replace(state_dir / "state.json")


@dataclass(slots=True)
class FleetStats:
    published: int = 0
    readings: int = 0
    events: int = 0
    dropped: int = 0
    replayed: int = 0
    requests: int = 0
    forged_requests: int = 0
    # Genuine requests refused: too old or from the future by the meter's clock, or
    # answered already (the same req again).
    stale_requests: int = 0
    # Requests that reached a meter while it was offline (it never saw them).
    unreachable_requests: int = 0
    resets: int = 0
    # Every replay request accepted: (meter, epoch, from_seq, to_seq, req).
    request_log: list[tuple[str, int, int, int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault injection, each a probability per message a meter creates (or per request)."""

    drop: float = 0.0  # the uplink is lost on the way (the meter keeps it in flash)
    offline: float = 0.0  # the meter loses connectivity for offline_s seconds
    offline_s: float = 30.0
    reset: float = 0.0  # firmware reset: a new epoch starting at seq 1
    forget: float = 0.0  # a replay request is answered with 010 (the data is gone)
    tamper: float = 0.0  # the meter cover is opened (003), and closed (004) by the next message


@dataclass(frozen=True, slots=True)
class HeadendKey:
    """The head-end's public key, as meters are provisioned with it."""

    kid: str
    alg: Alg
    key: PublicKey


class Fleet:
    """Virtual meters on one MQTT connection: they publish, lose things as told, and
    answer the head-end's replay requests from their flash."""

    def __init__(
        self,
        client: aiomqtt.Client,
        meters: Sequence[VirtualMeter],
        *,
        topic_prefix: str,
        headend: HeadendKey | Sequence[HeadendKey] | None,
        faults: Faults = Faults(),
        seed: int = 1,
        retention: timedelta = timedelta(days=90),
        stats: FleetStats | None = None,
    ) -> None:
        self.client = client
        self.meters = {m.meter_id: m for m in meters}
        self.prefix = topic_prefix
        # Meters hold up to two head-end keys, so that the head-end's key can be rotated.
        self.headend: tuple[HeadendKey, ...] = (
            () if headend is None else (headend,) if isinstance(headend, HeadendKey) else tuple(headend)
        )
        self.faults = faults
        self.retention = retention
        self.stats = stats or FleetStats()
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        # Messages created per meter, across reconnections (for --count).
        self.ticks: dict[str, int] = {}

    def up(self, meter: VirtualMeter) -> str:
        return f"{self.prefix}/{meter.meter_id}/up"

    def online(self, meter: VirtualMeter, now: datetime) -> bool:
        return meter.offline_until is None or meter.offline_until <= now

    async def tick(
        self, meter: VirtualMeter, *, event_rate: float = 0.0, now: datetime | None = None
    ) -> None:
        """One metering interval of one meter: create a message and (maybe) publish it."""
        now = now or datetime.now(UTC)
        f, rng = self.faults, self.rng
        if f.reset and rng.random() < f.reset:
            meter.reset_epoch()
            self.stats.resets += 1
        if self.online(meter, now) and f.offline and rng.random() < f.offline:
            meter.offline_until = now + timedelta(seconds=f.offline_s)
        body = meter.next_body(now, rng, event_rate=event_rate)
        if meter.cover_open or (f.tamper and rng.random() < f.tamper):
            # The body is the one kept in flash: a replay carries the same events.
            code = COVER_CLOSED if meter.cover_open else COVER_OPENED
            meter.cover_open = not meter.cover_open
            body.setdefault("events", []).append({"t": format_time(now), "code": code, "detail": {}})
        meter.prune(now, self.retention)
        if not self.online(meter, now) or (f.drop and rng.random() < f.drop):
            self.stats.dropped += 1
            return
        await self.send(meter, body)

    async def send(self, meter: VirtualMeter, body: dict[str, Any]) -> None:
        await self.client.publish(self.up(meter), meter.sign(body), qos=1)
        self.stats.published += 1
        self.stats.readings += len(body["readings"])
        self.stats.events += len(body.get("events", ()))
        if body["replay"]:
            self.stats.replayed += 1

    async def serve_replays(self) -> None:
        """Answer replay requests on {prefix}/+/down/replay until cancelled."""
        await self.client.subscribe(f"{self.prefix}/+/down/replay", qos=1)
        async for message in self.client.messages:
            parts = str(message.topic).split("/")
            meter = self.meters.get(parts[-3]) if len(parts) >= 3 else None
            payload = message.payload
            if meter is None or not isinstance(payload, bytes):
                continue
            if message.retain:
                # The head-end never retains a request (docs/protocol.md section 9).
                self.stats.forged_requests += 1
                continue
            now = datetime.now(UTC)
            if not self.online(meter, now):
                self.stats.unreachable_requests += 1
                continue
            request = self.verify_request(meter, payload, now)
            if not isinstance(request, dict):
                if request == "forged":
                    self.stats.forged_requests += 1
                else:
                    self.stats.stale_requests += 1
                log.warning("replay_request_refused", meter=meter.meter_id, why=request)
                continue
            self.stats.requests += 1
            self.stats.request_log.append(
                (meter.meter_id, request["epoch"], request["from_seq"], request["to_seq"], request["req"])
            )
            for body in meter.answer_replay(request, now, forget=self.faults.forget, rng=self.rng):
                await self.send(meter, body)

    def verify_request(self, meter: VirtualMeter, payload: bytes, now: datetime) -> dict[str, Any] | str:
        return check_request(self.headend, meter, payload, now)

    async def run(self, *, count: int, interval_s: float, event_rate: float, stop: asyncio.Event) -> None:
        """Each meter ticks every ``interval_s`` (staggered), ``count`` times (0: until stopped)."""

        async def meter_loop(meter: VirtualMeter, offset: float) -> None:
            loop = asyncio.get_running_loop()
            next_at = loop.time() + offset
            while not stop.is_set() and (count == 0 or self.ticks.get(meter.meter_id, 0) < count):
                delay = next_at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    if stop.is_set():
                        return
                # Counted before the publish: a message lost with the connection is in
                # flash, and the head-end asks for it again after the reconnect.
                self.ticks[meter.meter_id] = self.ticks.get(meter.meter_id, 0) + 1
                await self.tick(meter, event_rate=event_rate)
                next_at += interval_s

        meters = list(self.meters.values())
        async with asyncio.TaskGroup() as tg:
            for i, meter in enumerate(meters):
                tg.create_task(meter_loop(meter, interval_s * i / max(1, len(meters))), name=meter.meter_id)


def check_request(
    headend: Sequence[HeadendKey], meter: VirtualMeter, payload: bytes, now: datetime
) -> dict[str, Any] | str:
    """The request if the head-end signed it for this meter, it is fresh and not yet
    answered (it is then recorded as answered); otherwise why not: "forged" (or
    malformed), "stale" (``sent`` too old or ahead of ``now``) or "answered"."""
    request = _signed_request(headend, meter, payload)
    if request is None:
        return "forged"
    sent = parse_time(request["sent"])
    if now - sent > REQUEST_MAX_AGE or sent - now > REQUEST_MAX_AHEAD:
        return "stale"
    for req, when in list(meter.answered.items()):
        if now - when > REQUEST_MAX_AGE:
            del meter.answered[req]
    if request["req"] in meter.answered:
        return "answered"
    meter.answered[request["req"]] = sent
    return request


def _signed_request(
    headend: Sequence[HeadendKey], meter: VirtualMeter, payload: bytes
) -> dict[str, Any] | None:
    try:
        header = parse_envelope(payload)
        request = orjson.loads(header.body)
    except (Rejected, orjson.JSONDecodeError):
        return None
    key = next((k for k in headend if k.kid == header.kid), None)
    if (
        key is None
        or header.alg != key.alg
        or not verify(header.alg, key.key, header.signature, header.signing_input)
        or not isinstance(request, dict)
        or type(request.get("v")) is not int
        or request["v"] != 1
        or request.get("meter") != meter.meter_id
        or not isinstance(request.get("req"), str)
    ):
        return None
    epoch, low, high = request.get("epoch"), request.get("from_seq"), request.get("to_seq")
    if (
        not (type(epoch) is int and type(low) is int and type(high) is int)
        or not 0 <= epoch <= MAX_INT64
        or not 1 <= low <= high <= MAX_INT64
        or high - low >= MAX_REPLAY_RANGE
    ):
        return None
    sent = request.get("sent")
    try:
        if not isinstance(sent, str):
            return None
        parse_time(sent)
    except ValueError:
        return None
    return request


def headend_key_from_config(config: Config) -> HeadendKey | None:
    """What meters are provisioned with: the public half of the configured head-end key."""
    signer = headend_signer(config.headend)
    if signer is None:
        return None
    return HeadendKey(signer.kid, signer.alg, signer.key.public_key())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meters", type=int, default=10, metavar="N", help="fleet size (default 10)")
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between a meter's messages (default 5; real meters: 900)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=0,
        metavar="N",
        help="messages per meter, then stop (0: run until interrupted)",
    )
    parser.add_argument("--prefix", default="SIM-", help="meter id prefix (default SIM-)")
    parser.add_argument("--per-site", type=int, default=10, metavar="N", help="meters per site (default 10)")
    parser.add_argument(
        "--algs", default=",".join(ALGS), help="comma-separated algorithms to mix (default all of them)"
    )
    parser.add_argument(
        "--event-rate",
        type=float,
        default=0.01,
        metavar="P",
        help="chance of a power loss per message (default 0.01)",
    )
    parser.add_argument(
        "--state",
        default="var/simulator",
        metavar="DIR",
        help="keys and sequence state (default var/simulator)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--no-register", action="store_true", help="do not register the meters in the database"
    )
    faults = parser.add_argument_group("fault injection (probabilities from 0 to 1)")
    faults.add_argument(
        "--drop", type=float, default=0.0, metavar="P", help="uplink messages lost on the way"
    )
    faults.add_argument(
        "--offline", type=float, default=0.0, metavar="P", help="per message: the meter goes offline"
    )
    faults.add_argument(
        "--offline-for", type=float, default=30.0, metavar="SECONDS", help="how long it stays offline"
    )
    faults.add_argument(
        "--reset", type=float, default=0.0, metavar="P", help="per message: firmware reset (new epoch)"
    )
    faults.add_argument(
        "--forget", type=float, default=0.0, metavar="P", help="per replay request: answer 010 (data gone)"
    )
    faults.add_argument(
        "--tamper",
        type=float,
        default=0.0,
        metavar="P",
        help="per message: the meter cover is opened (event 003)",
    )


async def run_from_args(config: Config, args: argparse.Namespace) -> int:
    algs = tuple(a.strip() for a in args.algs.split(","))
    bad = [a for a in algs if a not in ALGS]
    if bad:
        raise UsageError(f"--algs: unknown algorithm {bad[0]!r} (choose from {', '.join(ALGS)})")
    if args.meters < 1:
        raise UsageError(f"--meters must be at least 1, got {args.meters}")
    if args.interval <= 0:
        raise UsageError(f"--interval must be greater than 0, got {args.interval}")
    for name in ("event_rate", "drop", "offline", "reset", "forget", "tamper"):
        if not 0 <= getattr(args, name) <= 1:
            option = "--" + name.replace("_", "-")
            raise UsageError(f"{option} must be between 0 and 1, got {getattr(args, name)}")
    state_dir = Path(args.state)
    started = time.monotonic()
    fleet = build_fleet(
        args.meters,
        prefix=args.prefix,
        interval_s=max(1, round(args.interval)),
        per_site=args.per_site,
        algs=algs,
        state_dir=state_dir,
        seed=args.seed,
    )
    log.info("fleet_ready", meters=len(fleet), keys_s=round(time.monotonic() - started, 1))
    if not args.no_register:
        async with Store(config.database) as store:
            added = await register_fleet(store, fleet)
        log.info("fleet_registered", added=added)
    stats = FleetStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    save_state(fleet, state_dir)  # not clean until the end: a crash means a new epoch
    reporter = asyncio.create_task(_report(stats, stop), name="report")
    try:
        await _publish(config, args, fleet, stats, stop)
    finally:
        stop.set()
        await reporter
        save_state(fleet, state_dir, clean=True)
    log.info("simulator_done", **_summary(stats))
    return 0


async def _publish(
    config: Config,
    args: argparse.Namespace,
    fleet: Sequence[VirtualMeter],
    stats: FleetStats,
    stop: asyncio.Event,
) -> None:
    """Publish until ``--count`` is reached or ``stop`` is set. As a real meter does, when
    the broker goes away: keep trying, with back-off and jitter; what could not be sent is
    in flash, for the head-end to ask for."""
    cfg = config.mqtt
    faults = Faults(args.drop, args.offline, args.offline_for, args.reset, args.forget, args.tamper)
    link: Fleet | None = None
    connected = False

    async def session() -> None:
        nonlocal link, connected
        async with aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=f"ingestd-simulator-{args.prefix}{args.seed}",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=1000,
        ) as client:
            connected = True
            if link is None:
                link = Fleet(
                    client,
                    fleet,
                    topic_prefix=cfg.topic_prefix,
                    headend=headend_key_from_config(config),
                    faults=faults,
                    seed=args.seed,
                    stats=stats,
                )
            link.client = client
            replays = asyncio.create_task(link.serve_replays(), name="replays")
            try:
                await link.run(
                    count=args.count, interval_s=args.interval, event_rate=args.event_rate, stop=stop
                )
            finally:
                replays.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await replays

    delay = cfg.reconnect_initial_s
    while not stop.is_set():
        connected = False
        try:
            await session()
        except (aiomqtt.MqttError, ExceptionGroup) as exc:
            # In the task group of the meters, the broker's error arrives as a group.
            lost = _broker_error(exc)
            if lost is None:
                raise
            if connected:  # the back-off is for a broker that keeps refusing
                delay = cfg.reconnect_initial_s
            log.warning("simulator_broker_lost", error=str(lost), retry_in_s=round(delay, 2))
        else:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(random.uniform(0, delay)):  # noqa: S311 - jitter, not security
                await stop.wait()
        delay = min(delay * 2, cfg.reconnect_max_s)


def _broker_error(exc: BaseException) -> aiomqtt.MqttError | None:
    """The broker's error behind ``exc`` (itself, or all a task group raised); None when
    anything else failed too."""
    if isinstance(exc, aiomqtt.MqttError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        lost, rest = exc.split(aiomqtt.MqttError)
        if lost is not None and rest is None:
            first: BaseException = lost
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            return first if isinstance(first, aiomqtt.MqttError) else None
    return None


async def _report(stats: FleetStats, stop: asyncio.Event, every_s: float = 10.0) -> None:
    while not stop.is_set():
        try:
            async with asyncio.timeout(every_s):
                await stop.wait()
        except TimeoutError:
            log.info("simulator_progress", **_summary(stats))


def _summary(stats: FleetStats) -> dict[str, int]:
    return {
        "published": stats.published,
        "readings": stats.readings,
        "events": stats.events,
        "dropped": stats.dropped,
        "replay_requests": stats.requests,
        "replayed": stats.replayed,
        "forged_requests": stats.forged_requests,
        "stale_requests": stats.stale_requests,
    }
