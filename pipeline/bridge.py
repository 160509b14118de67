"""MQTT side of `mqtt_bridge`: subscribe, hand each batch on, and PUBACK once it is stored.

The bridge keeps a persistent session (stable client id, no clean start, a session that never
expires) and subscribes with QoS 1 through `pipeline.mqtt_session`, which leaves every PUBACK
to us: it goes out only after the batch is stored, in the order received: published to
JetStream (`ingest.…`), or, in fused mode, carried through the stages in memory to PostgreSQL
(and rejects to `dlq.…`). Until then the broker keeps the message and resends it after a
crash. Unacknowledged messages fill the in-flight window the broker allows us, which is
how backpressure reaches the devices' broker.

MQTT 5 is tried first: its Receive Maximum lets us take many messages unacknowledged
(PIPELINE_MQTT_RECEIVE_MAXIMUM, 10,000; the session also stops reading at that many queued,
because mosquitto 2.0 overruns it), while a
3.1.1 client gets the broker's own limit (mosquitto: 20), which caps throughput at 20
messages per storage round trip and, with stock settings, makes the broker drop what queues up
behind it. Brokers without MQTT 5 (nats-server's MQTT listener) get 3.1.1.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from pipeline.claims import Fenced, Gate
from pipeline.codec import MSG_ID_HEADER, encode
from pipeline.config import Settings
from pipeline.health import MqttHealth
from pipeline.metrics import Metrics
from pipeline.mqtt_session import Message, MqttError, Refused, Session
from pipeline.publishing import JetStreamOut
from pipeline.retry import Abandoned, Backoff
from schemas.messages import IngestMessage
from stages.mqtt_bridge import ROUTES, SUBSCRIPTIONS, ingest_subject, route_of, to_ingest

log = structlog.get_logger("pipeline.bridge")

#: Batches a fused bridge has being stored at once.
STORING_AT_ONCE = 2

#: Where a received batch of one device kind goes; returns once it is stored. A kind without
#: a sink is published to its ingest subject.
Sink = Callable[[list[IngestMessage]], Awaitable[None]]


class MqttBridge:
    def __init__(
        self,
        settings: Settings,
        js: Any,
        metrics: Metrics,
        health: MqttHealth,
        stop: asyncio.Event,
        sinks: Mapping[str, Sink] | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._settings = settings
        #: The MQTT session's claim (and, fused, those of the chains it feeds): a standby
        #: connects only once it holds them, so the broker sees one session, not a tug of war.
        self._gate = gate
        self._metrics = metrics
        self.health = health
        self._stop = stop
        self._out = JetStreamOut(js, stop, streams=settings.streams, gate=gate)
        self._batch_size = settings.batch_size
        self._linger_s = settings.batch_linger_seconds
        self._max_payload_bytes = settings.max_payload_bytes
        self._sinks = dict(sinks or {})
        # Fused, two batches are stored at once: while PostgreSQL commits one, this process
        # validates the next (design §10 holds: each reading's order comes from the counter
        # at receipt, persist applies only what is newer, PUBACKs go in receive order, and
        # after a crash the broker sends every unacknowledged batch again, in order). Onto
        # INGEST, one at a time: its stream sequence is the order, and a retried publish of
        # one batch must not land behind the next.
        self._pipelined = {route.kind for route in ROUTES} <= set(self._sinks)
        self._mqtt5 = settings.mqtt_protocol != "3.1.1"
        # Without INGEST there is no stream sequence: order by a counter that starts at the
        # clock (microseconds), so a restarted bridge continues above where the last one was.
        self._seq = itertools.count(time.time_ns() // 1000)
        # Each message published to INGEST gets an id of its own, so that a publish retried
        # after a stream leader change (its first attempt stored after all) is not stored twice.
        self._instance = uuid.uuid4().hex[:12]
        self._published = itertools.count()

    async def run(self) -> None:
        backoff = Backoff(self._stop, first_s=0.2)
        while not self._stop.is_set():
            if not await self._take_over():
                break
            try:
                await self._session()
                backoff = Backoff(self._stop, first_s=0.2)
            except Abandoned:
                break
            except Fenced as exc:
                log.warning("MQTT session given up", reason=str(exc))
                continue
            except Refused as exc:
                if self._mqtt5 and exc.no_mqtt5 and self._settings.mqtt_protocol == "auto":
                    log.info("broker does not speak MQTT 5, using 3.1.1")
                    self._mqtt5 = False
                    continue
                self.health.last_error = str(exc)
                log.warning("MQTT connection refused, retrying", error=str(exc))
            except MqttError as exc:
                self.health.last_error = str(exc)
                log.warning("MQTT connection lost, reconnecting", error=str(exc))
            except Exception as exc:  # whatever breaks a session, the bridge must come back
                self.health.last_error = repr(exc)
                log.error("MQTT session failed, reconnecting", error=repr(exc))
            finally:
                self.health.connected = self.health.subscribed = False
                if self._gate is not None:
                    self._gate.acting = False
            if self._gate is not None and not self._gate.valid():
                continue  # lost while connected: stand by, no backoff
            if self._stop.is_set():
                break
            self.health.reconnects += 1
            try:
                await backoff.wait()
            except Abandoned:
                break

    async def _take_over(self) -> bool:
        """Wait, as a standby, until this replica holds the session; False if stopped first."""
        if self._gate is None:
            return True
        await self._gate.tried(self._stop)
        if not self._gate.valid():
            self.health.standby = True
            self.health.settled.set()
            log.info("MQTT bridge standing by", client_id=self._settings.mqtt_client_id)
            if not await self._gate.acquired(self._stop):
                return False
            log.info("MQTT bridge taking over", client_id=self._settings.mqtt_client_id)
        self.health.standby = False
        self._gate.acting = True
        return True

    async def _session(self) -> None:
        target, client_id = self._settings.mqtt, self._settings.mqtt_client_id
        session = await Session.connect(
            target,
            client_id,
            mqtt5_=self._mqtt5,
            receive_maximum=self._settings.mqtt_receive_maximum,
            keepalive_s=30,
        )
        paused_before = self.health.reading_paused
        try:
            self.health.connected = True
            self.health.connected_since = time.monotonic()
            self.health.protocol = "5" if self._mqtt5 else "3.1.1"
            if not session.session_present:
                log.info("MQTT session new at the broker", client_id=client_id)
            await session.subscribe(SUBSCRIPTIONS)
            self.health.subscribed = True
            self.health.settled.set()
            self.health.last_error = None
            log.info("MQTT subscribed", topics=list(SUBSCRIPTIONS), client_id=client_id)
            await self._receive(session)
            self.health.reading_paused = paused_before + session.pauses
        finally:
            await session.close()

    async def _receive(self, session: Session) -> None:
        """Take batches and store them, `depth` at a time, each acknowledged in turn."""
        depth = STORING_AT_ONCE if self._pipelined else 1
        inflight: collections.deque[asyncio.Task[None]] = collections.deque()
        ended = asyncio.ensure_future(self._ended())
        try:
            while not self._stop.is_set():
                ready = asyncio.ensure_future(session.ready())
                await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not ready.done():
                    ready.cancel()
                    break
                ready.result()  # raises if the connection ended
                batch = session.take(self._batch_size)
                if len(batch) < self._batch_size and self._linger_s:
                    # A small batch waits a moment for more: at a fleet's steady rate this
                    # makes a storage round trip per 30 readings instead of per 3, for a
                    # delay far below the interval's grace.
                    await asyncio.sleep(self._linger_s)
                    batch += session.take(self._batch_size - len(batch))
                by_kind = self._envelopes(batch)  # numbered now, in receive order
                previous = inflight[-1] if inflight else None
                inflight.append(
                    asyncio.ensure_future(self._store(session, batch, by_kind, previous))
                )
                while inflight and (len(inflight) >= depth or inflight[0].done()):
                    await inflight.popleft()  # a failure ends the session here
        finally:
            ended.cancel()
            # What is being stored finishes first (or fails: the worker stops, the claim was
            # lost), as a single batch always did before the session noticed anything.
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _ended(self) -> None:
        """Return when the worker stops or, with a gate, when the session's claim is lost."""
        if self._gate is None:
            await self._stop.wait()
            return
        stopped = asyncio.ensure_future(self._stop.wait())
        lost = asyncio.ensure_future(self._gate.lost(self._stop))
        try:
            await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            lost.cancel()

    def _envelopes(self, batch: list[Message]) -> dict[str, list[IngestMessage]]:
        """The batch's messages as envelopes, by device kind."""
        now = datetime.now(UTC)
        # Without INGEST (fused), the order within the batch comes from our own counter.
        fused = bool(self._sinks)
        by_kind: dict[str, list[IngestMessage]] = {}
        for message in batch:
            envelope = to_ingest(
                message.topic,
                message.payload,
                now,
                self._max_payload_bytes,
                next(self._seq) if fused else 0,
            )
            by_kind.setdefault(route_of(envelope.topic).kind, []).append(envelope)
        self._metrics.mqtt_received.inc(len(batch))
        self._metrics.mqtt_last_message.set(now.timestamp())
        self.health.message_received()
        return by_kind

    async def _store(
        self,
        session: Session,
        batch: list[Message],
        by_kind: dict[str, list[IngestMessage]],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Store a batch, then PUBACK it once the batch before it is acknowledged."""
        outbound = []
        stored: list[Awaitable[None]] = []
        for kind, envelopes in by_kind.items():
            sink = self._sinks.get(kind)
            if sink is not None:
                # A message the broker resends was never acknowledged, so nothing newer than it
                # was stored after it: unlike a JetStream redelivery it cannot be stale, and
                # needs no `redelivered` mark.
                stored.append(sink(envelopes))
                continue
            for envelope in envelopes:
                body, headers = encode(envelope)
                headers[MSG_ID_HEADER] = f"mqtt:{self._instance}:{next(self._published)}"
                outbound.append((ingest_subject(envelope.topic), body, headers))
        if outbound:
            stored.append(self._out.publish(outbound))
        await asyncio.gather(*stored)
        if previous is not None:
            await previous  # acknowledged in receive order; its failure is this one's too
        if self._gate is not None:
            self._gate.check()  # no PUBACK from a replica that lost the session's claim
        session.ack(batch)
        self._metrics.stage_out.labels("mqtt_bridge", "ingestmessage").inc(len(batch))
