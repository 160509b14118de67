"""The fleet bench (`python -m bench --fleet 1000,10000,100000`, `make bench-fleet`): how the cost
grows with the fleet, and the quarter-hour burst.

For each size N, N units each send `per_unit` readings of one quarter hour through MQTT into
one fused worker. Its grace (`PIPELINE_WINDOW_GRACE_SECONDS`) is set so that this interval
closes a while after the load is stored: the semantics are those of design §5, only the wall
clock is not waited for. Then all N intervals close together. Measured per size:

* readings/s of the load, against the raw ceiling (the same load into a subscriber that only
  counts) of the same run;
* the mean cost of the sweeps that found nothing due while the readings waited (from the
  worker's `zev_aggregation_duration_seconds`);
* the burst: from end + grace until each interval's message is on `MESSWERTE` (p50, max);
  rows/s of the aggregation (raw rows marked per second of aggregation time); publishes/s;
* peak RSS of every process, database bytes per million readings, and at the largest size
  the plans of the due query and the aggregation (flagging any sequential scan of
  `zaehler_rohdaten`);
* at the largest size, a sustained run at the rate of a quarter hour spread evenly
  (N × per_unit / 900 s): the worker's CPU and the lag of stored rows behind sent ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import nats
from prometheus_client.parser import text_string_to_metric_families

from bench import systems
from bench.harness import Stack, wait_for_rows
from pipeline.devstack import NatsServer
from pipeline.migrations import migrate
from pipeline.prune import quarter_floor
from stages.window_aggregate import AGGREGATE_SQL, DUE_SQL

QUARTER = timedelta(minutes=15)
ORGS = [uuid.UUID(int=random.Random(7).getrandbits(128), version=4) for _ in range(8)]
FIRST_UNIT = 10_000_000
#: Publisher processes: enough to keep the broker busy, few enough to leave the cores to it.
PUBLISHERS = 4
#: Seconds the worker is given to start before its interval may close.
STARTUP_S = 15.0


@dataclass
class FleetResult:
    units: int
    per_unit: int
    raw_rate: float = 0.0
    load_rate: float = 0.0
    load_s: float = 0.0
    #: Sweeps while the load streamed in, and after it, while its rows waited for the close:
    #: none found anything due. Their count and mean duration.
    load_sweeps: int = 0
    load_sweep_ms: float = 0.0
    idle_sweeps: int = 0
    idle_sweep_ms: float = 0.0
    waited_s: float = 0.0
    burst_p50_s: float = 0.0
    burst_max_s: float = 0.0
    published: int = 0
    stored: int = 0
    sums_match: bool = False
    aggregation_rows_per_s: float = 0.0
    publishes_per_s: float = 0.0
    burst_cpu_s: float = 0.0
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    db_bytes_per_million: float = 0.0
    table_bytes: dict[str, int] = field(default_factory=dict)
    plans: dict[str, str] = field(default_factory=dict)
    seq_scans: list[str] = field(default_factory=list)
    sustained: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def readings(self) -> int:
        return self.units * self.per_unit


def line(i: int, at: str, verbrauch_e4: int) -> bytes:
    """Unit i's reading at `at` of `verbrauch_e4` / 10,000 kWh, as a publisher line."""
    return (
        f"zev/{ORGS[i % len(ORGS)]}/{FIRST_UNIT + i}/messwert "
        f'{{"timestamp":"{at}","verbrauch":{verbrauch_e4 / 10_000},"einspeisung":0.0}}'
    ).encode()


def readings(units: int, per_unit: int, end: datetime, seed: int) -> tuple[list[bytes], Decimal]:
    """`topic payload` lines of the interval ending at `end`, reading by reading across the
    fleet (as a fleet sends them), and the sum of `verbrauch` they carry."""
    rnd = random.Random(seed)
    step = QUARTER / per_unit
    lines: list[bytes] = []
    total = Decimal(0)
    for k in range(per_unit):
        at = (end - QUARTER + step * (k + 1)).isoformat()
        for i in range(units):
            v = rnd.randrange(0, 5_000)
            total += Decimal(v).scaleb(-4)
            lines.append(line(i, at, v))
    return lines, total


@contextlib.contextmanager
def publishers(
    lines: Sequence[bytes], mqtt_port: int, workdir: Path, rate: float = 0.0
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """PUBLISHERS processes, connected and waiting; `go()` them to start."""
    procs = []
    tag = uuid.uuid4().hex[:6]
    count = max(min(PUBLISHERS, len(lines)), 1)
    for j in range(count):
        path = workdir / f"fleet-{tag}-{j}.txt"
        path.write_bytes(b"\n".join(lines[j::count]) + b"\n")
        argv = [
            sys.executable,
            "-m",
            "bench.fleetpub",
            str(mqtt_port),
            f"fleet-{tag}-{j}",
            str(path),
        ]
        if rate:
            argv.append(str(rate / count))
        procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        )
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"ready":
                raise RuntimeError("a fleet publisher did not connect")
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def go(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    started = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
    return started


def published_at(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> float:
    """When the last publisher had every message acknowledged (monotonic)."""
    last = 0.0
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline().decode().split()
        if not line or line[0] != "done":
            raise RuntimeError("a fleet publisher failed")
        last = max(last, float(line[1]))
        p.wait(timeout_s)
    return last


def raw_ceiling(stack: Stack, lines: Sequence[bytes], workdir: Path) -> float:
    """Readings/s of the same load into a subscriber that only counts."""
    with stack.environment("raw") as env:
        system = systems.start(
            "raw", mqtt_port=stack.mqtt_port, expected=len(lines), env=env, logdir=workdir
        )
        try:
            with publishers(lines, stack.mqtt_port, workdir) as procs:
                started = go(procs)
                done = system.done_at(timeout_s=60 + len(lines) / 4000)
                published_at(procs, 60)
        finally:
            system.stop()
    return len(lines) / (done - started) if done else 0.0


class Metrics:
    """The worker's aggregation counters, read from its /metrics."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def read(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (
                    "zev_aggregation_duration_seconds_sum",
                    "zev_aggregation_duration_seconds_count",
                    "zev_aggregation_records_processed_total",
                ):
                    out[sample.name] = sample.value
        return out


class Arrivals:
    """Wall-clock arrival of every `messwerte.>` message, from a core NATS subscription in a
    thread of its own (JetStream delivers a stored message to core subscribers too)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[str, float] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("could not subscribe to messwerte.>")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(self.url)

        async def on(msg: Any) -> None:
            msg_id = (msg.header or {}).get("Nats-Msg-Id", msg.subject)
            self.seen.setdefault(msg_id.rsplit(":", 1)[0], time.time())  # an interval, any revision

        await nc.subscribe("messwerte.>", cb=on, pending_msgs_limit=2_000_000)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()


async def _prepare(dsn: str, units: int) -> int:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "einheit",
            records=[(FIRST_UNIT + i, ORGS[i % len(ORGS)]) for i in range(units)],
            columns=["id", "organization_id"],
        )
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()


async def _count(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _sweeps(before: dict[str, float], after: dict[str, float]) -> tuple[int, float]:
    """Sweeps between two readings of the metrics: how many, and their mean in ms."""
    count = after["zev_aggregation_duration_seconds_count"]
    count -= before["zev_aggregation_duration_seconds_count"]
    total = after["zev_aggregation_duration_seconds_sum"]
    total -= before["zev_aggregation_duration_seconds_sum"]
    return int(count), total / count * 1000 if count else 0.0


def _plans(dsn: str, units: int, end: datetime, cutoff: datetime) -> dict[str, str]:
    async def explain() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            keys = [FIRST_UNIT + i for i in range(min(units, 500))]
            async with conn.transaction():
                due = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + DUE_SQL, cutoff, 500, [], [])
            agg = await conn.fetch("EXPLAIN " + AGGREGATE_SQL, keys, [end] * len(keys))
            return {
                "due": "\n".join(r[0] for r in due),
                "aggregate": "\n".join(r[0] for r in agg),
            }
        finally:
            await conn.close()

    return asyncio.run(explain())


def _sizes(dsn: str, base: int, rows: int) -> tuple[float, dict[str, int]]:
    async def sizes() -> tuple[int, dict[str, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CHECKPOINT")
            total = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
            tables = {
                t: int(await conn.fetchval("SELECT pg_total_relation_size($1)", t))
                for t in (
                    "zaehler_rohdaten",
                    "messwerte",
                    "messwerte_outbox",
                    "messwerte_interval_dirty",
                )
            }
            return total, tables
        finally:
            await conn.close()

    total, tables = asyncio.run(sizes())
    return (total - base) / rows * 1_000_000 if rows else 0.0, tables


def _pids_of_postgres(stack: Stack) -> list[int]:
    try:
        postmaster = int((stack.postgres.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(stat.parent.name))
    return pids


def _hwm_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_size(
    stack: Stack,
    units: int,
    per_unit: int,
    workdir: Path,
    *,
    expected_rate: float | None,
    sustain_s: float = 0.0,
    plans: bool = False,
) -> FleetResult:
    result = FleetResult(units, per_unit)
    now = datetime.now(UTC)
    end = quarter_floor(now)
    lines, total = readings(units, per_unit, end, seed=units + per_unit)
    result.raw_rate = raw_ceiling(stack, lines, workdir)
    # The interval closes a while after the load is expected to be stored: long enough that
    # it is not closed mid-load (noted if it is), short enough not to waste the run.
    rate = expected_rate or result.raw_rate * 0.3
    budget_s = STARTUP_S + len(lines) / rate * 1.3 + 10
    with stack.environment("fused") as env:
        dsn = env["PIPELINE_DATABASE_URL"]
        base = asyncio.run(_prepare(dsn, units))
        grace_s = (datetime.now(UTC) - end).total_seconds() + budget_s
        close_wall = end.timestamp() + grace_s
        env["PIPELINE_WINDOW_GRACE_SECONDS"] = f"{grace_s:.3f}"
        system = systems.start(
            "fused", mqtt_port=stack.mqtt_port, expected=len(lines), env=env, logdir=workdir
        )
        worker = system.procs[0]
        assert worker.http_port is not None
        metrics = Metrics(worker.http_port)
        try:
            with Arrivals(env["PIPELINE_NATS_URL"]) as arrivals:
                with publishers(lines, stack.mqtt_port, workdir) as procs:
                    m0 = metrics.read()
                    started = go(procs)
                    poll_s = 0.1 if len(lines) < 100_000 else 0.5  # a count of millions costs
                    rows, stored_at = asyncio.run(wait_for_rows(dsn, len(lines), 30.0, poll_s))
                    loaded = metrics.read()
                    published_at(procs, 60)
                result.load_s = stored_at - started
                result.load_rate = rows / result.load_s
                if rows < len(lines):
                    result.notes.append(f"{len(lines) - rows} readings not stored")
                result.waited_s = close_wall - time.time()
                if result.waited_s < 0:
                    result.notes.append(f"the load overran the close by {-result.waited_s:.1f} s")
                if plans:
                    result.plans = _plans(
                        dsn, units, end, datetime.fromtimestamp(time.time() - grace_s, UTC)
                    )
                    result.seq_scans = [
                        name
                        for name, plan in result.plans.items()
                        if "Seq Scan on zaehler_rohdaten" in plan
                    ]
                time.sleep(max(close_wall - time.time() - 0.2, 0))
                m1 = metrics.read()
                cpu_before = worker.cpu_s()
                pg = _pids_of_postgres(stack)
                deadline = close_wall + 300
                last, last_change = 0, time.time()
                while len(arrivals.seen) < units and time.time() < deadline:
                    if len(arrivals.seen) != last:
                        last, last_change = len(arrivals.seen), time.time()
                    elif time.time() - last_change > 60:
                        break
                    time.sleep(0.05)
                m2 = metrics.read()
                result.burst_cpu_s = worker.cpu_s() - cpu_before
                times = sorted(arrivals.seen.values())
            result.published = len(times)
            if times:
                delays = [t - close_wall for t in times]
                result.burst_p50_s = delays[len(delays) // 2]
                result.burst_max_s = delays[-1]
                if times[-1] > times[0]:
                    result.publishes_per_s = len(times) / (times[-1] - times[0])
            result.load_sweeps, result.load_sweep_ms = _sweeps(m0, loaded)
            result.idle_sweeps, result.idle_sweep_ms = _sweeps(loaded, m1)
            busy = (
                m2["zev_aggregation_duration_seconds_sum"]
                - m1["zev_aggregation_duration_seconds_sum"]
            )
            marked = (
                m2["zev_aggregation_records_processed_total"]
                - m1["zev_aggregation_records_processed_total"]
            )
            result.aggregation_rows_per_s = marked / busy if busy else 0.0
            result.stored = int(asyncio.run(_count(dsn, "SELECT count(*) FROM messwerte")))
            summed = asyncio.run(_count(dsn, "SELECT coalesce(sum(verbrauch), 0) FROM messwerte"))
            result.sums_match = result.stored == units and summed == total
            if not result.sums_match:
                result.notes.append(
                    f"messwerte: {result.stored} rows, sum {summed} (expected {units}, {total})"
                )
            result.db_bytes_per_million, result.table_bytes = _sizes(dsn, base, rows)
            if sustain_s:
                result.sustained = sustain(stack, worker, dsn, units, end, sustain_s, rows, workdir)
            result.peak_rss_mib = {
                "worker": round(worker.peak_rss_mib(), 1),
                "postgres (largest process)": round(max((_hwm_mib(p) for p in pg), default=0.0), 1),
                "nats-server": round(
                    _hwm_mib(stack.nats.proc.pid)
                    if isinstance(stack.nats, NatsServer) and stack.nats.proc
                    else 0.0,
                    1,
                ),
                stack.broker_name: round(_hwm_mib(stack.broker.proc.pid), 1),
            }
        finally:
            system.stop()
    return result


def sustain(
    stack: Stack,
    worker: systems.Proc,
    dsn: str,
    units: int,
    end: datetime,
    seconds: float,
    stored_before: int,
    workdir: Path,
) -> dict[str, float]:
    """The fleet's quarter-hour rate (units × 15 / 900 s) for `seconds`: the worker's CPU in
    cores and how far stored rows lag behind sent ones, sampled every second."""
    rate = units * 15 / 900
    count = int(rate * seconds)
    rnd = random.Random(3)
    lines = []
    for j in range(count):  # the next interval, one reading per unit and step
        i, k = j % units, j // units
        at = (end + timedelta(seconds=10 * (k + 1))).isoformat()
        lines.append(line(i, at, rnd.randrange(0, 5_000)))
    lags: list[float] = []

    async def watch(started: float) -> float:
        conn = await asyncpg.connect(dsn)
        try:
            while True:
                elapsed = time.monotonic() - started
                stored = (
                    int(await conn.fetchval("SELECT count(*) FROM zaehler_rohdaten"))
                    - stored_before
                )
                if stored >= count:
                    return time.monotonic()
                lags.append(min(rate * elapsed, count) - stored)
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    with publishers(lines, stack.mqtt_port, workdir, rate=rate) as procs:
        cpu0 = worker.cpu_s()
        started = go(procs)
        done = asyncio.run(watch(started))
        cpu1 = worker.cpu_s()
        published_at(procs, 60)
    half = len(lags) // 2
    return {
        "rate": rate,
        "readings": count,
        "seconds": done - started,
        "worker_cores": (cpu1 - cpu0) / (done - started),
        "lag_first_half": sum(lags[:half]) / max(half, 1),
        "lag_second_half": sum(lags[half:]) / max(len(lags) - half, 1),
        "lag_max": max(lags, default=0.0),
    }
