"""A worker process: connects to NATS and PostgreSQL and runs the selected stages.

`Pipeline.run()` starts, for the stages it was given, the MQTT bridge, the consumer chains
(split: one per stage; fused: consecutive stages chained in memory), the window sweeper and
the outbox publisher, plus the HTTP server; it returns after `stop` is set and every part has
finished its batch in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

import structlog

from pipeline.bridge import MqttBridge, Sink
from pipeline.broker import declare_streams, make_broker
from pipeline.config import Settings, redact
from pipeline.database import TimedPool, connect
from pipeline.health import AggregationHealth, DatabaseHealth, Health, MqttHealth, Probe
from pipeline.http import make_app, serve
from pipeline.metrics import Metrics
from pipeline.migrations import migrate
from pipeline.publisher import OutboxPublisher
from pipeline.retry import Abandoned, Backoff, first_of
from pipeline.runner import ChainRunner, Redelivery, Step
from pipeline.topology import BY_NAME, CONSUMER_STAGES, STAGE_NAMES
from stages.dedupe import Dedupe
from stages.persist import Persist
from stages.validate import EinheitCache, Validate
from stages.window_aggregate import WindowAggregate

log = structlog.get_logger("pipeline.app")

Mode = Literal["split", "fused"]
T = TypeVar("T")
DB_STAGES = {"validate", "persist", "window_aggregate", "publish"}
DRAIN_TIMEOUT_S = 8.0
COALESCE_S = 0.25


def chains(stages: Iterable[str], mode: Mode) -> list[list[str]]:
    """Group the consumer stages to run: one each (split) or consecutive runs (fused)."""
    wanted = set(stages)
    selected = [name for name in CONSUMER_STAGES if name in wanted]
    if mode == "split":
        return [[name] for name in selected]
    groups: list[list[str]] = []
    for name in selected:
        position = CONSUMER_STAGES.index(name)
        if groups and CONSUMER_STAGES.index(groups[-1][-1]) == position - 1:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str] = STAGE_NAMES,
        mode: Mode = "fused",
        *,
        metrics: Metrics | None = None,
        auto_migrate: bool = True,
    ) -> None:
        wanted = set(stages)
        unknown = wanted - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown stage(s): {', '.join(sorted(unknown))}")
        self.settings = settings
        self.stages = [s for s in STAGE_NAMES if s in wanted]
        self.mode = mode
        self.metrics = metrics or Metrics()
        self.health = Health()
        self.auto_migrate = auto_migrate
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.aggregation = AggregationHealth()

    async def _until_up(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Start-up against services that may not be there yet: retry with backoff until stop."""
        backoff = Backoff(self.stop, first_s=0.5, cap_s=10.0)
        while True:
            try:
                return await attempt()
            except Exception as exc:
                log.warning("not reachable yet, retrying", service=what, error=repr(exc))
                await backoff.wait()  # raises Abandoned once stop is set

    async def run(self) -> None:
        try:
            await self._run()
        except Abandoned:
            log.info("stopped before start-up completed")

    async def _run(self) -> None:
        s = self.settings
        broker = make_broker(s.nats_servers)
        nc = await self._until_up("nats", broker.connect)
        js = nc.jetstream()
        self.health.components["nats"] = Probe(
            lambda: nc.is_connected, lambda: {"servers": s.nats_servers}
        )
        pool: TimedPool | None = None
        tasks: list[asyncio.Task[Any]] = []
        http = None
        try:
            await self._until_up("nats", lambda: declare_streams(js, s.stream_replicas))
            if DB_STAGES & set(self.stages):
                if self.auto_migrate:
                    await self._until_up("postgresql", lambda: migrate(s.database_url))
                pool = await self._until_up(
                    "postgresql",
                    lambda: connect(
                        s.database_url,
                        size=s.db_pool_size,
                        connect_s=s.db_connect_timeout_seconds,
                        acquire_s=s.db_acquire_timeout_seconds,
                        statement_s=s.db_statement_timeout_seconds,
                    ),
                )
                database = DatabaseHealth(pool)
                self.health.components["database"] = database
            tasks = self._start(js, pool)
            if pool is not None:
                tasks.append(asyncio.create_task(database.watch(self.stop), name="db-health"))
            if s.http_port:
                try:
                    http = await serve(
                        make_app(self.health, self.metrics), s.http_host, s.http_port
                    )
                except OSError as exc:
                    # Losing the health/metrics endpoint must not stop readings from flowing.
                    log.error("HTTP server not started", port=s.http_port, error=str(exc))
            mqtt = self.health.components.get("mqtt")
            if isinstance(mqtt, MqttHealth):
                # "Ready" means a device's message will be taken: the subscription stands.
                await first_of(mqtt.ever_subscribed, self.stop)
            log.info(
                "pipeline running",
                stages=self.stages,
                mode=self.mode,
                mqtt=repr(s.mqtt),
                nats=s.nats_servers,
                database=redact(s.database_url),
            )
            self.ready.set()
            await self.stop.wait()
            log.info("draining")
            _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            if http is not None:
                await http.cleanup()
            if pool is not None:
                await pool.close()
            await _close_nats(broker, nc)
            log.info("pipeline stopped")

    def _start(self, js: Any, pool: TimedPool | None) -> list[asyncio.Task[Any]]:
        s = self.settings
        tasks: list[asyncio.Task[Any]] = []
        window: WindowAggregate | None = None
        if pool is not None and "window_aggregate" in self.stages:
            window = WindowAggregate(pool, grace=s.grace)
            self.health.components["aggregation"] = self.aggregation
            tasks.append(asyncio.create_task(self._sweep(window), name="sweeper"))
        impls: dict[str, Any] = {}
        if pool is not None:
            impls["validate"] = Validate(EinheitCache(pool), max_payload_bytes=s.max_payload_bytes)
            impls["persist"] = Persist(pool)
            impls["window_aggregate"] = window
        impls["dedupe"] = Dedupe(capacity=s.dedupe_capacity)
        sink: Sink | None = None
        for group in chains(self.stages, self.mode):
            steps = [Step(BY_NAME[name], impls[name]) for name in group]
            runner = ChainRunner(
                js,
                steps,
                self.metrics,
                self.stop,
                batch_size=s.batch_size,
                redelivery=Redelivery(ack_wait_s=s.ack_wait_seconds, max_deliver=s.max_deliver),
                replicas=s.stream_replicas,
            )
            self.health.components[f"stage:{runner.name}"] = Probe(
                lambda r=runner: r.healthy, lambda r=runner: {"last_error": r.last_error}
            )
            if self.mode == "fused" and group[0] == "validate" and "mqtt_bridge" in self.stages:
                # Fused with the bridge: MQTT feeds the chain in memory, no INGEST hop; the
                # consumer still runs, to take what a split bridge left on `ingest.>`.
                sink = runner.run_items
            tasks.append(asyncio.create_task(runner.run(), name=runner.name))
        if "mqtt_bridge" in self.stages:
            mqtt_health = MqttHealth(silence_threshold_s=s.mqtt_silence_threshold_seconds)
            self.health.components["mqtt"] = mqtt_health
            bridge = MqttBridge(s, js, self.metrics, mqtt_health, self.stop, sink)
            tasks.append(asyncio.create_task(bridge.run(), name="mqtt_bridge"))
        if pool is not None and "publish" in self.stages:
            publisher = OutboxPublisher(
                pool, s.database_url, js, self.metrics, self.stop, s.stream_replicas
            )
            self.health.components["publish"] = Probe(lambda: publisher.healthy)
            tasks.append(asyncio.create_task(publisher.run(), name="publish"))
        return tasks

    async def _sweep(self, window: WindowAggregate) -> None:
        """Close due intervals every `sweep_interval_seconds`; on start this is the catch-up."""
        m = self.metrics
        while not self.stop.is_set():
            started = time.perf_counter()
            window.due.clear()  # before, not after: a late reading during this sweep wakes the next
            try:
                run = await window.sweep()
            except Exception as exc:
                m.aggregation_failures.inc()
                self.aggregation.record(ok=False, error=repr(exc))
                log.warning("aggregation failed", error=repr(exc))
            else:
                m.aggregation_runs.inc()
                m.aggregation_records.inc(run.marked)
                m.aggregation_duration.observe(time.perf_counter() - started)
                m.aggregation_last_run.set(time.time())
                self.aggregation.record(
                    ok=True, intervals=run.intervals, rows=run.summed, changed=run.changed
                )
                if run.intervals:
                    log.info(
                        "intervals aggregated",
                        intervals=run.intervals,
                        rows=run.summed,
                        changed=run.changed,
                    )
            await first_of(self.stop, window.due, timeout_s=self.settings.sweep_interval_seconds)
            if window.due.is_set() and not self.stop.is_set():
                # A late reading woke us: let the rest of its burst arrive, then sum once.
                await asyncio.sleep(COALESCE_S)


async def _close_nats(broker: Any, nc: Any) -> None:
    """Drain the NATS connection; while NATS is away (reconnecting) draining refuses, so close.

    Nothing is lost either way: every input not acknowledged yet is redelivered."""
    try:
        await broker.stop()
    except Exception as exc:
        log.info("NATS not reachable at shutdown, closing without draining", error=repr(exc))
        with contextlib.suppress(Exception):
            await nc.close()
