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
from pipeline.devstack import NatsServer, Postgres, free_port
from tests.conftest import Broker, use_mosquitto
from tests.faults.bess import DEVICES as BESS_DEVICES
from tests.faults.bess import Gateways
from tests.faults.harness import (
    REPORT,
    UNITS,
    DataSet,
    Fault,
    Figures,
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
    nats: NatsServer
    broker: Broker
    dsn: str
    tmp: Path
    token: str
    data: DataSet | None = None
    api_port: int = field(default_factory=free_port)

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
        }

    def workers(self, mode: str) -> Workers:
        return Workers(mode, self.env(), self.tmp)

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
    ) -> Figures:
        self.data = data_set(seed, bess=bess)
        if self.data.http and gateways is None:  # its HTTP part is expected: someone posts it
            gateways = Gateways(self.api_port, self.token)
        return await scenario(
            name,
            self.workers(mode),
            self.broker.port,
            self.dsn,
            self.nats.url,
            self.data,
            faults,
            timeout_s=timeout_s,
            gateways=gateways,
        )

    async def nudge(self) -> None:
        """Publish the data set's next nudge: a reading that makes an interval be summed now."""
        assert self.data is not None, "nudge() belongs inside run()"
        topic, payload = self.data.nudge()
        async with aiomqtt.Client(
            "127.0.0.1", self.broker.port, identifier=f"nudge-{uuid.uuid4().hex[:8]}"
        ) as client:
            await client.publish(topic, payload, qos=1, timeout=5)


@pytest.fixture
async def stack(
    postgres_server: Postgres,
    nats_server: NatsServer,
    mqtt_broker: Broker,
    database: str,
    tmp_path: Path,
) -> Stack:
    db = await asyncpg.connect(database)
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", list(UNITS.items()))
    await db.executemany(
        "INSERT INTO bess_device VALUES ($1, $2, $3)",
        [(site, device, org) for (site, device), org in BESS_DEVICES.items()],
    )
    token = await tokens.create(db, UNITS[1], "faults")
    await db.close()
    return Stack(postgres_server, nats_server, mqtt_broker, database, tmp_path, token)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    write = terminalreporter.write_line
    write("")
    write(
        "| fault | messages sent | readings lost | intervals wrong (db / stream) "
        "| duplicates published | settled after |"
    )
    write("|---|---:|---:|---:|---:|---:|")
    for name, sent, f, seconds in REPORT:
        write(
            f"| {name} | {sent} | {f.readings_lost + f.readings_extra} "
            f"| {f.intervals_wrong_db} / {f.intervals_wrong_stream} "
            f"| {f.duplicates_published} | {seconds:.1f} s |"
        )
