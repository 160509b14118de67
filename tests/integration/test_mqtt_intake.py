"""The bridge's flow control against a real broker: it stops reading the socket while its queue
is full, so a backlog waits at the broker, and every message still arrives in order."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiomqtt

from pipeline.mqtt_intake import Intake
from tests.conftest import eventually
from tests.integration.support import publish, running

LIMIT = 100
COUNT = 3000


async def test_reading_pauses_at_the_limit_and_every_message_arrives(mqtt_broker) -> None:
    # The broker lets 1,000 (mosquitto here) or 1,024 (nats-server) go unacknowledged: far
    # more than the intake's limit, which must hold on its own.
    client = aiomqtt.Client(
        "127.0.0.1", mqtt_broker.port, identifier=f"intake-{uuid.uuid4().hex[:6]}"
    )
    client._client.manual_ack_set(True)
    async with client:
        await client.subscribe("t/#", qos=1)
        intake = Intake(client, LIMIT)
        intake.install()
        await publish(mqtt_broker.url, [("t/x", f"m{i}") for i in range(COUNT)])

        async def paused() -> bool:
            return not intake.reading

        await eventually(paused, bool)  # nothing taken yet: the queue is full, reading stopped
        assert LIMIT <= client._queue.qsize() < 2 * LIMIT
        seen: list[bytes] = []
        messages = client.messages
        deadline = time.monotonic() + 60
        while len(seen) < COUNT and time.monotonic() < deadline:
            intake.took()
            message = await asyncio.wait_for(anext(messages), 30)
            seen.append(bytes(message.payload))
            client._client.ack(message.mid, message.qos)
            assert client._queue.qsize() < 2 * LIMIT
    assert seen == [f"m{i}".encode() for i in range(COUNT)]
    assert intake.pauses > 1


async def test_a_small_receive_maximum_loses_no_reading(settings, db, mqtt_broker) -> None:
    """PIPELINE_MQTT_RECEIVE_MAXIMUM=20 (the intake pauses at 20 queued): a burst 150 times
    larger is stored in full."""
    org = uuid.uuid4()
    await db.execute("INSERT INTO einheit (id, organization_id) VALUES (77, $1)", org)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    burst = [
        (
            f"zev/{org}/77/messwert",
            f'{{"timestamp": "{(base + timedelta(minutes=i)).isoformat()}", '
            f'"verbrauch": {i % 97 / 100}, "einspeisung": 0}}',
        )
        for i in range(COUNT)
    ]
    small = settings.model_copy(update={"mqtt_receive_maximum": 20})
    async with running(small):
        await publish(mqtt_broker.url, burst)

        async def stored() -> int:
            return int(await db.fetchval("SELECT count(*) FROM zaehler_rohdaten"))

        await eventually(stored, lambda n: n == COUNT, timeout_s=60)
