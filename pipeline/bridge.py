"""MQTT side of `mqtt_bridge`: subscribe, hand each batch to JetStream, then PUBACK.

The bridge keeps a persistent session (stable client id, clean_session off) and subscribes
with QoS 1. aiomqtt acknowledges a message as soon as it arrives; we switch paho's manual ack
on under it so the PUBACK goes out only after JetStream has stored the message. Until then the
broker keeps the message, and resends it after a crash. Unacknowledged messages also fill the
broker's in-flight window, which is how backpressure reaches the devices' broker.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import structlog

from pipeline.codec import encode
from pipeline.config import Settings
from pipeline.health import MqttHealth
from pipeline.metrics import Metrics
from pipeline.retry import Abandoned, Backoff
from pipeline.runner import JetStreamOut
from stages.mqtt_bridge import SUBSCRIPTION, ingest_subject, to_ingest

log = structlog.get_logger("pipeline.bridge")


class MqttBridge:
    def __init__(
        self,
        settings: Settings,
        js: Any,
        metrics: Metrics,
        health: MqttHealth,
        stop: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self.health = health
        self._stop = stop
        self._out = JetStreamOut(js, stop)
        self._batch_size = settings.batch_size
        self._max_payload_bytes = settings.max_payload_bytes

    def _client(self) -> aiomqtt.Client:
        target = self._settings.mqtt
        client = aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
            identifier=self._settings.mqtt_client_id,
            clean_session=False,
            keepalive=30,
            tls_params=aiomqtt.TLSParameters() if target.tls else None,
            max_inflight_messages=1000,
        )
        # aiomqtt has no switch for this; paho's manual ack is what holds PUBACK until stored.
        client._client.manual_ack_set(True)
        return client

    async def run(self) -> None:
        backoff = Backoff(self._stop, first_s=0.2)
        while not self._stop.is_set():
            try:
                await self._session()
                backoff = Backoff(self._stop, first_s=0.2)
            except Abandoned:
                break
            except aiomqtt.MqttError as exc:
                self.health.last_error = str(exc)
                log.warning("MQTT connection lost, reconnecting", error=str(exc))
            except Exception as exc:  # whatever breaks a session, the bridge must come back
                self.health.last_error = repr(exc)
                log.error("MQTT session failed, reconnecting", error=repr(exc))
            finally:
                self.health.connected = self.health.subscribed = False
            if self._stop.is_set():
                break
            self.health.reconnects += 1
            try:
                await backoff.wait()
            except Abandoned:
                break

    async def _session(self) -> None:
        client = self._client()
        async with client:
            self.health.connected = True
            self.health.connected_since = time.monotonic()
            await client.subscribe(SUBSCRIPTION, qos=1)
            self.health.subscribed = True
            self.health.ever_subscribed.set()
            self.health.last_error = None
            log.info("MQTT subscribed", topic=SUBSCRIPTION, client_id=self._settings.mqtt_client_id)
            messages = client.messages
            stopper = asyncio.create_task(self._stop.wait())
            try:
                while not self._stop.is_set():
                    nxt = asyncio.ensure_future(anext(messages))
                    done, _ = await asyncio.wait(
                        {nxt, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if nxt not in done:
                        nxt.cancel()
                        break
                    batch = [nxt.result()]
                    while len(messages) and len(batch) < self._batch_size:
                        batch.append(await anext(messages))
                    await self._forward(client, batch)
            finally:
                stopper.cancel()

    async def _forward(self, client: aiomqtt.Client, batch: list[aiomqtt.Message]) -> None:
        now = datetime.now(UTC)
        outbound = []
        for message in batch:
            payload = (
                message.payload
                if isinstance(message.payload, bytes)
                else bytes(str(message.payload), "utf-8")
            )
            envelope = to_ingest(message.topic.value, payload, now, self._max_payload_bytes)
            body, headers = encode(envelope)
            outbound.append((ingest_subject(envelope.topic), body, headers))
        self._metrics.mqtt_received.inc(len(batch))
        self._metrics.mqtt_last_message.set(now.timestamp())
        self.health.message_received()
        await self._out.publish(outbound)
        for message in batch:
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)
        self._metrics.stage_out.labels("mqtt_bridge", "ingestmessage").inc(len(batch))
