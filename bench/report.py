"""The results as a Markdown table (printed, and pasted into the README), JSON and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Result

LABELS = {
    "raw": "raw ceiling: aiomqtt subscriber that only counts",
    "session": "new client's ceiling: the bridge's MQTT session that only counts and PUBACKs",
    "bridge": "bridge's ceiling: receive, envelope, hand-off to a sink that stores nothing, PUBACK",
    "mosquitto_sub": "reference: mosquitto_sub (C, MQTT 5, QoS 1), output counted",
    "naive": "naive baseline: one INSERT per message",
    "nodered": "Node-RED 4.1 flow: mqtt in, json, validate, join 500/50 ms, one upsert",
    "fused": "pipeline, fused (`pipeline run --mode fused`)",
    "split": "pipeline, split (one process per stage)",
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "os": platform.system(),
    }


def ceiling(results: Sequence[Result]) -> float:
    return next((r.rate for r in results if r.kind == "raw" and r.loop == "closed"), 0.0)


def table(results: Sequence[Result], setup: dict[str, Any]) -> str:
    raw = ceiling(results)
    latency = {r.kind: r for r in results if r.loop == "open"}
    lines = [
        f"{setup['messages']:,} readings from {setup['publishers']} {setup['publisher']} "
        f"publishers (QoS 1) through {setup['broker']}; JetStream sync: {setup['nats_sync']}; "
        f"latency at {setup['rate']:,.0f} msg/s offered, open loop, from scheduled publish to "
        "committed row.",
        "",
        "| system | msg/s | × raw ceiling | lost | p50 ms | p90 ms | p99 ms | max ms | "
        "CPU µs/msg | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.loop != "closed":
            continue
        lat = latency.get(r.kind)
        cells = [lat.latency_ms.get(k, "") if lat else "" for k in ("p50", "p90", "p99", "max")]
        lost = r.lost + (lat.lost if lat else 0)
        ratio = f"{r.rate / raw:.2f}" if raw else "–"
        cpu_us = r.cpu_s / r.stored * 1e6 if r.stored else 0
        rss = sum(r.peak_rss_mib.values())
        lines.append(
            f"| {LABELS[r.kind]} | {r.rate:,.0f} | {ratio} | {lost} | "
            + " | ".join(str(c) for c in cells)
            + f" | {cpu_us:,.0f} | {rss:,.0f} |"
        )
    m = setup["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}; broker, NATS, PostgreSQL and publishers on the same machine. "
        "Lost counts both runs of a system; RSS is summed over its processes.",
    ]
    return "\n".join(lines)


def outage_table(results: Sequence[Result], down_s: float) -> str:
    """What each system stored of a paced load with PostgreSQL stopped for `down_s`, or with
    its processes killed and restarted."""
    faults = {
        "outage": f"PostgreSQL stopped for {down_s:g} s",
        "restart": "SIGKILL and restart of its processes",
    }
    lines = [
        "A third of the way into a paced load:",
        "",
        "| system | fault | sent | stored | lost |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        if r.loop in faults:
            lines.append(
                f"| {LABELS[r.kind]} | {faults[r.loop]} | {r.messages:,} | {r.stored:,} "
                f"| {r.lost:,} |"
            )
    return "\n".join(lines)


def write(results: Sequence[Result], setup: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data = {
        "setup": setup,
        "raw_ceiling_msg_s": round(ceiling(results), 1),
        "results": [{**asdict(r), "rate_msg_s": round(r.rate, 1), "lost": r.lost} for r in results],
    }
    paths = {"json": out / f"bench-{stamp}.json", "table": out / f"bench-{stamp}.md"}
    paths["json"].write_text(json.dumps(data, indent=2, default=str))
    text = table(results, setup)
    if "outage_s" in setup:
        text += "\n\n" + outage_table(results, setup["outage_s"])
    paths["table"].write_text(text + "\n")
    png = chart(results, out / f"bench-{stamp}.png")
    if png is not None:
        paths["png"] = png
    return paths


def chart(results: Sequence[Result], path: Path) -> Path | None:
    """Throughput against the ceiling and latency percentiles, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    closed = [r for r in results if r.loop == "closed"]
    opened = [r for r in results if r.loop == "open"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([r.kind for r in closed], [r.rate for r in closed], color="#4c72b0")
    left.set_title("throughput, closed loop (msg/s)")
    for i, r in enumerate(closed):
        left.annotate(f"{r.rate:,.0f}", (i, r.rate), ha="center", va="bottom", fontsize=8)
    width = 0.2
    for j, p in enumerate(("p50", "p90", "p99", "max")):
        xs = [i + (j - 1.5) * width for i in range(len(opened))]
        right.bar(xs, [r.latency_ms.get(p, 0) for r in opened], width, label=p)
    right.set_xticks(range(len(opened)), [r.kind for r in opened])
    right.set_yscale("log")
    right.set_title("latency, open loop (ms, log scale)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
