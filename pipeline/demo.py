"""`pipeline demo`: the whole pipeline on embedded servers, a simulated fleet and a live view.

Starts a private nats-server with JetStream (its MQTT listener is the broker unless
PIPELINE_MQTT_URL names one), an embedded PostgreSQL, migrates, registers demo units in two
organizations and three battery storage systems, creates an API token, runs every stage fused
in this process (the ingest API included), backfills two hours of meter readings and BESS
telemetry over MQTT and of a gateway's readings over HTTP, then sends live. Everything it
started is stopped on exit, also after Ctrl-C.

With `--cluster` the NATS side is three nodes with every stream on all three (the first node's
MQTT listener is the broker), and two fused workers run: one active, one standing by. The live
view shows which holds what; stop the active one's node or worker in a real deployment and the
other takes over within PIPELINE_FAILOVER_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nats as nats_client

from pipeline import tokens
from pipeline.app import Pipeline
from pipeline.bess_fleet import Battery, BessFleet, Gateway
from pipeline.config import Settings
from pipeline.devstack import NatsCluster, NatsServer, Postgres, free_port
from pipeline.fleet import Fleet, Unit
from pipeline.metrics import Metrics
from pipeline.migrations import migrate

ORGANIZATIONS = (
    uuid.UUID("550e8400-e29b-41d4-a716-446655440000"),
    uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
)
UNITS_PER_ORG = 20
#: Units behind the HTTP gateway (organization 2); they send no MQTT.
GATEWAY_UNITS = 5
BATTERIES = (
    ("alpstein", "bess1", ORGANIZATIONS[0]),
    ("alpstein", "bess2", ORGANIZATIONS[0]),
    ("seeland", "bess1", ORGANIZATIONS[1]),
)
DEMO_GRACE_S = 5.0
RATE_WINDOW_S = 10.0


def _counter(metrics: Metrics | _Sum, name: str, **labels: str) -> float:
    registry = metrics.registry if isinstance(metrics, Metrics) else metrics
    value = registry.get_sample_value(name, labels or None)
    return value or 0.0


class _Sum:
    """The metrics of several workers, read as one (`get_sample_value` summed)."""

    def __init__(self, workers: list[Pipeline]) -> None:
        self.registries = [w.metrics.registry for w in workers]

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return sum(r.get_sample_value(name, labels) or 0.0 for r in self.registries)


def roles(workers: list[Pipeline]) -> str:
    """Each worker's role: active (with what it holds), or standby."""
    parts = []
    for number, worker in enumerate(workers, start=1):
        claims = worker.claims
        held = sorted(n for n, lease in claims.leases.items() if lease.valid()) if claims else []
        parts.append(f"worker {number}: " + (f"active ({', '.join(held)})" if held else "standby"))
    return " | ".join(parts)


class LiveView:
    """Once a second: readings/s per stage, consumer lag, the latest published messwerte."""

    def __init__(self, workers: list[Pipeline], tty: bool) -> None:
        self._workers = workers
        self.metrics = _Sum(workers)
        self._tty = tty
        self.latest: deque[dict[str, Any]] = deque(maxlen=8)
        self.latest_bess: deque[dict[str, Any]] = deque(maxlen=6)
        self.published = 0
        self.published_bess = 0
        # (time, totals per stage) of recent renders: rates are over the last RATE_WINDOW_S.
        self._history: deque[tuple[float, dict[str, float]]] = deque()
        self._last_print = time.monotonic()

    def on_message(self, data: bytes) -> None:
        self.published += 1
        self.latest.appendleft(json.loads(data))

    def on_bess_interval(self, data: bytes) -> None:
        self.published_bess += 1
        self.latest_bess.appendleft(json.loads(data))

    def render(self, fleet_published: int, elapsed_s: float) -> None:
        if not self._tty and time.monotonic() - self._last_print < 10:
            return
        now = time.monotonic()
        self._last_print = now
        totals: dict[str, float] = {}
        stages = ("mqtt_bridge", "validate", "dedupe", "persist", "window_aggregate", "publish")
        rates = []
        for stage in stages:
            name = "pipeline_stage_messages_in_total"
            if stage in ("mqtt_bridge", "publish"):
                name = "pipeline_stage_messages_out_total"
                total = sum(
                    _counter(self.metrics, name, stage=stage, outcome=o)
                    for o in ("ingestmessage", "messwertmessage")
                )
            else:
                total = _counter(self.metrics, name, stage=stage)
            totals[stage] = total
        self._history.append((now, totals))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_S:
            self._history.popleft()
        since, before = self._history[0]
        span_s = max(now - since, 1e-3)
        for stage in stages:
            rate = (totals[stage] - before[stage]) / span_s if since < now else 0.0
            rates.append(f"{stage} {rate:>5.0f}/s")
        lag = _counter(self.metrics, "pipeline_consumer_pending_messages", stage="validate")
        failed = _counter(self.metrics, "zev_mqtt_messages_failed_total")
        if self._tty:
            lines = [
                f"messwerte pipeline demo — {elapsed_s:5.0f}s — readings sent {fleet_published}, "
                f"messwerte published {self.published}, rejected {failed:.0f}, lag {lag:.0f}",
                "  " + " | ".join(rates),
                *([f"  {roles(self._workers)}"] if len(self._workers) > 1 else []),
                "",
                "  latest messwerte: zeit, unit, verbrauch, einspeisung (kWh), readings, revision",
            ]
            for m in self.latest:
                lines.append(
                    f"    {m['zeit']}  {m['organizationId'][:8]}…/{m['einheitId']:<4} "
                    f"{m['verbrauch']:>9.4f} {m['einspeisung']:>9.4f} {m['anzahlRohwerte']:>4} "
                    f"r{m['revision']} {m['quelle']}"
                )
            lines += [
                "",
                f"  latest BESS intervals ({self.published_bess} published): end, device, "
                "charged, discharged (kWh), covered s, samples, SoC last, alarms, revision",
            ]
            for b in self.latest_bess:
                lines.append(
                    f"    {b['intervalEnd']}  {b['site'] + '/' + b['device']:<15} "
                    f"{b['energyChargedKwh']:>8.4f} {b['energyDischargedKwh']:>8.4f} "
                    f"{b['coveredSeconds']:>4} {b['samples']:>4} {b['socLast'] or 0:>6.1f}% "
                    f"{','.join(b['alarms']) or '-'} r{b['revision']}"
                )
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
        else:
            print(
                f"[{elapsed_s:4.0f}s] sent {fleet_published}, published {self.published}, "
                f"bess intervals {self.published_bess}, lag {lag:.0f}; "
                + ", ".join(rates)
                + (f"; {roles(self._workers)}" if len(self._workers) > 1 else ""),
                flush=True,
            )


@dataclass(frozen=True)
class Summary:
    readings: int
    messwerte: int
    bess_samples: int
    bess_intervals: int

    def line(self) -> str:
        return (
            f"demo: {self.readings} readings, {self.messwerte} messwerte published, "
            f"{self.bess_samples} bess samples, {self.bess_intervals} bess intervals published"
        )


def _api_port() -> int:
    """PIPELINE_API_PORT (8080 by default; 0 turns the API and the gateway off), or a free port
    when that one is taken: the demo must run next to whatever else this machine serves."""
    wanted = int(os.environ.get("PIPELINE_API_PORT", "8080"))
    if wanted == 0:
        return 0
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", wanted))
        except OSError:
            return free_port()
    return wanted


async def _run(duration_s: float | None, workdir: Path, cluster: bool = False) -> Summary:
    external_mqtt = os.environ.get("PIPELINE_MQTT_URL")
    nats: NatsServer | NatsCluster = (
        NatsCluster(workdir / "nats", mqtt=external_mqtt is None, sync_always=False)
        if cluster
        else NatsServer(workdir / "nats", mqtt=external_mqtt is None)
    )
    broker = nats.nodes[0] if isinstance(nats, NatsCluster) else nats
    postgres = Postgres(workdir / "postgres")
    try:
        nats.start()
        postgres.start()
        mqtt_url = external_mqtt or broker.mqtt_url
        await migrate(postgres.dsn)
        units = [
            Unit(org, index * 100 + n)
            for index, org in enumerate(ORGANIZATIONS, start=1)
            for n in range(1, UNITS_PER_ORG + 1)
        ]
        gateway_units = [Unit(ORGANIZATIONS[1], 900 + n) for n in range(1, GATEWAY_UNITS + 1)]
        batteries = [Battery(site, device, org) for site, device, org in BATTERIES]
        conn = await asyncpg.connect(postgres.dsn)
        await conn.executemany(
            "INSERT INTO einheit (id, organization_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(u.einheit_id, u.organization_id) for u in [*units, *gateway_units]],
        )
        await conn.executemany(
            "INSERT INTO bess_device VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            [(b.site, b.device, b.organization_id) for b in batteries],
        )
        token = await tokens.create(conn, ORGANIZATIONS[1], "demo-gateway")
        await conn.close()
        api_port = _api_port()
        settings = Settings(
            mqtt_url=mqtt_url,
            nats_url=nats.url,
            database_url=postgres.dsn,
            window_grace_seconds=DEMO_GRACE_S,
            http_port=int(os.environ.get("PIPELINE_HTTP_PORT", "8000")),
            mqtt_client_id="messwerte-demo-bridge",
            api_port=api_port,
            http_host="127.0.0.1",
            stream_replicas=3 if cluster else 1,
        )
        workers = [Pipeline(settings, mode="fused")]
        if cluster:  # a second worker: its own HTTP port, the ingest API on the first only
            second = settings.model_copy(update={"http_port": free_port(), "api_port": 0})
            workers.append(Pipeline(second, mode="fused"))
        view = LiveView(workers, sys.stdout.isatty())
        tasks = [asyncio.create_task(w.run()) for w in workers]
        for worker in workers:
            await asyncio.wait_for(worker.ready.wait(), 60)
        nc = await nats_client.connect(nats.url.split(","))

        async def on_messwert(msg: Any) -> None:
            view.on_message(msg.data)

        async def on_bess_interval(msg: Any) -> None:
            view.on_bess_interval(msg.data)

        await nc.subscribe("messwerte.>", cb=on_messwert)
        await nc.subscribe("intervals.bess.>", cb=on_bess_interval)
        fleet = Fleet(mqtt_url, units)
        bess = BessFleet(mqtt_url, batteries)
        api_url = f"http://127.0.0.1:{api_port}"
        gateway = Gateway(api_url, token, gateway_units) if api_port else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        started = time.monotonic()
        print(
            f"demo: {len(units)} units in 2 organizations over MQTT, {len(batteries)} batteries, "
            f"{len(gateway_units)} units behind an HTTP gateway"
            + (f" (ingest API on {api_url})" if gateway else " (ingest API off)")
            + "; backfilling the last two hours",
            flush=True,
        )
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        step, every = timedelta(minutes=1), timedelta(seconds=5)
        feeders = [
            asyncio.create_task(_feed(fleet, now, stop)),
            asyncio.create_task(bess.run(timedelta(hours=2), timedelta(seconds=30), every, stop)),
        ]
        if gateway is not None:
            feeders.append(asyncio.create_task(gateway.run(timedelta(hours=2), step, every, stop)))
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if duration_s is not None and elapsed >= duration_s:
                break
            view.render(fleet.published + bess.published, elapsed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        stop.set()
        await asyncio.gather(*feeders)
        await _settle(view.metrics, fleet.published + bess.published)
        for worker in workers:
            worker.stop.set()
        await asyncio.gather(*tasks)
        await nc.close()
        m = view.metrics
        return Summary(
            readings=int(_counter(m, "pipeline_stage_messages_in_total", stage="validate")),
            messwerte=int(_counter(m, "pipeline_messwerte_published_total")),
            bess_samples=int(
                _counter(m, "pipeline_stage_messages_in_total", stage="validate_bess")
            ),
            bess_intervals=int(_counter(m, "pipeline_bess_intervals_published_total")),
        )
    finally:
        nats.stop()
        postgres.stop()


async def _feed(fleet: Fleet, now: datetime, stop: asyncio.Event) -> None:
    await fleet.backfill(timedelta(hours=2), timedelta(minutes=1), now)
    await fleet.live(timedelta(seconds=5), stop)


async def _settle(metrics: _Sum, sent: int, timeout_s: float = 10.0) -> None:
    """Give the bridge a moment to take what the fleet sent, so the summary adds up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _counter(metrics, "zev_mqtt_messages_received_total") >= sent:
            return
        await asyncio.sleep(0.1)


def run_demo(duration_s: float | None, *, cluster: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="messwerte-demo-"))
    try:
        summary = asyncio.run(_run(duration_s, workdir, cluster))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(summary.line(), flush=True)
    return 0
