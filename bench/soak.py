"""Soak: the fused pipeline at a steady rate for minutes; resident memory and lag sampled.

Lag is readings published (by schedule) but not yet rows. Memory should level off once caches
have filled; the verdict compares the last samples with those taken after the warm-up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import load as loadgen
from bench import systems
from bench.harness import Stack, prepare, wait_for_rows
from bench.load import Load

SAMPLE_S = 10.0
WARM_UP_S = 60.0


@dataclass
class Soak:
    rate_per_s: float
    minutes: float
    samples: list[dict[str, float]] = field(default_factory=list)
    stored: int = 0
    messages: int = 0

    def summary(self) -> dict[str, Any]:
        after = [s for s in self.samples if s["t_s"] >= WARM_UP_S] or self.samples
        settled = after[: max(len(after) // 4, 1)]
        last = after[-max(len(after) // 4, 1) :]
        start_rss = max(s["rss_mib"] for s in settled)
        end_rss = max(s["rss_mib"] for s in last)
        return {
            "rate_msg_s": self.rate_per_s,
            "minutes": self.minutes,
            "messages": self.messages,
            "lost": self.messages - self.stored,
            "rss_after_warm_up_mib": round(start_rss, 1),
            "rss_at_end_mib": round(end_rss, 1),
            "rss_growth_mib": round(end_rss - start_rss, 1),
            "max_lag": max((s["lag"] for s in self.samples), default=0),
            "lag_at_end": self.samples[-1]["lag"] if self.samples else 0,
        }


def soak(stack: Stack, rate_per_s: float, minutes: float, logdir: Path) -> Soak:
    total = int(rate_per_s * minutes * 60)
    load: Load = loadgen.make_load(total, 20, seed=3)
    result = Soak(rate_per_s, minutes, messages=load.total)
    with stack.environment("fused") as env:
        database_url = env["PIPELINE_DATABASE_URL"]
        asyncio.run(prepare(database_url, load))
        system = systems.start(
            "fused", mqtt_port=stack.mqtt_port, expected=load.total, env=env, logdir=logdir
        )
        try:
            with loadgen.publishing(load, stack.mqtt_port, uuid.uuid4().hex[:6]) as publishers:
                pacer = loadgen.Pacer(publishers, load, rate_per_s)

                async def run() -> None:
                    conn = await asyncpg.connect(database_url)
                    try:
                        pacer.start()
                        started = time.monotonic()
                        while pacer.is_alive():
                            await asyncio.sleep(SAMPLE_S)
                            rows = int(await conn.fetchval("SELECT count(*) FROM zaehler_rohdaten"))
                            sample = {
                                "t_s": round(time.monotonic() - started, 1),
                                "rss_mib": round(system.rss_mib(), 1),
                                "lag": len(pacer.scheduled) - rows,
                            }
                            result.samples.append(sample)
                            print(f"soak {sample}", flush=True)
                    finally:
                        await conn.close()
                    result.stored, _ = await wait_for_rows(database_url, load.total, stall_s=30)

                asyncio.run(run())
                loadgen.finish(publishers)
        finally:
            system.stop()
    return result
