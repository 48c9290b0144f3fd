"""The daemon's lifecycle, in the manner of uvicorn's server.

Start: database (schema must be current), key cache, metrics endpoint, then the broker.
Signals only set a flag. Shutdown is a fixed sequence: stop reading from the broker,
drain what is in hand (commit and acknowledge it) within a timeout, cancel the tasks,
close the resources in reverse order. A second signal exits at once: nothing that was
acknowledged is lost either way, and the broker redelivers the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog

from ingestd.clock import DbClock
from ingestd.config import Config
from ingestd.errors import UsageError
from ingestd.gaps import GapRequester, headend_signer
from ingestd.health import DatabaseProbe, HealthMonitor
from ingestd.keyring import Keyring
from ingestd.metrics import Metrics, MetricsServer
from ingestd.mqtt import MqttLink
from ingestd.pipeline import Pipeline, receive_maximum
from ingestd.retention import ClosedGapRetention, QuarantineRetention
from ingestd.store import Store
from ingestd.systemd import Notifier

log = structlog.get_logger("ingestd.daemon")


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        # ``now`` is the host's clock, and the daemon does not go by it: a clock that jumps
        # must not stamp anything. It goes by the database's (ingestd.clock), and only
        # compares the host's with it (a test passes a host clock that jumps).
        self.clock = DbClock(host=now, metrics=self.metrics)
        self._now = self.clock.now
        self.should_exit = asyncio.Event()
        self.ready = asyncio.Event()
        self.metrics_port: int | None = None

    async def run(self) -> None:
        # systemd (Type=notify): READY=1, STATUS=, STOPPING=1 and the watchdog; a no-op elsewhere.
        async with Notifier() as notifier:
            await self._run(notifier)

    async def _run(self, notifier: Notifier) -> None:
        cfg = self.config
        signer = headend_signer(cfg.headend)
        async with Store(
            cfg.database,
            quarantine_payload_max=cfg.ingest.quarantine_payload_max,
            gaps=cfg.gaps,
            now=self._now,
        ) as store:
            pending = await store.pending_migrations()
            if pending:
                raise UsageError(
                    f"database schema is not current ({len(pending)} migration(s) pending): "
                    "run 'ingestd migrate'"
                )
            self.metrics.db_up.set(1)  # reached, and the schema is current
            await self.clock.sync(store)
            # Empty at start: keys are loaded as meters speak (ingestd.keyring).
            keyring = Keyring(store)
            self.metrics.keys_loaded.set_function(keyring.__len__)
            # The link hands deliveries to the pipeline, which acknowledges through the link.
            link = MqttLink(
                cfg.mqtt,
                lambda delivery: pipeline.submit(delivery),  # noqa: PLW0108 - pipeline is bound below
                on_state=self.metrics.mqtt_connected.set,
                on_disconnect=self.metrics.mqtt_disconnects.inc,
                on_fast_path=self.metrics.set_mqtt_fast_path,
                state_topic=f"headend/{cfg.headend.instance}/state",
                now=self._now,
                receive_maximum=receive_maximum(cfg.ingest),
            )
            pipeline = Pipeline(
                cfg.ingest,
                topic_prefix=cfg.mqtt.topic_prefix,
                store=store,
                keyring=keyring,
                metrics=self.metrics,
                upstream=link,
                now=self._now,
            )
            requester = GapRequester(
                store,
                cfg.gaps,
                signer=signer,
                publish=link.publish,
                topic_prefix=cfg.mqtt.topic_prefix,
                metrics=self.metrics,
                now=self._now,
                # Admission control's headroom: answers asked for now would queue behind this.
                load=lambda: pipeline.in_hand / cfg.ingest.max_pending,
            )
            metrics_server = MetricsServer(self.metrics, cfg.metrics.addr)
            health = HealthMonitor(
                cfg.flags,
                store=store,
                metrics=self.metrics,
                now=self._now,
                billing=cfg.billing,
                retention_days=cfg.gaps.retention_days,
            )
            retention = QuarantineRetention(cfg.ingest, store=store, metrics=self.metrics, now=self._now)
            gap_retention = ClosedGapRetention(cfg.gaps, store=store, metrics=self.metrics, now=self._now)
            async with metrics_server, pipeline, health:
                self.metrics_port = metrics_server.port
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(pipeline.run_verifier(), name="verify"),
                        tg.create_task(pipeline.run_writer(), name="write"),
                        tg.create_task(keyring.watch(cfg.ingest.key_refresh_s), name="keys"),
                        tg.create_task(
                            store.listen_keys(keyring.changed, keyring.resync), name="key-listener"
                        ),
                        tg.create_task(link.run(), name="mqtt"),
                        tg.create_task(requester.run(), name="gaps"),
                        tg.create_task(health.run(), name="health"),
                        tg.create_task(
                            DatabaseProbe(cfg.database, metrics=self.metrics).run(), name="db-probe"
                        ),
                        tg.create_task(retention.run(), name="quarantine-retention"),
                        tg.create_task(gap_retention.run(), name="gap-retention"),
                        tg.create_task(self.clock.run(store), name="clock"),
                    ]
                    notifier.status("connecting to the broker")
                    # A stop asked for while the broker is still out of reach is honoured
                    # at once, not after the first successful connection.
                    if await _first(link.wait_subscribed(), self.should_exit.wait()) == 0:
                        self.ready.set()

                        def describe() -> str:
                            return status_line(
                                self.metrics, broker_up=link.connected, in_hand=pipeline.in_hand
                            )

                        notifier.ready(describe())
                        # systemd watches from READY=1 on; the pings come from this loop.
                        tasks.append(tg.create_task(notifier.run_watchdog(), name="watchdog"))
                        tasks.append(tg.create_task(notifier.keep_status(describe), name="status"))
                        log.info("ingestd_ready", metrics_port=self.metrics_port)
                        await self.should_exit.wait()
                    notifier.stopping(f"shutting down; draining {pipeline.in_hand}")
                    log.info("shutdown_started", in_hand=pipeline.in_hand)
                    pipeline.close_intake()
                    drained = await pipeline.drain(cfg.ingest.shutdown_timeout_s)
                    if not drained:
                        log.warning("shutdown_drain_timeout", in_hand=pipeline.in_hand)
                    # Read again (the pipeline now drops what arrives, unacknowledged), so
                    # that the socket closes with nothing unread: closing over unread data
                    # resets the connection, and a reset makes the broker discard the acks
                    # it has not read yet. The retained offline state, acknowledged by the
                    # broker, is the barrier: every ack sent before it has been processed.
                    link.resume_reading()
                    await link.announce(online=False, within_s=5.0)
                    for task in tasks:
                        task.cancel()
                    # A task cancelled inside a database call waits for the server to confirm
                    # the cancellation; a server that stopped answering (a partition, a
                    # frozen host) does not, and systemd's stop timeout would run out first.
                    _, stuck = await asyncio.wait(tasks, timeout=cfg.database.close_timeout_s)
                    if stuck:
                        log.warning("shutdown_tasks_stuck", tasks=sorted(t.get_name() for t in stuck))
                        store.terminate()
                log.info("shutdown_complete", drained=drained)


def status_line(metrics: Metrics, *, broker_up: bool, in_hand: int) -> str:
    """One line for systemd's STATUS= (``systemctl status``): what the daemon is doing."""
    if metrics.registry.get_sample_value("ingestd_db_up") == 0:
        # Nothing is acknowledged meanwhile: the broker keeps the rest.
        return f"database unreachable, holding {in_hand}"
    if not broker_up:
        return f"broker disconnected, reconnecting; pending {in_hand}"
    return f"ingesting; pending {in_hand}"


async def _first(*waits: Coroutine[Any, Any, Any]) -> int:
    """Wait for the first of ``waits`` to finish; cancel the others; return its index."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    return next(i for i, task in enumerate(tasks) if task in done)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM/SIGINT: graceful shutdown; a second one: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(signum: int) -> None:
        if daemon.should_exit.is_set():
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.should_exit.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)
