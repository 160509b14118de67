"""The fleet bench's results: a Markdown table (printed and pasted into the README), JSON, the
plans at the largest size, and a chart of burst time and throughput against fleet size."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.fleet import FleetResult


def table(results: Sequence[FleetResult], setup: dict[str, Any]) -> str:
    lines = [
        f"One fused worker; {setup['broker']}; JetStream sync: {setup['nats_sync']}; "
        f"{setup['machine']['cores']} cores. Readings of one quarter hour, then all of its "
        "intervals close together at end + grace.",
        "",
        "| units × readings | load readings/s | × raw ceiling | sweep ms, load / idle | "
        "burst p50 s | burst max s | burst max ÷ raw load time | aggregation rows/s | "
        "publishes/s | worker peak RSS MiB | DB MiB / 10⁶ readings | correct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = r.load_rate / r.raw_rate if r.raw_rate else 0.0
        # The burst against what the same machine needs for the raw load of this size.
        raw_s = r.readings / r.raw_rate if r.raw_rate else 0.0
        burst_ratio = r.burst_max_s / raw_s if raw_s else 0.0
        lines.append(
            f"| {r.units:,} × {r.per_unit} | {r.load_rate:,.0f} | {ratio:.2f} | "
            f"{r.load_sweep_ms:.1f} / {r.idle_sweep_ms:.1f} | {r.burst_p50_s:.1f} | "
            f"{r.burst_max_s:.1f} | {burst_ratio:.2f} | "
            f"{r.aggregation_rows_per_s:,.0f} | {r.publishes_per_s:,.0f} | "
            f"{r.peak_rss_mib.get('worker', 0):.0f} | {r.db_bytes_per_million / 2**20:,.0f} | "
            f"{'yes' if r.sums_match and r.published == r.units else 'NO'} |"
        )
    for r in results:
        for note in r.notes:
            lines.append(f"\n{r.units:,} × {r.per_unit}: {note}")
    largest = max(results, key=lambda r: r.readings, default=None)
    if largest is not None:
        rss = ", ".join(f"{k} {v:,.0f}" for k, v in largest.peak_rss_mib.items())
        lines += ["", f"Peak RSS at {largest.units:,} × {largest.per_unit} (MiB): {rss}."]
        if largest.plans:
            verdict = (
                "sequential scan of zaehler_rohdaten in: " + ", ".join(largest.seq_scans)
                if largest.seq_scans
                else "no sequential scan of zaehler_rohdaten in the due query or the aggregation"
            )
            lines.append(f"Plans at {largest.units:,} × {largest.per_unit}: {verdict}.")
        s = largest.sustained
        if s:
            lines.append(
                f"Sustained at {s['rate']:,.0f} readings/s ({largest.units:,} units × 15 per "
                f"quarter hour) for {s['seconds']:.0f} s: worker {s['worker_cores']:.2f} cores; "
                f"lag of stored behind sent readings {s['lag_first_half']:,.0f} (first half), "
                f"{s['lag_second_half']:,.0f} (second half), max {s['lag_max']:,.0f}; the burst "
                f"cost the worker {largest.burst_cpu_s:.1f} CPU s, so over a quarter hour it "
                f"averages {s['worker_cores'] + largest.burst_cpu_s / 900:.2f} cores."
            )
    return "\n".join(lines)


def chart(results: Sequence[FleetResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for per in sorted({r.per_unit for r in results}):
        rs = sorted((r for r in results if r.per_unit == per), key=lambda r: r.units)
        xs = [r.units for r in rs]
        left.plot(xs, [r.burst_max_s for r in rs], marker="o", label=f"{per} readings, max")
        left.plot(
            xs, [r.burst_p50_s for r in rs], marker=".", ls="--", label=f"{per} readings, p50"
        )
        right.plot(xs, [r.load_rate for r in rs], marker="o", label=f"pipeline, {per} readings")
        right.plot(xs, [r.raw_rate for r in rs], marker=".", ls="--", label=f"raw ceiling, {per}")
    left.set(
        xscale="log",
        xlabel="units",
        ylabel="s after end + grace",
        title="burst: last interval published",
    )
    right.set(xscale="log", xlabel="units", ylabel="readings/s", title="load throughput")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: Sequence[FleetResult], setup: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    text = table(results, setup)
    paths = [out / f"fleet-{stamp}.json", out / f"fleet-{stamp}.md"]
    paths[0].write_text(
        json.dumps({"setup": setup, "results": [asdict(r) for r in results]}, indent=2, default=str)
    )
    body = [text]
    for r in results:
        for name, plan in r.plans.items():
            body += [
                "",
                f"Plan of the {name} query at {r.units:,} × {r.per_unit}:",
                "",
                "```",
                plan,
                "```",
            ]
    paths[1].write_text("\n".join(body) + "\n")
    png = chart(results, out / f"fleet-{stamp}.png")
    if png is not None:
        paths.append(png)
    return paths
