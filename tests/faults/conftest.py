"""Fixtures of the fault suite: servers it may stop and restart, workers it may kill, and the
report of figures printed at the end of the run (the table in the README comes from it).

PostgreSQL is a cluster of the suite's own, so stopping it leaves the other tests' alone;
nats-server syncs every write, as the shipped configuration does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import asyncpg
import pytest

from pipeline import tokens
from pipeline.devstack import NatsCluster, NatsServer, Postgres, free_port
from tests.conftest import Broker, use_mosquitto
from tests.faults.bess import DEVICES as BESS_DEVICES
from tests.faults.bess import Gateways
from tests.faults.harness import (
    RATE_PER_S,
    REPORT,
    UNITS,
    DataSet,
    Fault,
    Figures,
    Nudge,
    Progress,
    Workers,
    data_set,
    scenario,
)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("fault-pg"), fsync=False).start()
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", mqtt=not use_mosquitto(), sync_always=True).start()
    yield server
    server.stop()


@dataclass
class Stack:
    """One fault test's world: servers, the worker environment and a database connection."""

    postgres: Postgres
    nats: NatsServer | NatsCluster
    broker: Broker
    dsn: str
    tmp: Path
    token: str
    data: DataSet | None = None
    api_port: int = field(default_factory=free_port)
    #: Settings of this stack beyond the usual (the cluster's stream replicas).
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Time without progress after each fault of the scenario running (Progress.resumed).
    stalls: list[float] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            "PIPELINE_MQTT_URL": self.broker.url,
            "PIPELINE_NATS_URL": self.nats.url,
            "PIPELINE_DATABASE_URL": self.dsn,
            "PIPELINE_WINDOW_GRACE_SECONDS": "1",
            "PIPELINE_SWEEP_INTERVAL_SECONDS": "0.2",
            "PIPELINE_HTTP_HOST": "127.0.0.1",
            "PIPELINE_MQTT_CLIENT_ID": f"bridge-{uuid.uuid4().hex[:8]}",
            "PIPELINE_LOG_FORMAT": "json",
            "PIPELINE_API_PORT": str(self.api_port),
            # A killed worker's claims expire within this; its restart or a standby waits so long.
            "PIPELINE_FAILOVER_SECONDS": "4",
            **self.extra_env,
        }

    def workers(self, mode: str, replicas: int = 1) -> Workers:
        return Workers(mode, self.env(), self.tmp, replicas)

    def progress(self) -> Progress:
        return Progress(self.dsn, self.nats.url, self.nudge)

    async def run(
        self,
        name: str,
        mode: str,
        faults: Callable[[Workers], Sequence[tuple[float, Fault]]],
        *,
        seed: int = 1,
        timeout_s: float = 90.0,
        bess: bool = False,
        gateways: Gateways | None = None,
        replicas: int = 1,
        xyx: bool = False,
        rate_per_s: float = RATE_PER_S,
    ) -> Figures:
        self.data = data_set(seed, bess=bess, xyx=xyx)
        self.stalls = []
        workers = self.workers(mode, replicas)
        if self.data.http and gateways is None:  # its HTTP part is expected: someone posts it
            gateways = Gateways(workers.api_ports or self.api_port, self.token)
        return await scenario(
            name,
            workers,
            self.broker.port,
            self.dsn,
            self.nats.url,
            self.data,
            faults,
            timeout_s=timeout_s,
            gateways=gateways,
            stalls=self.stalls,
            rate_per_s=rate_per_s,
        )

    async def nudge(self) -> Nudge:
        """Publish the data set's next nudge: a reading that makes an interval be summed now."""
        assert self.data is not None, "nudge() belongs inside run()"
        nudge = self.data.nudge()
        async with aiomqtt.Client(
            "127.0.0.1", self.broker.port, identifier=f"nudge-{uuid.uuid4().hex[:8]}"
        ) as client:
            await client.publish(nudge.topic, nudge.payload, qos=1, timeout=5)
        return nudge


async def seeded(database: str) -> str:
    """Register the data set's units and devices; return an API token for the gateways."""
    db = await asyncpg.connect(database)
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", list(UNITS.items()))
    await db.executemany(
        "INSERT INTO bess_device VALUES ($1, $2, $3)",
        [(site, device, org) for (site, device), org in BESS_DEVICES.items()],
    )
    token = await tokens.create(db, UNITS[1], "faults")
    await db.close()
    return token


@pytest.fixture
async def stack(
    postgres_server: Postgres,
    nats_server: NatsServer,
    mqtt_broker: Broker,
    database: str,
    tmp_path: Path,
) -> Stack:
    token = await seeded(database)
    return Stack(postgres_server, nats_server, mqtt_broker, database, tmp_path, token)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    write = terminalreporter.write_line
    write("")
    write(
        "| fault | messages sent | readings lost | intervals wrong (db / stream) "
        "| duplicates published | revision gaps / out of order | longest without progress "
        "| settled after |"
    )
    write("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, sent, f, seconds in REPORT:
        stalled = f"{f.stalled_s:.1f} s" if f.stalled_s else "–"
        write(
            f"| {name} | {sent} | {f.readings_lost + f.readings_extra} "
            f"| {f.intervals_wrong_db} / {f.intervals_wrong_stream} "
            f"| {f.duplicates_published} | {f.revision_gaps} / {f.revisions_out_of_order} "
            f"| {stalled} | {seconds:.1f} s |"
        )
