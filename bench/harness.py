"""Runs the systems on the same load, one after the other, against the same servers.

Servers (mosquitto, or nats-server's MQTT listener where mosquitto is missing; nats-server with
JetStream synced on every write, as `deploy/` configures it, unless asked otherwise; PostgreSQL
with fsync) start once in a temporary directory.
Every run gets a fresh database and, for the pipeline, a fresh NATS server, so no run inherits
another's backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from hdrh.histogram import HdrHistogram

from bench import load as loadgen
from bench import systems
from bench.load import Load
from pipeline.devstack import Mosquitto, NatsCluster, NatsServer, Postgres, mosquitto_binary
from pipeline.migrations import migrate

#: Rows appear as notifications at commit: the latency probe's clock.
NOTIFY_SQL = """
CREATE OR REPLACE FUNCTION bench_row_committed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_rows', NEW.einheit_id || ' ' || extract(epoch FROM NEW.timestamp));
    RETURN NEW;
END $$;
CREATE TRIGGER bench_row_committed AFTER INSERT ON zaehler_rohdaten
    FOR EACH ROW EXECUTE FUNCTION bench_row_committed();
"""


@dataclass
class Result:
    kind: str
    loop: str  # "closed" (throughput) or "open" (latency)
    messages: int
    stored: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.messages - self.stored

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0


class Stack:
    def __init__(self, workdir: Path, *, nats_sync_always: bool = True) -> None:
        self.workdir = workdir
        self.nats_sync_always = nats_sync_always
        self.postgres = Postgres(workdir / "pg").start()
        self.broker: Any
        if mosquitto_binary():
            # The fleet bench queues a whole quarter hour of 100,000 units (1.5 million
            # readings) when the publishers outrun the subscriber: room for it.
            self.broker = Mosquitto(workdir / "mosquitto", max_queued=5_000_000).start()
            self.broker_name = "mosquitto"
            self.mqtt_port = self.broker.port
        else:
            self.broker = NatsServer(workdir / "nats-mqtt", mqtt=True).start()
            self.broker_name = "nats-server MQTT"
            assert self.broker.mqtt_port is not None
            self.mqtt_port = self.broker.mqtt_port
        self.runs = 0
        #: The NATS server (or cluster) of the run under way, if it has one.
        self.nats: NatsServer | NatsCluster | None = None

    def close(self) -> None:
        self.broker.stop()
        self.postgres.stop()

    @contextlib.contextmanager
    def environment(self, kind: str, cluster: bool = False) -> Iterator[dict[str, str]]:
        """Settings for one run: a new database and, for the pipeline, a new NATS server (or,
        with `cluster`, three nodes with every stream on all three)."""
        self.runs += 1
        name = f"bench_{self.runs}_{kind}"
        asyncio.run(self._create_database(name))
        env = {
            "PIPELINE_DATABASE_URL": self.postgres.dsn_for(name),
            "PIPELINE_MQTT_URL": f"mqtt://127.0.0.1:{self.mqtt_port}",
            "PIPELINE_MQTT_CLIENT_ID": f"bench-bridge-{uuid.uuid4().hex[:8]}",
            "PIPELINE_LOG_FORMAT": "json",
            "PIPELINE_LOG_LEVEL": "warning",
        }
        nats: NatsServer | NatsCluster | None = None
        if kind in ("fused", "split") and cluster:
            nats = NatsCluster(
                self.workdir / f"nats-{self.runs}", sync_always=self.nats_sync_always
            ).start()
            env["PIPELINE_STREAM_REPLICAS"] = "3"
        elif kind in ("fused", "split"):
            nats = NatsServer(
                self.workdir / f"nats-{self.runs}", sync_always=self.nats_sync_always
            ).start()
        if nats is not None:
            env["PIPELINE_NATS_URL"] = nats.url
        self.nats = nats
        try:
            yield env
        finally:
            self.nats = None
            if nats is not None:
                nats.stop()

    async def _create_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.postgres.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()


async def prepare(database_url: str, load: Load) -> None:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        for unit in load.units:
            if isinstance(unit, loadgen.Device):
                await conn.execute(
                    "INSERT INTO bess_device VALUES ($1, $2, $3)",
                    unit.site,
                    unit.device,
                    unit.organization_id,
                )
            else:
                await conn.execute(
                    "INSERT INTO einheit (id, organization_id) VALUES ($1, $2)",
                    unit.einheit_id,
                    unit.organization_id,
                )
        await conn.execute(NOTIFY_SQL)
    finally:
        await conn.close()


async def count_rows(database_url: str, table: str = "zaehler_rohdaten") -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def wait_for_rows(
    database_url: str,
    expected: int,
    stall_s: float,
    poll_s: float = 0.05,
    table: str = "zaehler_rohdaten",
) -> tuple[int, float]:
    """Poll until `expected` rows exist or none were added for `stall_s`; (rows, when)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows, last_change = 0, time.monotonic()
        while True:
            now_rows = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            now = time.monotonic()
            if now_rows >= expected:
                return now_rows, now
            if now_rows != rows:
                rows, last_change = now_rows, now
            elif now - last_change > stall_s:
                return rows, last_change
            await asyncio.sleep(poll_s)
    finally:
        await conn.close()


def throughput(
    stack: Stack,
    kind: str,
    load: Load,
    logdir: Path,
    stall_s: float,
    profile: Path | None = None,
    *,
    cluster: bool = False,
    replicas: int = 1,
) -> Result:
    """Closed loop: every publisher at full speed; time from the first publish to the last row
    (for the counting subscribers: to the last message counted). `replicas` workers of each
    (design §14)."""
    result = Result(kind, "closed", load.total)
    with stack.environment(kind, cluster) as env:
        database_url = env["PIPELINE_DATABASE_URL"]
        asyncio.run(prepare(database_url, load))
        system = systems.start(
            kind,
            mqtt_port=stack.mqtt_port,
            expected=load.total,
            env=env,
            logdir=logdir,
            profile=profile,
            replicas=replicas,
        )
        cpu_before = system.cpu_s()
        try:
            with loadgen.publishing(load, stack.mqtt_port, uuid.uuid4().hex[:6]) as publishers:
                started = loadgen.closed_loop(publishers, load)
                if kind in systems.COUNTERS:
                    # It counts at thousands per second; give it that, and the stall allowance.
                    done = system.done_at(timeout_s=stall_s + load.total / 1000)
                    result.stored = load.total if done is not None else 0
                    result.seconds = (done or time.monotonic()) - started
                else:
                    rows, when = asyncio.run(
                        wait_for_rows(database_url, load.total, stall_s, table=load.table)
                    )
                    result.stored, result.seconds = rows, when - started
                result.notes += loadgen.finish(publishers)
                result.peak_rss_mib = system.peak_rss_mib()
                result.cpu_s = system.cpu_s() - cpu_before
        finally:
            system.stop()
    return result


class CommitClock:
    """Listens for the trigger's notifications and notes when each row was committed."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.committed: dict[tuple[int, int], float] = {}
        self._conn: asyncpg.Connection | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> CommitClock:
        self._conn = await asyncpg.connect(self.database_url)
        await self._conn.add_listener("bench_rows", self._on_row)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def seen(self, rows: int, timeout_s: float) -> None:
        """Wait until the notifications of `rows` committed rows have arrived (they follow the
        commit), or `timeout_s` passed; rows never notified count as lost."""
        deadline = time.monotonic() + timeout_s
        while len(self.committed) < rows:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                return

    def _on_row(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        now = time.monotonic()
        unit, epoch = payload.split()
        index = round((float(epoch) - loadgen.EPOCH.timestamp()) / 60)
        self.committed.setdefault((int(unit), index), now)
        self._arrived.set()


@dataclass
class Paced:
    """A system under a paced load: its database, its processes, the pacer and publishers."""

    database_url: str
    system: systems.System
    pacer: loadgen.Pacer
    publishers: Any


@contextlib.contextmanager
def paced(stack: Stack, kind: str, load: Load, rate_per_s: float, logdir: Path) -> Iterator[Paced]:
    """A fresh database with `kind` running on it and the load's publishers ready to go at
    `rate_per_s` (call `pacer.start()`); everything stopped afterwards."""
    with stack.environment(kind) as env:
        database_url = env["PIPELINE_DATABASE_URL"]
        asyncio.run(prepare(database_url, load))
        system = systems.start(
            kind, mqtt_port=stack.mqtt_port, expected=load.total, env=env, logdir=logdir
        )
        try:
            with loadgen.publishing(load, stack.mqtt_port, uuid.uuid4().hex[:6]) as publishers:
                pacer = loadgen.Pacer(publishers, load, rate_per_s)
                yield Paced(database_url, system, pacer, publishers)
        finally:
            system.stop()


def latency(
    stack: Stack, kind: str, load: Load, rate_per_s: float, logdir: Path, stall_s: float
) -> Result:
    """Open loop at `rate_per_s`: latency of each reading from its scheduled publish time to
    the commit of its row, in an HDR histogram."""
    result = Result(kind, "open", load.total)
    with paced(stack, kind, load, rate_per_s, logdir) as run:
        pacer = run.pacer

        async def measure() -> CommitClock:
            async with CommitClock(run.database_url) as clock:
                pacer.start()
                await asyncio.to_thread(pacer.join)
                rows, _ = await wait_for_rows(run.database_url, load.total, stall_s)
                await clock.seen(rows, timeout_s=5.0)
                return clock

        clock = asyncio.run(measure())
        result.notes += loadgen.finish(run.publishers)
        result.peak_rss_mib = run.system.peak_rss_mib()
    histogram = HdrHistogram(1, 600_000_000, 3)  # microseconds, up to 10 minutes
    for key, due in pacer.scheduled.items():
        committed = clock.committed.get(key)
        if committed is not None:
            histogram.record_value(max(int((committed - due) * 1e6), 1))
    result.stored = len(clock.committed)
    result.seconds = load.total / rate_per_s
    result.latency_ms = {
        f"p{p:g}": round(histogram.get_value_at_percentile(p) / 1000, 2) for p in (50, 90, 99)
    }
    result.latency_ms["max"] = round(histogram.get_max_value() / 1000, 2)
    if pacer.late_s > 0.005:
        result.notes.append(f"the pacer itself fell {pacer.late_s * 1000:.0f} ms behind")
    return result
