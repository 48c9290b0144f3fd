"""A fleet of virtual meters: the demo, the test driver and the benchmark driver.

Each meter behaves as the firmware does: its own key (the fleet mixes all five
algorithms), a sequence number per epoch kept across restarts, cumulative registers
that only grow, one reading per metering interval, occasional power events, and a
flash store of what it sent (about 90 days on a real meter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
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

from ingestd.config import Config
from ingestd.envelope import format_time
from ingestd.errors import UsageError
from ingestd.signature import (
    ALGS,
    Alg,
    PrivateKey,
    Signer,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_pem,
)
from ingestd.store import Store

log = structlog.get_logger("ingestd.simulator")

POWER_LOSS = "001"
POWER_RESTORED = "002"


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
    last_interval: datetime | None = None
    flash: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def next_body(self, now: datetime, rng: random.Random, *, event_rate: float = 0.0) -> dict[str, Any]:
        """The next uplink body: one reading for the interval that just ended."""
        self.seq += 1
        # One reading per interval, never two for the same one, even when the simulation
        # runs faster than the metering interval.
        end = _interval_end(now, self.interval_s)
        if self.last_interval is not None and end <= self.last_interval:
            end = self.last_interval + timedelta(seconds=self.interval_s)
        self.last_interval = end
        used = max(0.0, rng.gauss(self.load_w, self.load_w / 4)) * self.interval_s / 3600
        self.import_wh += round(used)
        if self.solar and 7 <= end.hour < 18:
            self.export_wh += round(rng.uniform(0, 3000) * self.interval_s / 3600)
        reading: dict[str, Any] = {"t": format_time(end), "import_wh": self.import_wh}
        if self.solar:
            reading["export_wh"] = self.export_wh
        body: dict[str, Any] = {
            "v": 1,
            "meter": self.meter_id,
            "epoch": self.epoch,
            "seq": self.seq,
            "sent": format_time(now),
            "replay": False,
            "readings": [reading],
        }
        events = self._events(now, rng, event_rate)
        if events:
            body["events"] = events
        return body

    def sign(self, body: dict[str, Any]) -> bytes:
        payload = self.signer.sign_body(orjson.dumps(body))
        self.flash[(body["epoch"], body["seq"])] = payload
        return payload

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
    for meter in fleet:
        saved = state.get(meter.meter_id)
        if saved:
            meter.epoch, meter.seq = saved["epoch"], saved["seq"]
            meter.import_wh, meter.export_wh = saved["import_wh"], saved["export_wh"]


def save_state(fleet: Sequence[VirtualMeter], state_dir: Path) -> None:
    """Sequence numbers and registers survive a restart, as in a meter's flash."""
    state = {
        m.meter_id: {"epoch": m.epoch, "seq": m.seq, "import_wh": m.import_wh, "export_wh": m.export_wh}
        for m in fleet
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "state.json.tmp"
    tmp.write_bytes(orjson.dumps(state))
    tmp.replace(state_dir / "state.json")


@dataclass(slots=True)
class FleetStats:
    published: int = 0
    readings: int = 0
    events: int = 0


async def publish_fleet(
    client: aiomqtt.Client,
    fleet: Sequence[VirtualMeter],
    *,
    topic_prefix: str,
    count: int,
    interval_s: float,
    event_rate: float,
    seed: int,
    stats: FleetStats,
    stop: asyncio.Event,
) -> None:
    """Each meter publishes every ``interval_s`` (staggered), ``count`` times (0: until stopped)."""
    rng = random.Random(seed)  # noqa: S311 - simulation, not security

    async def meter_loop(meter: VirtualMeter, offset: float) -> None:
        topic = f"{topic_prefix}/{meter.meter_id}/up"
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset
        sent = 0
        while not stop.is_set() and (count == 0 or sent < count):
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                if stop.is_set():
                    return
            body = meter.next_body(datetime.now(UTC), rng, event_rate=event_rate)
            await client.publish(topic, meter.sign(body), qos=1)
            sent += 1
            stats.published += 1
            stats.readings += len(body["readings"])
            stats.events += len(body.get("events", ()))
            next_at += interval_s

    async with asyncio.TaskGroup() as tg:
        for i, meter in enumerate(fleet):
            tg.create_task(meter_loop(meter, interval_s * i / max(1, len(fleet))), name=meter.meter_id)


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
        "--algs", default=",".join(ALGS), help="comma-separated algorithms to mix (default all five)"
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


async def run_from_args(config: Config, args: argparse.Namespace) -> int:
    algs = tuple(a.strip() for a in args.algs.split(","))
    bad = [a for a in algs if a not in ALGS]
    if bad:
        raise UsageError(f"--algs: unknown algorithm {bad[0]!r} (choose from {', '.join(ALGS)})")
    if args.meters < 1:
        raise UsageError(f"--meters must be at least 1, got {args.meters}")
    if args.interval <= 0:
        raise UsageError(f"--interval must be greater than 0, got {args.interval}")
    if not 0 <= args.event_rate <= 1:
        raise UsageError(f"--event-rate must be between 0 and 1, got {args.event_rate}")
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
    cfg = config.mqtt
    try:
        async with aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=f"ingestd-simulator-{args.prefix}{args.seed}",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=1000,
        ) as client:
            reporter = asyncio.create_task(_report(stats, stop), name="report")
            try:
                await publish_fleet(
                    client,
                    fleet,
                    topic_prefix=cfg.topic_prefix,
                    count=args.count,
                    interval_s=args.interval,
                    event_rate=args.event_rate,
                    seed=args.seed,
                    stats=stats,
                    stop=stop,
                )
            finally:
                stop.set()
                await reporter
    except aiomqtt.MqttError as exc:
        log.error("simulator_broker_error", error=str(exc))  # noqa: TRY400 - one line suffices
        return 1
    finally:
        save_state(fleet, state_dir)
    log.info("simulator_done", published=stats.published, readings=stats.readings, events=stats.events)
    return 0


async def _report(stats: FleetStats, stop: asyncio.Event, every_s: float = 10.0) -> None:
    while not stop.is_set():
        try:
            async with asyncio.timeout(every_s):
                await stop.wait()
        except TimeoutError:
            log.info(
                "simulator_progress", published=stats.published, readings=stats.readings, events=stats.events
            )
