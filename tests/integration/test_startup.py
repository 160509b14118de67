"""Start-up against services that are not there yet: the worker waits for them, then works."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from pipeline.app import Pipeline
from pipeline.devstack import Postgres
from pipeline.migrations import migrate
from tests.conftest import eventually
from tests.integration.support import body, publish, topic

ORG = uuid.uuid4()


async def _has(pipeline: Pipeline, component: str) -> bool:
    return component in pipeline.health.components


async def test_worker_started_before_postgresql_waits_and_then_processes(
    settings, mqtt_broker, tmp_path
) -> None:
    late_db = Postgres(tmp_path / "late-pg", fsync=False)  # port chosen, server not started yet
    pipeline = Pipeline(settings.model_copy(update={"database_url": late_db.dsn}))
    task = asyncio.create_task(pipeline.run())
    try:
        # Past NATS, the worker is now retrying PostgreSQL.
        await eventually(lambda: _has(pipeline, "nats"), bool)
        assert not pipeline.ready.is_set()
        assert not task.done()
        await asyncio.to_thread(late_db.start)
        await migrate(late_db.dsn)
        conn = await asyncpg.connect(late_db.dsn)
        await conn.execute("INSERT INTO einheit VALUES (1, $1)", ORG)
        await asyncio.wait_for(pipeline.ready.wait(), 30)
        at = datetime.now(UTC) - timedelta(hours=1)
        await publish(mqtt_broker.url, [(topic(ORG, 1), body(at, "1.5"))])
        await eventually(lambda: conn.fetchval("SELECT count(*) FROM messwerte"), lambda n: n == 1)
        await conn.close()
    finally:
        pipeline.stop.set()
        await asyncio.wait_for(task, 20)
        late_db.stop()


async def test_worker_stopped_while_waiting_for_services_exits_cleanly(settings, tmp_path) -> None:
    never = Postgres(tmp_path / "never-pg")
    pipeline = Pipeline(settings.model_copy(update={"database_url": never.dsn}))
    task = asyncio.create_task(pipeline.run())
    await eventually(lambda: _has(pipeline, "nats"), bool)
    pipeline.stop.set()
    await asyncio.wait_for(task, 15)
    assert task.exception() is None
