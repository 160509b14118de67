"""The bridge against mosquitto with its stock limits: 20 messages in flight per 3.1.1 client,
and what queues behind them dropped beyond 1000. Over MQTT 5 the bridge asks for up to
PIPELINE_MQTT_RECEIVE_MAXIMUM (10,000) in flight, so a burst that arrives while the database is blocked is held by
the bridge, unacknowledged, instead of being dropped by the broker."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

from pipeline.devstack import Mosquitto
from tests.conftest import eventually
from tests.faults.harness import table_locked
from tests.integration.support import running

BURST = 3000
ORG = uuid.UUID("7d0f1c3e-4b7a-4c1e-9a57-0c9f5a3b2d11")
UNIT = 4711


async def test_a_burst_while_the_database_is_blocked_outlasts_stock_broker_limits(
    tmp_path, settings, db
) -> None:
    broker = Mosquitto(tmp_path / "stock-mosquitto", stock_limits=True).start()
    try:
        await db.execute("INSERT INTO einheit (id, organization_id) VALUES ($1, $2)", UNIT, ORG)
        base = datetime(2026, 1, 1, tzinfo=UTC)
        lines = "\n".join(
            f'{{"timestamp": "{(base + timedelta(minutes=i)).isoformat()}", '
            f'"verbrauch": {i % 97 / 100}, "einspeisung": 0}}'
            for i in range(BURST)
        )
        stock = settings.model_copy(update={"mqtt_url": broker.url})
        async with running(stock):
            async with table_locked(settings.database_url, "zaehler_rohdaten"):
                published = await asyncio.to_thread(
                    subprocess.run,
                    ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-l",
                     "-t", f"zev/{ORG}/{UNIT}/messwert"],
                    input=lines.encode(),
                    capture_output=True,
                    timeout=60,
                )  # fmt: skip
                assert published.returncode == 0, published.stderr
                # The broker took the whole burst while nothing could be stored: what it could
                # not hand to the bridge it has queued, or dropped, by now.
                assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 0
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM zaehler_rohdaten"),
                lambda got: got == BURST,
                timeout_s=60,
            )
    finally:
        broker.stop()
