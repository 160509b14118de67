"""`python -m bench` (`make bench`): raw ceiling, naive baseline, fused and split pipeline on
the same load, closed loop for throughput and open loop for latency; or `--soak`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import outage, report
from bench.harness import Result, Stack, latency, throughput
from bench.load import make_load, publisher_argv
from bench.soak import soak
from bench.systems import COUNTERS, KINDS, available


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--messages", type=int, default=100_000, help="readings, closed loop")
    p.add_argument("--publishers", type=int, default=20, help="publisher processes (units)")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop rate, msg/s")
    p.add_argument("--latency-seconds", type=float, default=15.0, help="open-loop duration")
    p.add_argument("--only", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="JSON/PNG/table")
    p.add_argument("--stall-seconds", type=float, default=20.0, help="give up after no progress")
    p.add_argument(
        "--outage-seconds",
        type=float,
        default=outage.DOWN_S,
        help="PostgreSQL stopped this long under a paced load, for Node-RED and fused (0 = skip)",
    )
    p.add_argument(
        "--nats-sync",
        choices=("always", "default"),
        default="always",
        help="JetStream fsync on every write (as deployed) or nats-server's default interval",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the fused run's worker")
    p.add_argument("--soak", action="store_true", help="soak the fused pipeline instead")
    p.add_argument(
        "--bess",
        action="store_true",
        help="instead: BESS telemetry, raw ceiling and fused, closed loop (--messages samples)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="instead (or after --bess): the ingest API against a publish-only ceiling",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="instead: one nats-server against a 3-node cluster with R3 streams, fused and "
        "split, two workers of each on the cluster, and the failover time (bench.cluster)",
    )
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument(
        "--fleet",
        metavar="SIZES",
        help="instead: the fleet bench, e.g. 1000,10000,100000 units (bench.fleet)",
    )
    p.add_argument(
        "--fleet-readings",
        default="15,3",
        help="readings per unit and quarter hour, one fleet run per value",
    )
    p.add_argument(
        "--sustain-seconds",
        type=float,
        default=60.0,
        help="fleet: the largest size at its quarter-hour rate for this long (0 = skip)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        print(f"unknown system(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if missing := set(kinds) - set(available(kinds)):
        print(f"skipped, not installed: {', '.join(sorted(missing))}", file=sys.stderr)
        kinds = available(kinds)
    workdir = Path(tempfile.mkdtemp(prefix="messwerte-bench-"))
    stack = Stack(workdir, nats_sync_always=args.nats_sync == "always")
    completed = False
    try:
        if args.soak:
            code = _soak(stack, args, workdir)
        elif args.fleet:
            code = _fleet(stack, args, workdir)
        elif args.cluster:
            from bench import cluster

            code = cluster.run(stack, args, workdir)
        elif args.bess or args.http:
            code = _ingest(stack, args, workdir)
        else:
            code = _bench(stack, args, kinds, workdir)
        completed = code == 0  # a run that lost messages keeps its logs
        return code
    finally:
        stack.close()
        if completed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # the servers' and workers' logs tell what went wrong
            print(f"logs kept in {workdir}", file=sys.stderr)


def _bench(stack: Stack, args: argparse.Namespace, kinds: list[str], workdir: Path) -> int:
    started = time.monotonic()
    closed_load = make_load(args.messages, args.publishers)
    open_load = make_load(int(args.rate * args.latency_seconds), args.publishers, seed=2)
    results: list[Result] = []
    profile = args.out if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        print(f"{kind}: {closed_load.total:,} readings, closed loop ...", flush=True)
        r = throughput(
            stack,
            kind,
            closed_load,
            workdir,
            args.stall_seconds,
            profile if kind == "fused" else None,
        )
        print(f"  {r.rate:,.0f} msg/s, {r.lost} lost", flush=True)
        results.append(r)
    for kind in kinds:
        if kind in COUNTERS:
            continue  # it stores nothing: there is no commit to time
        print(f"{kind}: {open_load.total:,} readings at {args.rate:,.0f} msg/s ...", flush=True)
        r = latency(stack, kind, open_load, args.rate, workdir, args.stall_seconds)
        print(f"  p99 {r.latency_ms.get('p99')} ms, {r.lost} lost", flush=True)
        results.append(r)
    outages = []
    if args.outage_seconds > 0:
        down_load = make_load(int(args.rate * 3 * args.outage_seconds), args.publishers, seed=3)
        for kind in [k for k in kinds if k in outage.OUTAGE_KINDS]:
            print(f"{kind}: PostgreSQL down {args.outage_seconds:g} s ...", flush=True)
            r = outage.outage(
                stack, kind, down_load, args.rate, workdir, args.stall_seconds,
                args.outage_seconds,
            )  # fmt: skip
            print(f"  {r.stored:,} of {r.messages:,} stored", flush=True)
            outages.append(r)
            print(f"{kind}: SIGKILL and restart ...", flush=True)
            r = outage.restart(stack, kind, down_load, args.rate, workdir, args.stall_seconds)
            print(f"  {r.stored:,} of {r.messages:,} stored", flush=True)
            outages.append(r)
    setup: dict[str, Any] = {
        "messages": closed_load.total,
        "publishers": args.publishers,
        "publisher": publisher_argv(0, "t", "c")[1],
        "broker": stack.broker_name,
        "nats_sync": args.nats_sync,
        "rate": args.rate,
        "latency_messages": open_load.total,
        "machine": report.machine(),
        "duration_s": round(time.monotonic() - started, 1),
    }
    print()
    print(report.table(results, setup))
    if outages:
        setup["outage_s"] = args.outage_seconds
        print()
        print(report.outage_table(outages, args.outage_seconds))
    paths = report.write(results + outages, setup, args.out)
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    # Node-RED acknowledges on arrival: what it loses in an outage is the finding, not a fault.
    failed = [r for r in results + outages if r.lost and not (r in outages and r.kind == "nodered")]
    return 1 if failed else 0


def _ingest(stack: Stack, args: argparse.Namespace, workdir: Path) -> int:
    """BESS samples through MQTT (raw ceiling and fused) and/or the ingest API (ceiling and
    http_ingest), each against its ceiling measured in this run."""
    from bench import http
    from bench.load import make_bess_load

    out: dict[str, Any] = {"machine": report.machine(), "nats_sync": args.nats_sync}
    text = []
    lost = 0
    if args.bess:
        load = make_bess_load(args.messages, args.publishers)
        results = []
        for kind in ("raw", "fused"):
            print(f"{kind}: {load.total:,} BESS samples, closed loop ...", flush=True)
            profile = args.out if args.profile and kind == "fused" else None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
            r = throughput(stack, kind, load, workdir, args.stall_seconds, profile)
            print(f"  {r.rate:,.0f} samples/s, {r.lost} lost", flush=True)
            results.append(r)
            lost += r.lost
        raw = results[0].rate
        text += [
            f"{load.total:,} BESS samples from {args.publishers} publishers (QoS 1) through "
            f"{stack.broker_name}; JetStream sync: {args.nats_sync}.",
            "",
            "| system | samples/s | × raw ceiling | lost | CPU µs/sample | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            cpu_us = r.cpu_s / r.messages * 1e6 if r.messages else 0.0
            text.append(
                f"| {report.LABELS[r.kind]} | {r.rate:,.0f} | {r.rate / raw if raw else 0:.2f} "
                f"| {r.lost} | {cpu_us:,.0f} | {sum(r.peak_rss_mib.values()):,.0f} |"
            )
        out["bess"] = [asdict(r) for r in results]
        text.append("")
    if args.http:
        print(f"http: {args.messages:,} meter readings over HTTP ...", flush=True)
        results_http = http.run(stack, args.messages, workdir)
        lost += sum(h.items - h.stored for h in results_http)
        text.append(http.table(results_http))
        out["http"] = [asdict(h) for h in results_http]
    print()
    print("\n".join(text))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (args.out / f"ingest-{stamp}.json").write_text(json.dumps(out, indent=2))
    (args.out / f"ingest-{stamp}.md").write_text("\n".join(text) + "\n")
    print(f"\nwritten: {args.out}/ingest-{stamp}.json, .md")
    return 1 if lost else 0


def _fleet(stack: Stack, args: argparse.Namespace, workdir: Path) -> int:
    from bench import fleet, fleet_report

    started = time.monotonic()
    sizes = sorted(int(n) for n in args.fleet.split(","))
    per_units = [int(n) for n in args.fleet_readings.split(",")]
    results = []
    for per in per_units:
        expected: float | None = None
        for n in sizes:
            largest = n == sizes[-1] and per == per_units[0]
            print(f"fleet: {n:,} units × {per} readings ...", flush=True)
            r = fleet.run_size(
                stack,
                n,
                per,
                workdir,
                expected_rate=expected,
                sustain_s=args.sustain_seconds if largest else 0.0,
                plans=largest,
            )
            expected = r.load_rate or None
            print(
                f"  load {r.load_rate:,.0f}/s ({r.raw_rate:,.0f} raw), sweeps finding nothing "
                f"{r.load_sweep_ms:.1f} ms (load) / {r.idle_sweep_ms:.1f} ms (idle), burst max "
                f"{r.burst_max_s:.1f} s",
                flush=True,
            )
            results.append(r)
    setup = {
        "broker": stack.broker_name,
        "nats_sync": args.nats_sync,
        "machine": report.machine(),
        "duration_s": round(time.monotonic() - started, 1),
    }
    print()
    print(fleet_report.table(results, setup))
    paths = fleet_report.write(results, setup, args.out)
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    return 0 if all(r.sums_match and r.published == r.units for r in results) else 1


def _soak(stack: Stack, args: argparse.Namespace, workdir: Path) -> int:
    result = soak(stack, args.rate, args.soak_minutes, workdir)
    summary = result.summary()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"summary": summary, "samples": result.samples}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"written: {path}")
    return 1 if summary["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
