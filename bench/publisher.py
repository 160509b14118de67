"""The fallback publisher where mosquitto_pub is not installed: like `mosquitto_pub -l -q 1`,
one message per line of stdin to one topic, QoS 1, then disconnect once all are acknowledged.

    python -m bench.publisher MQTT_PORT TOPIC CLIENT_ID
"""

from __future__ import annotations

import sys

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, topic, client_id = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, line.rstrip(b"\n"), qos=1) for line in sys.stdin.buffer]
    for info in infos:
        info.wait_for_publish(timeout=60)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
