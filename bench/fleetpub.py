"""A publisher for many units at once (the fleet bench): one MQTT connection, QoS 1, a topic
per line.

    python -m bench.fleetpub MQTT_PORT CLIENT_ID FILE [RATE]

FILE holds `topic payload` lines. The process connects, prints `ready`, waits for a line on
stdin, publishes every line (at RATE messages/s when given, else as fast as the broker
acknowledges), prints `done {monotonic time}` once every message is acknowledged, and exits.
mosquitto_pub takes one topic per process, and a process per unit does not scale to 100,000
units, hence this one (paho, as `bench.publisher`).
"""

from __future__ import annotations

import sys
import time
from collections import deque

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

#: Messages in flight per connection: enough that the round trip does not bound the rate.
INFLIGHT = 1000
#: Messages handed to paho and not yet acknowledged, at most: its message ids wrap at 65,535,
#: and a new message whose id is still outstanding is refused (ERR_QUEUE_SIZE).
WINDOW = 20_000


def main() -> None:
    port, client_id, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    with open(path, "rb") as f:
        lines = [line.rstrip(b"\n").split(b" ", 1) for line in f if line.strip()]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    infos: deque[mqtt.MQTTMessageInfo] = deque()
    for i, (topic, payload) in enumerate(lines):
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if len(infos) >= WINDOW:
            infos.popleft().wait_for_publish(timeout=600)
        infos.append(client.publish(topic.decode(), payload, qos=1))
    for info in infos:
        info.wait_for_publish(timeout=600)
    print(f"done {time.monotonic()}", flush=True)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
