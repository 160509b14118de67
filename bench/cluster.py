"""`python -m bench --cluster`: the same closed-loop load on one nats-server and on a 3-node
JetStream cluster with R3 streams (design §14): fused (one worker; two on the cluster) and split
(one process per stage; two replicas of each on the cluster), each against the raw ceiling
measured in the same run; then the failover time: two fused workers on the cluster, the active
one killed (SIGKILL) once half the readings are stored, timed until rows received after the
kill are stored."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import load as loadgen
from bench import report, systems
from bench.harness import Result, Stack, prepare, throughput, wait_for_rows
from bench.load import Load

#: (system, on the cluster, workers of each): the runs, in order.
RUNS = (
    ("raw", False, 1),
    ("fused", False, 1),
    ("fused", True, 2),
    ("split", False, 1),
    ("split", True, 2),
)
TARGETS = {("fused", True): 0.5, ("split", True): 0.2}


@dataclass
class Failover:
    killed: str
    #: From the kill until the first row of a reading received after it is stored.
    resumed_after_s: float
    stored: int
    messages: int


def label(kind: str, cluster: bool, replicas: int) -> str:
    if kind == "raw":
        return "raw ceiling: a subscriber that only counts"
    where = "3-node cluster, R3 streams" if cluster else "one nats-server"
    workers = "" if replicas == 1 else f", {replicas} of each worker"
    return f"{kind} ({where}{workers})"


def failover(stack: Stack, load: Load, logdir: Path, stall_s: float) -> Failover:
    """Two fused workers on the cluster; SIGKILL the active one at half the load."""
    with stack.environment("fused", cluster=True) as env:
        url = env["PIPELINE_DATABASE_URL"]
        asyncio.run(prepare(url, load))
        system = systems.start(
            "fused", mqtt_port=stack.mqtt_port, expected=load.total, env=env, logdir=logdir,
            replicas=2,
        )  # fmt: skip
        try:
            with loadgen.publishing(load, stack.mqtt_port, uuid.uuid4().hex[:6]) as publishers:
                loadgen.closed_loop(publishers, load)
                asyncio.run(wait_for_rows(url, load.total // 2, stall_s, table=load.table))
                active = next(p for p in system.procs if p.roles().get("mqtt_bridge") == "active")
                killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
                active.popen.kill()
                resumed = asyncio.run(_first_row_after(url, killed_wall, stall_s + 30))
                rows, _ = asyncio.run(wait_for_rows(url, load.total, stall_s, table=load.table))
                loadgen.finish(publishers)
        finally:
            system.stop()
    return Failover(active.name, round(resumed - killed_at, 2), rows, load.total)


async def _first_row_after(url: str, at: datetime, timeout_s: float) -> float:
    """When a raw row received (by a bridge) after `at` is first seen (monotonic)."""
    conn = await asyncpg.connect(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM zaehler_rohdaten WHERE empfangen_am > $1)", at
            ):
                return time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise TimeoutError(f"no reading received after the kill was stored within {timeout_s}s")


def run(stack: Stack, args: Any, workdir: Path) -> int:
    load = loadgen.make_load(args.messages, args.publishers)
    results: list[tuple[str, bool, int, Result]] = []
    for kind, cluster, replicas in RUNS:
        name = label(kind, cluster, replicas)
        print(f"{name}: {load.total:,} readings, closed loop ...", flush=True)
        r = throughput(
            stack, kind, load, workdir, args.stall_seconds, cluster=cluster, replicas=replicas
        )
        print(f"  {r.rate:,.0f} msg/s, {r.lost} lost", flush=True)
        results.append((kind, cluster, replicas, r))
    print("failover: two fused workers on the cluster, the active one killed ...", flush=True)
    fail = failover(stack, load, workdir, args.stall_seconds)
    print(f"  resumed after {fail.resumed_after_s} s", flush=True)
    raw = results[0][3].rate
    single = {kind: r.rate for kind, cluster, _, r in results if not cluster}
    lines = [
        f"{load.total:,} readings from {args.publishers} publishers (QoS 1) through "
        f"{stack.broker_name}; JetStream sync: {args.nats_sync}.",
        "",
        "| system | msg/s | × raw ceiling | × one nats-server | target | lost | CPU µs/msg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, cluster, replicas, r in results:
        ratio = r.rate / raw if raw else 0.0
        versus = f"{r.rate / single[kind]:.2f}" if cluster and single.get(kind) else "–"
        target = TARGETS.get((kind, cluster))
        cpu_us = r.cpu_s / r.stored * 1e6 if r.stored else 0.0
        lines.append(
            f"| {label(kind, cluster, replicas)} | {r.rate:,.0f} | {ratio:.2f} | {versus} "
            f"| {f'≥ {target}' if target else '–'} | {r.lost} | {cpu_us:,.0f} |"
        )
    lines += [
        "",
        f"Failover: the active fused worker ({fail.killed}) killed at half the load; rows "
        f"received after the kill are stored {fail.resumed_after_s} s later; "
        f"{fail.messages - fail.stored} of {fail.messages:,} readings lost.",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = {
        "machine": report.machine(),
        "nats_sync": args.nats_sync,
        "runs": [{"kind": k, "cluster": c, "replicas": n, **asdict(r)} for k, c, n, r in results],
        "failover": asdict(fail),
    }
    (args.out / f"cluster-{stamp}.json").write_text(json.dumps(out, indent=2))
    (args.out / f"cluster-{stamp}.md").write_text(text + "\n")
    print(f"\nwritten: {args.out}/cluster-{stamp}.json, .md")
    lost = sum(r.lost for *_, r in results) + fail.messages - fail.stored
    return 1 if lost else 0
