"""Runs a chain of stages behind one durable JetStream pull consumer.

In split mode every chain is a single stage; in fused mode consecutive stages share one
process and one consumer, handing messages on in memory, with JetStream only at the edges. A
fused bridge in the same process feeds the chain directly (`run_items`) and acknowledges to
the MQTT broker when that returns; the consumer then only takes what a split bridge left.
Either way the same stage callables run and the same rules hold (design §10):

* a batch's input is acknowledged only after every output is stored (next subject or DB);
* a stage that fails with a transient error (database or NATS away, a timeout) is retried with
  exponential backoff and jitter, from the message where it failed, for as long as it takes,
  while the inputs are kept "in progress" so JetStream does not redeliver them meanwhile; the
  fetch loop waits, so the batch in flight is the bounded retry queue and backpressure reaches
  the stream;
* a stage that fails on one message with any other error (poison) sends that message, and only
  that one, to `dlq.stage_failed`; a batched stage is first retried message by message to find
  it; an input that cannot even be decoded goes to `dlq.undecodable`;
* an input JetStream has delivered several times already (its worker died with it in flight)
  is processed on its own after the rest of its batch, so a message that kills its worker
  cannot take its batch-mates with it; on its last allowed delivery (`max_deliver`) it goes to
  `dlq.max_deliveries` unprocessed instead of killing the worker once more;
* readings that came through a redelivery are marked, so `dedupe` does not let them, possibly
  older than what was stored meanwhile, decide what counts as a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import BaseModel

from pipeline.claims import Fenced, Gate
from pipeline.codec import TOPIC_HEADER, decode, encode
from pipeline.metrics import Metrics
from pipeline.publishing import JetStreamOut, Outbound, redeclare
from pipeline.retry import POISON_AFTER_FAILURES, Abandoned, Backoff, is_transient
from pipeline.topology import Stage, StreamPolicy
from schemas.messages import IngestMessage, Reject, RejectReason

log = structlog.get_logger("pipeline.runner")

LAG_SAMPLE_S = 5.0
#: A consumer with messages waiting whose fetches come back empty this long is bound again.
STALL_S = 15.0
#: Fetches failing in a row before the consumer is bound (and if need be created) again.
REBIND_AFTER_FAILURES = 3
#: From this delivery on, a message is processed alone, after its batch-mates.
SUSPECT_FROM_DELIVERY = 3

StageFn = Callable[[Any], Any]


@dataclass(frozen=True)
class Redelivery:
    """How JetStream redelivers what a worker took and never acknowledged."""

    ack_wait_s: float = 10.0
    max_deliver: int = 10

    def backoff_s(self) -> list[float]:
        """Growing waits between redeliveries of one message (JetStream's `backoff`)."""
        steps = [self.ack_wait_s * 2**i for i in range(4)]
        return [min(step, 120.0) for step in steps][: max(self.max_deliver - 1, 0)]


@dataclass(frozen=True)
class Step:
    spec: Stage
    fn: StageFn

    @property
    def batched(self) -> bool:
        return bool(getattr(self.fn, "batched", False))


class _Poison(Exception):
    """The stage failed on this input with an error a retry would not change."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


def observe(metrics: Metrics, step: Step, n_in: int, outputs: Sequence[Any]) -> None:
    """Per-stage and contract metrics for one stage call over `n_in` inputs."""
    name = step.spec.consumer
    metrics.stage_in.labels(name).inc(n_in)
    counts: dict[str, int] = {}
    for out in outputs:
        kind = type(out).__name__.lower()
        counts[kind] = counts.get(kind, 0) + 1
        if isinstance(out, Reject):
            count_reject(metrics, out.reason)
    for kind, count in counts.items():
        metrics.stage_out.labels(name, kind).inc(count)
    if step.spec.name == "validate":
        metrics.mqtt_processed.inc(counts.get("reading", 0) + counts.get("besssample", 0))
        for out in outputs:
            metrics.validated(out)
    if not step.batched and n_in > len(outputs):
        metrics.stage_out.labels(name, "dropped").inc(n_in - len(outputs))


def count_reject(metrics: Metrics, reason: RejectReason) -> None:
    metrics.mqtt_failed.inc()
    metrics.rejects.labels(str(reason)).inc()


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
        redelivery: Redelivery | None = None,
        streams: StreamPolicy | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._js = js
        self._gate = gate
        self.steps = list(steps)
        self.first = self.steps[0].spec
        self.name = "+".join(s.spec.consumer for s in self.steps)
        self._metrics = metrics
        self._stop = stop
        self._batch_size = batch_size
        self._redelivery = redelivery or Redelivery()
        self._out = JetStreamOut(js, stop, streams=streams, gate=gate)
        self.healthy = False
        self.last_error: str | None = None
        #: Since when fetches have come back empty (None while messages arrive).
        self._idle_since: float | None = None
        self._stalled = asyncio.Event()
        # Labelled series exist from start-up, so dashboards and alerts see zeros, not gaps.
        metrics.stage_batch_latency.labels(self.name)
        metrics.consumer_pending.labels(self.first.consumer)
        for step in self.steps:
            metrics.retry_queue_depth.labels(step.spec.consumer)
            metrics.stage_in.labels(step.spec.consumer)

    @property
    def claims(self) -> set[str]:
        """The claims this chain needs (its stages that run on one replica at a time)."""
        return {step.spec.consumer for step in self.steps if step.spec.one}

    @property
    def role(self) -> str:
        return "active" if self._gate is None else self._gate.role

    def consumer_config(self) -> ConsumerConfig:
        r = self._redelivery
        return ConsumerConfig(
            durable_name=self.first.consumer,
            filter_subject=self.first.reads,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=r.ack_wait_s,
            max_deliver=r.max_deliver,
            backoff=r.backoff_s() or None,
            max_ack_pending=max(10_000, self._batch_size * 4),
        )

    async def _subscribe(self) -> Any:
        assert self.first.stream is not None
        await self._js.add_consumer(self.first.stream, config=self.consumer_config())
        return await self._js.pull_subscribe_bind(
            durable=self.first.consumer, stream=self.first.stream
        )

    async def _bind(self) -> Any | None:
        """The pull subscription, once NATS lets us create it; None if stopped first."""
        backoff = Backoff(self._stop, cap_s=10.0)
        while not self._stop.is_set():
            try:
                return await self._subscribe()
            except Exception as exc:
                self.last_error = repr(exc)
                log.warning("consumer not ready, retrying", stage=self.name, error=repr(exc))
                if isinstance(exc, nats.js.errors.NotFoundError):
                    await redeclare(self._js, self._out.streams)  # its stream was lost
                try:
                    await backoff.wait()
                except Abandoned:
                    return None
        return None

    async def run(self) -> None:
        while not self._stop.is_set():
            if self._gate is not None:
                self.healthy = True  # a standby is healthy
                if not await self._gate.acquired(self._stop):
                    return
                log.info("stage active", stage=self.name)
                self._gate.acting = True
            try:
                await self._run_bound()
            finally:
                if self._gate is not None:
                    self._gate.acting = False

    async def _run_bound(self) -> None:
        """Consume until stopped, or until a claim this chain needs is lost."""
        caught_up = False
        while not self._stop.is_set() and self._active():
            sub = await self._bind()
            if sub is None:
                return
            if not caught_up and self._gate is not None:
                try:
                    await self._catch_up(sub)
                except (Abandoned, Fenced):
                    return
                caught_up = True
            self.healthy = True
            self._stalled.clear()
            self._idle_since = None
            log.info("stage running", stage=self.name, subject=self.first.reads)
            lag = asyncio.create_task(self._sample_lag(sub))
            try:
                await self._consume(sub)
            finally:
                lag.cancel()
                self.healthy = False
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if not self._active():
                log.warning("claim lost, standing by", stage=self.name)
            elif self._stalled.is_set() and not self._stop.is_set():
                log.warning("consumer stalled or gone, binding it again", stage=self.name)

    def _active(self) -> bool:
        return self._gate is None or self._gate.valid()

    async def _catch_up(self, sub: Any) -> None:
        """Taking over a stage that must see a unit's readings in order: first process what the
        previous holder had in flight, read from the stream by sequence.

        JetStream would redeliver those only after `ack_wait`, behind the newer messages this
        holder fetches meanwhile, and dedupe, seeing X, X again and only then the Y that was
        sent between them, would drop the second X as a repeat. They count as redelivered (so
        dedupe does not learn from them), and when JetStream redelivers them later, their
        outputs carry the same `Nats-Msg-Id` as now and are dropped as duplicates."""
        assert self._gate is not None
        assert self.first.stream is not None
        info = await sub.consumer_info()
        floor, last = info.ack_floor.stream_seq or 0, info.delivered.stream_seq or 0
        held = info.num_ack_pending or 0
        if not held or last <= floor:
            return
        if not await self._gate.first_replay(self.first.consumer, floor):
            return
        pending: list[Any] = []
        seq = floor + 1
        while seq <= last and len(pending) < held:
            try:  # the next message of this consumer's subjects (a work queue keeps no others)
                raw = await self._js.get_msg(
                    self.first.stream, seq=seq, subject=self.first.reads, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            if raw.seq is None or raw.seq > last:
                break
            pending.append(_Replayed(raw.subject or "", raw.data or b"", raw.headers, raw.seq))
            seq = raw.seq + 1
        log.info("replaying what the previous holder had in flight", stage=self.name,
                 messages=len(pending), after=floor, up_to=last)  # fmt: skip
        for start in range(0, len(pending), self._batch_size):
            await self.process(pending[start : start + self._batch_size])

    async def _consume(self, sub: Any) -> None:
        failures = Backoff(self._stop, first_s=0.2)
        while not self._stop.is_set() and not self._stalled.is_set() and self._active():
            try:
                msgs = await sub.fetch(batch=self._batch_size, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                if self._idle_since is None:
                    self._idle_since = time.monotonic()
                continue
            except Exception as exc:
                self.last_error = repr(exc)
                log.warning("fetch failed", stage=self.name, error=repr(exc))
                if failures.attempts + 1 >= REBIND_AFTER_FAILURES:
                    # The consumer may be gone (deleted, or lost with the server's state):
                    # binding again creates it anew.
                    self._stalled.set()
                    return
                try:
                    await failures.wait()
                except Abandoned:
                    return
                continue
            failures = Backoff(self._stop, first_s=0.2)
            self._idle_since = None
            started = time.perf_counter()
            try:
                await self.process(msgs)
            except Abandoned:
                log.info("stopping with a batch in flight; it will be redelivered", stage=self.name)
                return
            except Fenced:
                # Handed back unprocessed, so that the replica taking over gets it at once.
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.nak()
                return
            self._metrics.stage_batch_latency.labels(self.name).observe(
                time.perf_counter() - started
            )

    async def process(self, msgs: Sequence[Any]) -> None:
        """One fetched batch; inputs delivered several times already go alone, after the rest."""
        counted = [(msg, _deliveries(msg)) for msg in msgs]
        fresh = [(m, n) for m, n in counted if n < SUSPECT_FROM_DELIVERY]
        if fresh:
            await self._process(fresh)
        for msg, deliveries in counted:
            if deliveries >= SUSPECT_FROM_DELIVERY:
                log.warning(
                    "message delivered repeatedly, processing it on its own",
                    stage=self.name,
                    deliveries=deliveries,
                    subject=msg.subject,
                )
                await self._process([(msg, deliveries)])

    async def _process(self, counted: Sequence[tuple[Any, int]]) -> None:
        """Process messages, each with how often JetStream has delivered it."""
        msgs = [msg for msg, _ in counted]
        outbound: list[Outbound] = []
        items: list[Any] = []
        for msg, deliveries in counted:
            if deliveries >= self._redelivery.max_deliver:
                detail = f"delivered {deliveries} times without being acknowledged"
                outbound.append(self._raw_reject(msg, RejectReason.MAX_DELIVERIES, detail))
                continue
            try:
                item: BaseModel = decode(self.first.consumes, msg)
            except Exception as exc:
                outbound.append(self._raw_reject(msg, RejectReason.UNDECODABLE, str(exc)))
                continue
            if deliveries > 1 and "redelivered" in type(item).model_fields:
                item = item.model_copy(update={"redelivered": True})
            items.append(item)
        heartbeat = asyncio.create_task(self._keep_in_progress(msgs))
        try:
            await self.run_items(items, outbound)
        finally:
            heartbeat.cancel()
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as exc:  # NATS away: redelivery follows, every effect is idempotent
                log.warning("ack failed", stage=self.name, error=repr(exc))

    async def run_items(self, items: list[Any], outbound: list[Outbound] | None = None) -> None:
        """Run the chain over decoded inputs and return once every output is stored: handed on
        in memory to the next step, or published (with `outbound`, what was refused before)."""
        outbound = outbound if outbound is not None else []
        current = items
        for index, step in enumerate(self.steps):
            if self._gate is not None:
                self._gate.check()
            following = self.steps[index + 1].spec.consumes if index + 1 < len(self.steps) else None
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

    async def _call(self, step: Step, batch: list[Any]) -> list[Any]:
        """Run one stage over the batch; a poison input becomes a reject of that input only."""
        if not batch:
            return []
        if step.batched:
            try:
                return await self._retrying(step, batch, len(batch), alone=len(batch) == 1)
            except _Poison as poison:
                if len(batch) == 1:
                    return [_stage_reject(step.spec.consumer, batch[0], poison.cause)]
                log.warning(
                    "batch failed, retrying its messages one by one", stage=step.spec.consumer
                )
        outputs: list[Any] = []
        fn = step.fn
        for position, item in enumerate(batch):
            arg = [item] if step.batched else item
            # The common case, a call that succeeds, without the retry machinery around it:
            # per-message stages pass here for every reading.
            try:
                outputs.extend(await _resolve(fn(arg)))
                continue
            except Abandoned:
                raise
            except Exception as exc:
                failed: Exception = exc
            try:
                held = len(batch) - position
                outputs.extend(await self._retrying(step, arg, held, alone=True, failed=failed))
            except _Poison as poison:
                outputs.append(_stage_reject(step.spec.consumer, item, poison.cause))
        return outputs

    async def _retrying(
        self, step: Step, arg: Any, held: int, *, alone: bool, failed: Exception | None = None
    ) -> list[Any]:
        """Call the stage until it succeeds; wait out transient errors. Raise `_Poison` when a
        call over several messages fails otherwise (to look at them one by one), or a call over
        one message fails otherwise `POISON_AFTER_FAILURES` times in a row. `failed`: what
        the call already made raised, counted as the first attempt."""
        backoff = Backoff(self._stop)
        failures = 0  # consecutive non-transient ones
        depth = self._metrics.retry_queue_depth.labels(step.spec.consumer)
        try:
            while True:
                if self._gate is not None:
                    self._gate.check()  # not raised as a stage error: outside the try
                try:
                    if failed is not None:
                        error, failed = failed, None
                        raise error
                    result = list(await _resolve(step.fn(arg)))
                    if backoff.attempts:
                        log.info(
                            "stage recovered", stage=step.spec.consumer, retries=backoff.attempts
                        )
                        self.healthy = True
                    return result
                except Abandoned:
                    raise
                except Exception as exc:
                    if not is_transient(exc):
                        failures += 1
                        if failures >= POISON_AFTER_FAILURES or not alone:
                            raise _Poison(exc) from exc
                    else:
                        failures = 0
                    self.last_error = repr(exc)
                    self.healthy = False
                    depth.set(held)
                    log.warning("stage failed, retrying", stage=step.spec.consumer, error=repr(exc))
                    await backoff.wait()
        finally:
            depth.set(0)

    def _raw_reject(self, msg: Any, reason: RejectReason, detail: str) -> Outbound:
        """A received message the chain will not process, as it arrived, to `dlq.{reason}`."""
        headers = msg.headers or {}
        original = IngestMessage(
            topic=headers.get(TOPIC_HEADER, msg.subject),
            payload=msg.data,
            received_at=datetime.now(UTC),
            ingest_seq=_stream_seq(msg),
        )
        stage = self.first.consumer
        reject = Reject.of(original, reason, f"{stage}: {detail}", stage)
        log.warning("message sent to the DLQ", stage=stage, reason=str(reason))
        count_reject(self._metrics, reason)
        body, hdrs = encode(reject)
        return f"dlq.{reject.reason}", body, hdrs

    async def _keep_in_progress(self, msgs: Sequence[Any]) -> None:
        """Tell JetStream the batch is still being worked on, so it is not redelivered meanwhile."""
        while True:
            await asyncio.sleep(self._redelivery.ack_wait_s / 3)
            for msg in msgs:
                try:
                    await msg.in_progress()
                except Exception as exc:
                    log.debug("in-progress signal failed", error=repr(exc))

    async def _sample_lag(self, sub: Any) -> None:
        """Sample the lag; flag a stall when messages wait but none arrive for `STALL_S`."""
        while True:
            await asyncio.sleep(LAG_SAMPLE_S)
            try:
                info = await sub.consumer_info()
            except Exception as exc:
                log.debug("consumer info unavailable", stage=self.name, error=repr(exc))
                continue
            pending = info.num_pending or 0
            self._metrics.consumer_pending.labels(self.first.consumer).set(pending)
            idle = self._idle_since
            if pending and idle is not None and time.monotonic() - idle > STALL_S:
                self._stalled.set()


class _Replayed:
    """A message read from its stream by sequence, shaped like a delivered one (its second
    delivery); acknowledging it is JetStream's later redelivery's job."""

    def __init__(self, subject: str, data: bytes, headers: Any, seq: int) -> None:
        self.subject, self.data, self.headers = subject, data, headers
        self.metadata = SimpleNamespace(num_delivered=2, sequence=SimpleNamespace(stream=seq))

    async def ack(self) -> None:
        pass

    async def nak(self) -> None:
        pass

    async def in_progress(self) -> None:
        pass


async def _resolve(result: Any) -> Sequence[Any]:
    if inspect.isawaitable(result):
        result = await result
    return result  # type: ignore[no-any-return]


def _deliveries(msg: Any) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


def _stream_seq(msg: Any) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return 0


def _stage_reject(stage: str, item: Any, exc: BaseException) -> Reject:
    """A message a stage failed on, with what it was, for `dlq.stage_failed`."""
    if isinstance(item, IngestMessage):
        original = item
    else:
        payload = item.model_dump_json() if isinstance(item, BaseModel) else repr(item)
        original = IngestMessage(
            topic=getattr(item, "topic", stage),
            payload=payload.encode(),
            received_at=getattr(item, "received_at", None) or datetime.now(UTC),
            ingest_seq=getattr(item, "ingest_seq", 0),
        )
    log.error("stage failed on a message, sent to the DLQ", stage=stage, error=repr(exc))
    return Reject.of(original, RejectReason.STAGE_FAILED, f"{stage} failed: {exc!r}", stage)
