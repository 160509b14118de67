"""The reference subscribers the pipeline is measured against, each run as its own process.

`raw`: an aiomqtt subscriber that only counts (the ceiling of the MQTT client the bridge used
before, paho under aiomqtt; MQTT 3.1.1, acknowledged on arrival).
`session`: the bridge's MQTT client (`pipeline.mqtt_session`, MQTT 5) that only counts and
acknowledges each batch it takes: the new client's ceiling.
`bridge`: the bridge itself (`pipeline.bridge`) with sinks that store nothing: receive, envelope,
hand-off and PUBACK after it, the bridge's own ceiling.
`mosquitto_sub`: the C client of mosquitto (MQTT 5, QoS 1), the reference for any client.
`naive`: what a straightforward implementation does: one INSERT per message, awaited in turn.

Each prints `ready` once subscribed, and `done {monotonic time}` once `expected` messages were
received (or inserted: naive); monotonic time is system-wide, so the driver compares it with
its own clock. The bridge's client and the bridge run on uvloop, as a worker does.

    python -m bench.subscribers raw|session|bridge|mosquitto_sub|naive MQTT_PORT EXPECTED [DB_URL]
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid

import aiomqtt
import asyncpg
import uvloop

from pipeline.bridge import MqttBridge
from pipeline.config import MqttTarget, Settings
from pipeline.health import MqttHealth
from pipeline.logging import configure
from pipeline.metrics import Metrics
from pipeline.mqtt_session import Refused, Session
from schemas.messages import IngestMessage

SUBSCRIPTIONS = [("zev/+/+/messwert", 1), ("bess/+/+/telemetry", 1)]


def _client_id() -> str:
    """The run's client id (the driver forgets its session after the run), or a new one."""
    return os.environ.get("PIPELINE_MQTT_CLIENT_ID") or f"bench-{uuid.uuid4().hex[:8]}"


INSERT = """INSERT INTO zaehler_rohdaten
    (einheit_id, organization_id, timestamp, verbrauch, einspeisung)
    VALUES ($1, $2, $3::text::timestamptz, $4::text::numeric, $5::text::numeric)
    ON CONFLICT (einheit_id, timestamp) DO NOTHING"""


async def _subscribe(port: int, expected: int, database_url: str | None) -> None:
    conn = await asyncpg.connect(database_url) if database_url else None
    seen = 0
    async with aiomqtt.Client("127.0.0.1", port, identifier=_client_id()) as client:
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


async def _session(port: int, expected: int) -> None:
    target, client_id = MqttTarget(f"mqtt://127.0.0.1:{port}"), _client_id()
    try:
        session = await Session.connect(target, client_id)
    except Refused as refused:  # nats-server's MQTT listener: 3.1.1 only
        if not refused.no_mqtt5:
            raise
        session = await Session.connect(target, client_id, mqtt5_=False)
    await session.subscribe([topic for topic, _ in SUBSCRIPTIONS])
    print("ready", flush=True)
    seen = 0
    while True:  # until terminated: the driver reads the peak memory after `done`
        await session.ready()
        batch = session.take(500)
        session.ack(batch)
        seen += len(batch)
        if seen >= expected > seen - len(batch):
            print(f"done {time.monotonic()}", flush=True)


async def _bridge(port: int, expected: int) -> None:
    settings = Settings(mqtt_url=f"mqtt://127.0.0.1:{port}", mqtt_client_id=_client_id())
    stop = asyncio.Event()
    seen = 0

    async def sink(envelopes: list[IngestMessage]) -> None:
        nonlocal seen
        seen += len(envelopes)
        if seen >= expected > seen - len(envelopes):  # then on until terminated
            print(f"done {time.monotonic()}", flush=True)

    health = MqttHealth()
    bridge = MqttBridge(settings, None, Metrics(), health, stop, {"zev": sink, "bess": sink})
    running = asyncio.create_task(bridge.run())
    await health.settled.wait()
    print("ready", flush=True)
    await running


def _mosquitto_sub(port: int, expected: int) -> None:
    """mosquitto_sub prints each message's topic; we count lines. It cannot say when it is
    subscribed, so probes (QoS 0, on a topic the load never uses) go out until one comes back."""
    binary, pub = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
    if binary is None or pub is None:
        sys.exit("mosquitto_sub is not installed")
    probe = b"zev/probe/0/messwert"
    topics = [arg for topic, _ in SUBSCRIPTIONS for arg in ("-t", topic)]
    sub = subprocess.Popen(
        [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-V", "5", "-F", "%t", *topics],
        stdout=subprocess.PIPE,
    )
    assert sub.stdout is not None
    fd = sub.stdout.fileno()
    ready, seen, pending = False, 0, b""
    while seen < expected:
        if not ready:
            probe_argv = ["-h", "127.0.0.1", "-p", str(port), "-t", probe.decode(), "-m", "p"]
            subprocess.run([pub, *probe_argv], check=True)
        if not select.select([fd], [], [], None if ready else 0.2)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            sys.exit("mosquitto_sub exited")
        data = pending + chunk
        complete = data.rfind(b"\n") + 1
        lines, pending = data[:complete], data[complete:]
        probes = lines.count(probe)
        if probes and not ready:
            ready = True
            print(f"ready {sub.pid}", flush=True)  # its CPU counts as ours
        seen += lines.count(b"\n") - probes
    print(f"done {time.monotonic()}", flush=True)

    def stop(*_: object) -> None:
        sub.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)  # until terminated, and mosquitto_sub with us
    sub.wait()


def main() -> None:
    kind, port, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if kind == "session":
        uvloop.run(_session(port, expected))
    elif kind == "bridge":
        configure(level="warning")  # to stderr: stdout is for `ready` and `done`
        uvloop.run(_bridge(port, expected))
    elif kind == "mosquitto_sub":
        _mosquitto_sub(port, expected)
    else:
        database_url = sys.argv[4] if kind == "naive" else None
        asyncio.run(_subscribe(port, expected, database_url))


if __name__ == "__main__":
    main()
