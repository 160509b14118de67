"""HTTP ingest on the same load, against a ceiling measured in the same run.

The ceiling is an endpoint that only publishes each request's body to JetStream and answers
202 once it is stored (`python -m bench.http ceiling PORT NATS_URL`): what any HTTP ingest
costs on this machine before it parses, validates or stores anything itself. The system is
`pipeline run --mode split --stage http_ingest`: tokens, the JSON rules, validate for every
item, one JetStream message per item and its reject, 202 after they are stored. Clients: 20
concurrent aiohttp sessions in the bench process, each posting batches of 100 meter readings,
closed loop; items/s from the first request to the last answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
from aiohttp import web
from hdrh.histogram import HdrHistogram

from bench.harness import Stack
from bench.load import EPOCH
from pipeline import tokens
from pipeline.devstack import free_port
from pipeline.migrations import migrate

CLIENTS = 20
BATCH = 100
UNITS = 20


@dataclass
class HttpResult:
    system: str
    items: int
    stored: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0


def batches(total: int, org: uuid.UUID) -> list[list[dict[str, Any]]]:
    items = [
        {
            "einheitId": 9_200_000 + i % UNITS,
            "timestamp": (EPOCH + timedelta(minutes=i // UNITS)).isoformat(),
            "verbrauch": round((i % 977) / 1000, 3),
            "einspeisung": 0.0,
        }
        for i in range(total)
    ]
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


async def _post_all(url: str, token: str, work: list[list[dict[str, Any]]]) -> HttpResult:
    result = HttpResult("", sum(len(b) for b in work))
    histogram = HdrHistogram(1, 60_000_000, 3)
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for batch in work:
        queue.put_nowait(batch)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            body = json.dumps(batch).encode()
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
            histogram.record_value(int((time.perf_counter() - started) * 1e6))
            result.statuses[resp.status] = result.statuses.get(resp.status, 0) + 1
            if resp.status == 202:
                result.stored += json.loads(answer).get("accepted", len(batch))

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        result.seconds = time.monotonic() - started
    result.latency_ms = {
        f"p{q}": round(histogram.get_value_at_percentile(q) / 1000, 2) for q in (50, 90, 99)
    }
    return result


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


async def _prepare(database_url: str, org: uuid.UUID) -> str:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO einheit VALUES ($1, $2)", [(9_200_000 + i, org) for i in range(UNITS)]
        )
        return await tokens.create(conn, org, "bench")
    finally:
        await conn.close()


def run(stack: Stack, total: int, logdir: Path) -> list[HttpResult]:
    """The ceiling, then the ingest API, each on a fresh NATS server (synced as configured)."""
    org = uuid.uuid4()
    work = batches(total, org)
    results = []
    for system in ("ceiling", "http_ingest"):
        with stack.environment("split") as env:
            port = free_port()
            log = (logdir / f"http-{system}.log").open("wb")
            if system == "ceiling":
                argv = [sys.executable, "-m", "bench.http", "ceiling", str(port),
                        env["PIPELINE_NATS_URL"]]  # fmt: skip
                token, health = "none", f"http://127.0.0.1:{port}/healthz"
            else:
                token = asyncio.run(_prepare(env["PIPELINE_DATABASE_URL"], org))
                http_port = free_port()
                env = {**env, "PIPELINE_API_PORT": str(port), "PIPELINE_HTTP_PORT": str(http_port),
                       "PIPELINE_HTTP_HOST": "127.0.0.1"}  # fmt: skip
                argv = [sys.executable, "-m", "pipeline", "run", "--mode", "split", "--stage",
                        "http_ingest"]  # fmt: skip
                health = f"http://127.0.0.1:{port}/healthz"
            proc = subprocess.Popen(
                argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                _wait_up(health, proc)
                url = f"http://127.0.0.1:{port}/api/zev/messwerte"
                result = asyncio.run(_post_all(url, token, work))
                result.system = system
                results.append(result)
            finally:
                proc.terminate()
                proc.wait(15)
    return results


def table(results: list[HttpResult]) -> str:
    ceiling = next((r.rate for r in results if r.system == "ceiling"), 0.0)
    labels = {
        "ceiling": "ceiling: an endpoint that only publishes the body to JetStream",
        "http_ingest": "ingest API (`pipeline run --stage http_ingest`)",
    }
    lines = [
        f"{results[0].items:,} meter readings, {CLIENTS} concurrent clients posting batches of "
        f"{BATCH}; JetStream as configured for the run.",
        "",
        "| system | items/s | × ceiling | stored | p50 ms | p90 ms | p99 ms (per request) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.rate / ceiling if ceiling else 0.0
        lat = r.latency_ms
        lines.append(
            f"| {labels[r.system]} | {r.rate:,.0f} | {ratio:.2f} | {r.stored:,} / {r.items:,} | "
            f"{lat.get('p50')} | {lat.get('p90')} | {lat.get('p99')} |"
        )
    return "\n".join(lines)


# --- the ceiling server ------------------------------------------------------------------------


async def _ceiling(port: int, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="CEILING", subjects=["ceiling.>"])

    async def ingest(request: web.Request) -> web.Response:
        body = await request.read()
        await js.publish("ceiling.items", body)
        # Counted, not parsed: the ceiling does nothing with the body but store it.
        return web.json_response({"accepted": body.count(b'"einheitId"')}, status=202)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "UP"})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/api/zev/messwerte", ingest)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1] == "ceiling":
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        asyncio.run(_ceiling(int(sys.argv[2]), sys.argv[3]))
