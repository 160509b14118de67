"""Fixtures: real servers on free loopback ports in temp dirs, started by the test run itself.

PostgreSQL (pgserver's binaries) runs once per session, each test getting a fresh database;
nats-server (JetStream) and the MQTT broker (mosquitto when installed, else nats-server's MQTT
listener) are started per test, so no state leaks between tests.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from pipeline.config import Settings
from pipeline.devstack import Mosquitto, NatsServer, Postgres, mosquitto_binary
from pipeline.migrations import migrate

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
) -> T:
    """Poll `probe` until `until(result)` holds; fail with the last result at the deadline."""
    deadline = time.monotonic() + timeout_s
    result = await probe()
    while not until(result):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s; last value: {result!r}")
        await asyncio.sleep(interval_s)
        result = await probe()
    return result


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("pg"), fsync=False).start()
    yield server
    server.stop()


@pytest.fixture
async def database(postgres_server: Postgres) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database on the session's PostgreSQL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = postgres_server.dsn_for(name)
    await migrate(dsn)
    yield dsn
    admin = await asyncpg.connect(postgres_server.dsn)  # anew: a fault test may restart the server
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()


@pytest.fixture
def settings(database: str, nats_server: NatsServer, mqtt_broker: Broker) -> Settings:
    """Worker settings against this test's servers: short grace, fast sweeps, no HTTP."""
    return Settings(
        mqtt_url=mqtt_broker.url,
        nats_url=nats_server.url,
        database_url=database,
        window_grace_seconds=1,
        http_port=0,
        api_port=0,
        sweep_interval_seconds=0.2,
        mqtt_client_id=f"bridge-{uuid.uuid4().hex[:8]}",
    )


def use_mosquitto() -> bool:
    """mosquitto when installed; MESSWERTE_TEST_BROKER=nats forces the NATS MQTT listener."""
    return os.environ.get("MESSWERTE_TEST_BROKER") != "nats" and mosquitto_binary() is not None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", mqtt=not use_mosquitto()).start()
    yield server
    server.stop()


class Broker:
    """The MQTT broker of a test: mosquitto if installed, else nats-server's MQTT listener."""

    def __init__(self, url: str, process: Any) -> None:
        self.url = url
        self.process = process
        #: Largest payload the broker passes on (nats-server's max_payload is 1 MiB).
        self.max_payload_bytes = (
            1024 * 1024 - 1024 if isinstance(process, NatsServer) else 256 * 1024 * 1024
        )

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@pytest.fixture
def mqtt_broker(tmp_path: Path, nats_server: NatsServer) -> Iterator[Broker]:
    if not use_mosquitto():
        yield Broker(nats_server.mqtt_url, nats_server)
        return
    server = Mosquitto(tmp_path / "mosquitto").start()
    yield Broker(server.url, server)
    server.stop()
