"""Runs a chain of stages behind one durable JetStream pull consumer.

In split mode every chain is a single stage; in fused mode consecutive stages share one
process and one consumer, handing messages on in memory, with JetStream only at the edges.
Either way the same stage callables run and the same rules hold (design §10):

* a batch's input is acknowledged only after every output is stored (next subject or DB);
* a stage that fails (database or NATS away) is retried with exponential backoff and jitter,
  from the message where it failed, while the inputs are kept "in progress" so JetStream does
  not redeliver them meanwhile; the fetch loop waits, so backpressure reaches the stream;
* an input that cannot even be decoded is poison: it goes to `dlq.undecodable` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pipeline.codec import TOPIC_HEADER, decode, encode
from pipeline.metrics import Metrics
from pipeline.topology import Stage
from schemas.messages import IngestMessage, Reject, RejectReason

log = structlog.get_logger("pipeline.runner")

ACK_WAIT_S = 30.0
MAX_BACKOFF_S = 30.0
LAG_SAMPLE_S = 5.0

StageFn = Callable[[Any], Any]


async def first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return when any of `events` is set, or after `timeout_s`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Abandoned(Exception):
    """The worker is stopping; the batch stays unacknowledged and will be redelivered."""


@dataclass(frozen=True)
class Step:
    spec: Stage
    fn: StageFn

    @property
    def batched(self) -> bool:
        return bool(getattr(self.fn, "batched", False))


class Backoff:
    """Exponential backoff with full jitter, capped; `wait` gives up when `stop` is set."""

    def __init__(
        self, stop: asyncio.Event, first_s: float = 0.1, cap_s: float = MAX_BACKOFF_S
    ) -> None:
        self._stop = stop
        self._first_s = first_s
        self._cap_s = cap_s
        self._next_s = first_s

    async def wait(self) -> None:
        delay = random.uniform(self._next_s / 2, self._next_s)
        self._next_s = min(self._next_s * 2, self._cap_s)
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
        except TimeoutError:
            return
        raise Abandoned


def observe(metrics: Metrics, step: Step, n_in: int, outputs: Sequence[Any]) -> None:
    """Per-stage and contract metrics for one stage call over `n_in` inputs."""
    name = step.spec.name
    metrics.stage_in.labels(name).inc(n_in)
    counts: dict[str, int] = {}
    for out in outputs:
        kind = type(out).__name__.lower()
        counts[kind] = counts.get(kind, 0) + 1
        if isinstance(out, Reject):
            metrics.mqtt_failed.inc()
            metrics.rejects.labels(str(out.reason)).inc()
    for kind, count in counts.items():
        metrics.stage_out.labels(name, kind).inc(count)
    if name == "validate":
        metrics.mqtt_processed.inc(counts.get("reading", 0))
    if not step.batched and n_in > len(outputs):
        metrics.stage_out.labels(name, "dropped").inc(n_in - len(outputs))


class JetStreamOut:
    """Publishes a batch of outputs and returns once JetStream has stored every one."""

    def __init__(self, js: Any, stop: asyncio.Event, timeout_s: float = 10.0) -> None:
        self._js = js
        self._stop = stop
        self._timeout_s = timeout_s

    async def publish(self, outbound: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
        if not outbound:
            return
        backoff = Backoff(self._stop)
        while True:
            try:
                futures = [
                    await self._js.publish_async(subject, body, headers=headers or None)
                    for subject, body, headers in outbound
                ]
                await asyncio.wait_for(asyncio.gather(*futures), timeout=self._timeout_s)
                return
            except Exception as exc:  # NATS away, stream full, timeout: all transient
                log.warning("publish failed, retrying", error=repr(exc), messages=len(outbound))
                await backoff.wait()


class ChainRunner:
    """A durable pull consumer on the first stage's subject feeding the chain `steps`."""

    def __init__(
        self,
        js: Any,
        steps: Sequence[Step],
        metrics: Metrics,
        stop: asyncio.Event,
        *,
        batch_size: int = 500,
    ) -> None:
        self._js = js
        self.steps = list(steps)
        self.first = self.steps[0].spec
        self.name = "+".join(s.spec.name for s in self.steps)
        self._metrics = metrics
        self._stop = stop
        self._batch_size = batch_size
        self._out = JetStreamOut(js, stop)
        self.healthy = False
        self.last_error: str | None = None
        # Labelled series exist from start-up, so dashboards and alerts see zeros, not gaps.
        metrics.stage_batch_latency.labels(self.name)
        metrics.consumer_pending.labels(self.first.name)
        for step in self.steps:
            metrics.retry_queue_depth.labels(step.spec.name)
            metrics.stage_in.labels(step.spec.name)

    async def _subscribe(self) -> Any:
        assert self.first.stream is not None
        config = ConsumerConfig(
            durable_name=self.first.name,
            filter_subject=self.first.reads,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=max(10_000, self._batch_size * 4),
        )
        await self._js.add_consumer(self.first.stream, config=config)
        return await self._js.pull_subscribe_bind(durable=self.first.name, stream=self.first.stream)

    async def run(self) -> None:
        backoff = Backoff(self._stop)
        while not self._stop.is_set():
            try:
                sub = await self._subscribe()
                break
            except Exception as exc:
                self.last_error = repr(exc)
                log.warning("consumer not ready, retrying", stage=self.name, error=repr(exc))
                try:
                    await backoff.wait()
                except Abandoned:
                    return
        else:
            return
        self.healthy = True
        log.info("stage running", stage=self.name, subject=self.first.reads)
        lag = asyncio.create_task(self._sample_lag(sub))
        try:
            await self._consume(sub)
        finally:
            lag.cancel()
            self.healthy = False
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _consume(self, sub: Any) -> None:
        while not self._stop.is_set():
            try:
                msgs = await sub.fetch(batch=self._batch_size, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                self.last_error = repr(exc)
                log.warning("fetch failed", stage=self.name, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            started = time.perf_counter()
            try:
                await self.process(msgs)
            except Abandoned:
                log.info("stopping with a batch in flight; it will be redelivered", stage=self.name)
                return
            self._metrics.stage_batch_latency.labels(self.name).observe(
                time.perf_counter() - started
            )

    async def process(self, msgs: Sequence[Any]) -> None:
        outbound: list[tuple[str, bytes, dict[str, str]]] = []
        current: list[Any] = []
        for msg in msgs:
            try:
                current.append(decode(self.first.consumes, msg))
            except Exception as exc:
                outbound.append(_poison(self.first, msg, exc))
                self._metrics.mqtt_failed.inc()
                self._metrics.rejects.labels(str(RejectReason.UNDECODABLE)).inc()
        heartbeat = asyncio.create_task(_keep_in_progress(msgs))
        try:
            for index, step in enumerate(self.steps):
                following = (
                    self.steps[index + 1].spec.consumes if index + 1 < len(self.steps) else None
                )
                outputs = await self._call(step, current)
                observe(self._metrics, step, len(current), outputs)
                current = []
                for out in outputs:
                    if following is not None and isinstance(out, following):
                        current.append(out)
                        continue
                    route = step.spec.writes.get(type(out))
                    if route is not None:
                        body, headers = encode(out)
                        outbound.append((route(out), body, headers))
            await self._out.publish(outbound)
        finally:
            heartbeat.cancel()
        for msg in msgs:
            await msg.ack()

    async def _call(self, step: Step, batch: list[Any]) -> list[Any]:
        """Run one stage over the batch, retrying from the failing point until it succeeds."""
        backoff = Backoff(self._stop)
        outputs: list[Any] = []
        position = 0
        while True:
            try:
                if step.batched:
                    return list(await _resolve(step.fn(batch))) if batch else []
                while position < len(batch):
                    outputs.extend(await _resolve(step.fn(batch[position])))
                    position += 1
                return outputs
            except Abandoned:
                raise
            except Exception as exc:
                self.last_error = repr(exc)
                self._metrics.retry_queue_depth.labels(step.spec.name).set(len(batch) - position)
                log.warning("stage failed, retrying", stage=step.spec.name, error=repr(exc))
                await backoff.wait()
            finally:
                self._metrics.retry_queue_depth.labels(step.spec.name).set(0)

    async def _sample_lag(self, sub: Any) -> None:
        while True:
            try:
                info = await sub.consumer_info()
                self._metrics.consumer_pending.labels(self.first.name).set(info.num_pending or 0)
            except Exception as exc:
                log.debug("consumer info unavailable", stage=self.name, error=repr(exc))
            await asyncio.sleep(LAG_SAMPLE_S)


async def _resolve(result: Any) -> Sequence[Any]:
    if inspect.isawaitable(result):
        result = await result
    return result  # type: ignore[no-any-return]


async def _keep_in_progress(msgs: Sequence[Any]) -> None:
    """Tell JetStream the batch is still being worked on, so it is not redelivered meanwhile."""
    while True:
        await asyncio.sleep(ACK_WAIT_S / 3)
        for msg in msgs:
            try:
                await msg.in_progress()
            except Exception as exc:
                log.debug("in-progress signal failed", error=repr(exc))


def _poison(stage: Stage, msg: Any, exc: Exception) -> tuple[str, bytes, dict[str, str]]:
    headers = msg.headers or {}
    try:
        seq = int(msg.metadata.sequence.stream)
    except Exception:
        seq = 0
    original = IngestMessage(
        topic=headers.get(TOPIC_HEADER, msg.subject),
        payload=msg.data,
        received_at=datetime.now(UTC),
        ingest_seq=seq,
    )
    reject = Reject.of(original, RejectReason.UNDECODABLE, f"{stage.name}: {exc}", stage.name)
    log.warning("undecodable message sent to the DLQ", stage=stage.name, error=str(exc))
    body, hdrs = encode(reject)
    return f"dlq.{reject.reason}", body, hdrs
