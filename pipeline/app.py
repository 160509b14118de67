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
from aiohttp import web

from pipeline.api import IngestApi
from pipeline.bridge import MqttBridge, Sink
from pipeline.broker import declare_streams, make_broker
from pipeline.claims import Claims, Gate
from pipeline.config import Settings, redact
from pipeline.database import TimedPool, connect
from pipeline.health import AggregationHealth, DatabaseHealth, Health, MqttHealth, Probe
from pipeline.http import make_app, serve
from pipeline.metrics import Metrics
from pipeline.migrations import migrate
from pipeline.prune import METERS, bess_table, prune
from pipeline.publisher import OutboxPublisher
from pipeline.retry import Abandoned, Backoff, first_of
from pipeline.runner import ChainRunner, Redelivery, Step
from pipeline.tokens import TokenCache
from pipeline.topology import KINDS, STAGE_NAMES, STAGES, Stage, rows
from stages.dedupe import Dedupe
from stages.directory import DeviceCache, EinheitCache
from stages.http_ingest import BESS_PATH, METER_PATH
from stages.persist import Persist
from stages.persist_bess import BessTelemetry
from stages.publish import BESS_INTERVALS, MESSWERTE
from stages.validate import Validate
from stages.validate_bess import ValidateBess
from stages.window_aggregate import WindowAggregate
from stages.window_aggregate_bess import WindowAggregateBess

log = structlog.get_logger("pipeline.app")

Mode = Literal["split", "fused"]
T = TypeVar("T")
DB_STAGES = {"validate", "persist", "window_aggregate", "publish", "http_ingest"}
DRAIN_TIMEOUT_S = 8.0
COALESCE_S = 0.25
Window = WindowAggregate | WindowAggregateBess


def chains(stages: Iterable[str], mode: Mode) -> list[list[Stage]]:
    """The consumer stages to run, per device kind: one each (split), or runs of consecutive
    stages of one kind (fused)."""
    wanted = set(stages)
    groups: list[list[Stage]] = []
    for kind in KINDS:
        order = rows(kind)
        previous = -2
        for position, row in enumerate(order):
            if row.name not in wanted:
                continue
            if mode == "fused" and position == previous + 1:
                groups[-1].append(row)
            else:
                groups.append([row])
            previous = position
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
        self.aggregation_bess = AggregationHealth()
        self._impls: dict[tuple[str, str], Any] = {}
        #: This worker's claims on singletons, once connected (None: it runs none).
        self.claims: Claims | None = None

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
            lambda: nc.is_connected,
            lambda: {"servers": s.nats_servers, "connected_to": _netloc(nc.connected_url)},
        )
        pool: TimedPool | None = None
        tasks: list[asyncio.Task[Any]] = []
        http = api = None
        claims: Claims | None = None
        claims_stop = asyncio.Event()  # set after the rest stopped: claims are released last
        claiming: asyncio.Task[None] | None = None
        try:
            await self._until_up("nats", lambda: declare_streams(js, s.streams))
            if any(row.one for row in STAGES if row.name in self.stages):
                claims = await self._until_up(
                    "nats",
                    lambda: Claims.open(
                        js, failover_s=s.failover_seconds, replicas=s.stream_replicas
                    ),
                )
                self.claims = claims
                self.health.components["claims"] = claims
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
            tasks = self._start(js, pool, claims)
            if claims is not None:  # once every component has said which claims it needs
                claiming = asyncio.create_task(claims.run(claims_stop), name="claims")
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
            if pool is not None and "http_ingest" in self.stages and s.api_port:
                api = await self._serve_api(js, pool, tasks)
            mqtt = self.health.components.get("mqtt")
            if isinstance(mqtt, MqttHealth):
                # "Ready" means a device's message will be taken: the subscription stands, or
                # another replica holds the session.
                await first_of(mqtt.settled, self.stop)
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
            if api is not None:  # no new requests; those in flight finish first
                await api.cleanup()
                api = None
            _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            claims_stop.set()
            if claiming is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(claiming, DRAIN_TIMEOUT_S)
            for runner in (api, http):
                if runner is not None:
                    await runner.cleanup()
            if pool is not None:
                await pool.close()
            await _close_nats(broker, nc)
            log.info("pipeline stopped")

    def _start(
        self, js: Any, pool: TimedPool | None, claims: Claims | None
    ) -> list[asyncio.Task[Any]]:
        s = self.settings

        def gate(names: set[str]) -> Gate | None:
            return claims.gate(names) if claims is not None and names else None

        tasks: list[asyncio.Task[Any]] = []
        impls = self._impls = self._stage_functions(pool)
        if pool is not None and "window_aggregate" in self.stages:
            self.health.components["aggregation"] = self.aggregation
            self.health.components["aggregation:bess"] = self.aggregation_bess
            for kind, health in (("zev", self.aggregation), ("bess", self.aggregation_bess)):
                window = impls[("window_aggregate", kind)]
                tasks.append(asyncio.create_task(self._sweep(window, health), name=f"sweep-{kind}"))
            if s.raw_retention is not None:
                tasks.append(asyncio.create_task(self._prune(pool), name="prune"))
        sinks: dict[str, Sink] = {}
        fed: set[str] = set()  # the claims of the chains a fused bridge feeds
        for group in chains(self.stages, self.mode):
            steps = [Step(row, impls[(row.name, row.kind)]) for row in group]
            held = {row.consumer for row in group if row.one}
            runner = ChainRunner(
                js,
                steps,
                self.metrics,
                self.stop,
                batch_size=s.batch_size,
                redelivery=Redelivery(ack_wait_s=s.ack_wait_seconds, max_deliver=s.max_deliver),
                streams=s.streams,
                gate=gate(held),
            )
            self.health.components[f"stage:{runner.name}"] = Probe(
                lambda r=runner: r.healthy,
                lambda r=runner: {"role": r.role, "last_error": r.last_error},
            )
            if (
                self.mode == "fused"
                and group[0].name == "validate"
                and "mqtt_bridge" in self.stages
            ):
                # Fused with the bridge: MQTT feeds the chain in memory, no INGEST hop; the
                # consumer still runs, to take what a split bridge left on `ingest.>`.
                sinks[group[0].kind] = runner.run_items
                fed |= held
            tasks.append(asyncio.create_task(runner.run(), name=runner.name))
        if "mqtt_bridge" in self.stages:
            mqtt_health = MqttHealth(silence_threshold_s=s.mqtt_silence_threshold_seconds)
            self.health.components["mqtt"] = mqtt_health
            bridge = MqttBridge(
                s, js, self.metrics, mqtt_health, self.stop, sinks, gate({"mqtt_bridge"} | fed)
            )
            tasks.append(asyncio.create_task(bridge.run(), name="mqtt_bridge"))
        if pool is not None and "publish" in self.stages:
            for kind, outbox in (("zev", MESSWERTE), ("bess", BESS_INTERVALS)):
                row = next(r for r in STAGES if r.name == "publish" and r.kind == kind)
                publisher = OutboxPublisher(
                    pool,
                    s.database_url,
                    js,
                    self.metrics,
                    self.stop,
                    outbox,
                    s.streams,
                    gate=gate({row.consumer}),
                    holder=claims.holder if claims is not None else "",
                    failover_s=s.failover_seconds,
                )
                name = "publish" if kind == "zev" else "publish:bess"
                self.health.components[name] = Probe(
                    lambda p=publisher: p.healthy, lambda p=publisher: {"role": p.role}
                )
                tasks.append(asyncio.create_task(publisher.run(), name=name))
        return tasks

    async def _serve_api(
        self, js: Any, pool: TimedPool, tasks: list[asyncio.Task[Any]]
    ) -> web.AppRunner | None:
        """Stage `http_ingest`: the ingest API, judging items with the validate stage functions."""
        s = self.settings
        tokens = TokenCache(pool)
        impls = self._impls  # the validate stage functions and their caches, shared
        api = IngestApi(
            js=js,
            db=pool,
            tokens=tokens,
            judges={METER_PATH: impls[("validate", "zev")], BESS_PATH: impls[("validate", "bess")]},
            health=self.health,
            metrics=self.metrics,
            max_body_bytes=s.api_max_body_bytes,
            body_timeout_s=s.api_body_timeout_seconds,
        )
        try:
            runner = await serve(api.app(), s.http_host, s.api_port)
        except OSError as exc:
            error = str(exc)
            self.health.components["api"] = Probe(lambda: False, lambda: {"error": error})
            log.error("ingest API not started", port=s.api_port, error=error)
            return None
        self.health.components["api"] = Probe(lambda: True, lambda: {"port": s.api_port})
        tasks.append(asyncio.create_task(tokens.record_use(self.stop), name="token-use"))
        return runner

    def _stage_functions(self, pool: TimedPool | None) -> dict[tuple[str, str], Any]:
        """The stage callable of each (stage, kind) this process can run."""
        s = self.settings
        impls: dict[tuple[str, str], Any] = {
            ("dedupe", kind): Dedupe(capacity=s.dedupe_capacity) for kind in KINDS
        }
        if pool is None:
            return impls
        limit, keep = s.max_payload_bytes, s.raw_retention
        impls.update(
            {
                ("validate", "zev"): Validate(
                    EinheitCache(pool), max_payload_bytes=limit, retention=keep
                ),
                ("validate", "bess"): ValidateBess(
                    DeviceCache(pool), max_payload_bytes=limit, retention=keep
                ),
                ("persist", "zev"): Persist(pool, retention=keep),
                ("persist", "bess"): Persist(
                    pool, BessTelemetry(s.bess_max_gap_seconds), retention=keep
                ),
                ("window_aggregate", "zev"): WindowAggregate(
                    pool, grace=s.grace, concurrency=s.aggregation_concurrency
                ),
                ("window_aggregate", "bess"): WindowAggregateBess(
                    pool, grace=s.grace, max_gap_s=s.bess_max_gap_seconds
                ),
            }
        )
        return impls

    async def _sweep(self, window: Window, health: AggregationHealth) -> None:
        """Close due intervals every `sweep_interval_seconds`; on start this is the catch-up."""
        m = self.metrics
        while not self.stop.is_set():
            started = time.perf_counter()
            window.due.clear()  # before, not after: a late reading during this sweep wakes the next
            try:
                run = await window.sweep()
            except Exception as exc:
                m.aggregation_failures.inc()
                health.record(ok=False, error=repr(exc))
                log.warning("aggregation failed", error=repr(exc))
            else:
                m.aggregation_runs.inc()
                m.aggregation_records.inc(run.marked)
                m.aggregation_duration.observe(time.perf_counter() - started)
                m.aggregation_last_run.set(time.time())
                health.record(
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

    async def _prune(self, pool: TimedPool) -> None:
        """Retention, from the sweeper: at start, then every `prune_interval_seconds`; after a
        failure (the database away), again a minute later."""
        s = self.settings
        assert s.raw_retention is not None
        tables = (METERS, bess_table(s.bess_max_gap_seconds))
        while not self.stop.is_set():
            wait_s = s.prune_interval_seconds
            try:
                for result in await prune(pool, tables, retention=s.raw_retention, grace=s.grace):
                    self.metrics.raw_rows_pruned.labels(result.table).inc(result.rows)
            except Exception as exc:
                log.warning("prune failed, retrying in a minute", error=repr(exc))
                wait_s = min(wait_s, 60.0)
            await first_of(self.stop, timeout_s=wait_s)


async def _close_nats(broker: Any, nc: Any) -> None:
    """Drain the NATS connection; while NATS is away (reconnecting) draining refuses, so close.

    Nothing is lost either way: every input not acknowledged yet is redelivered."""
    try:
        await broker.stop()
    except Exception as exc:
        log.info("NATS not reachable at shutdown, closing without draining", error=repr(exc))
        with contextlib.suppress(Exception):
            await nc.close()


def _netloc(url: Any) -> str | None:
    """`host:port` of the NATS server the connection is on (None while it is not): which
    node of a cluster this worker depends on, for operators and the cluster fault suite."""
    return None if url is None else str(url.netloc) or None
