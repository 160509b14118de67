"""The two reference subscribers the pipeline is measured against, each run as its own process.

`raw`: an aiomqtt subscriber that only counts (the broker's ceiling for one Python client).
`naive`: what a straightforward implementation does: one INSERT per message, awaited in turn.

Both print `ready` once subscribed, and `done {monotonic time}` once `expected` messages were
received (raw) or inserted (naive); monotonic time is system-wide, so the driver compares it
with its own clock.

    python -m bench.subscribers raw|naive MQTT_PORT EXPECTED [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aiomqtt
import asyncpg

SUBSCRIPTIONS = [("zev/+/+/messwert", 1), ("bess/+/+/telemetry", 1)]

INSERT = """INSERT INTO zaehler_rohdaten
    (einheit_id, organization_id, timestamp, verbrauch, einspeisung)
    VALUES ($1, $2, $3::text::timestamptz, $4::text::numeric, $5::text::numeric)
    ON CONFLICT (einheit_id, timestamp) DO NOTHING"""


async def _subscribe(port: int, expected: int, database_url: str | None) -> None:
    conn = await asyncpg.connect(database_url) if database_url else None
    seen = 0
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"bench-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(SUBSCRIPTIONS)
        print("ready", flush=True)
        async for message in client.messages:
            if conn is not None:
                _, org, unit, _ = message.topic.value.split("/")
                body = json.loads(message.payload)
                await conn.execute(
                    INSERT,
                    int(unit),
                    uuid.UUID(org),
                    body["timestamp"],
                    str(body["verbrauch"]),
                    str(body["einspeisung"]),
                )
            seen += 1
            if seen == expected:
                print(f"done {time.monotonic()}", flush=True)


def main() -> None:
    kind, port, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    database_url = sys.argv[4] if kind == "naive" else None
    asyncio.run(_subscribe(port, expected, database_url))


if __name__ == "__main__":
    main()
