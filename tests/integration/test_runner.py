"""The stage runner's delivery rules against a real nats-server, with stand-in stage functions:
transient errors wait, poison goes to the DLQ alone, redeliveries are marked, and a message
delivered `max_deliver` times goes to the DLQ unprocessed."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import nats
import pytest

from pipeline.broker import declare_streams
from pipeline.codec import encode
from pipeline.metrics import Metrics
from pipeline.runner import ChainRunner, Redelivery, Step
from pipeline.topology import BY_NAME
from schemas.messages import Reading
from tests.conftest import eventually
from tests.integration.support import stream_messages

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
UNITS = range(10, 20)
POISON_UNIT = 13


def reading(unit: int) -> Reading:
    return Reading(
        organization_id=ORG,
        einheit_id=unit,
        timestamp=datetime(2025, 6, 1, 10, unit, tzinfo=UTC),
        verbrauch=Decimal(1),
        einspeisung=Decimal(0),
        received_at=datetime.now(UTC),
        ingest_seq=unit,
    )


@pytest.fixture
async def js(nats_server) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await declare_streams(js)
    for unit in UNITS:
        body, headers = encode(reading(unit))
        await js.publish(f"valid.{ORG}.{unit}", body, headers=headers)
    yield js
    await nc.close()


@contextlib.asynccontextmanager
async def dedupe_runner(
    js: Any, fn: Callable[[Any], Any], redelivery: Redelivery | None = None
) -> AsyncIterator[ChainRunner]:
    """`fn` in the place of stage dedupe (reads valid.>, writes unique.> and dlq.>)."""
    stop = asyncio.Event()
    runner = ChainRunner(js, [Step(BY_NAME["dedupe"], fn)], Metrics(), stop, redelivery=redelivery)
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_message_the_stage_keeps_failing_on_goes_to_the_dlq_and_its_batch_mates_pass(
    js, nats_server
) -> None:
    calls: Counter[int] = Counter()

    def fn(r: Reading) -> list[Reading]:
        calls[r.einheit_id] += 1
        if r.einheit_id == POISON_UNIT:
            raise ValueError("this reading breaks the stage")
        return [r]

    async with dedupe_runner(js, fn):
        await eventually(lambda: stream_messages(nats_server.url, "DLQ"), lambda got: len(got) == 1)
        unique = await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"), lambda got: len(got) == 9
        )
    [dlq] = await stream_messages(nats_server.url, "DLQ")
    assert dlq.subject == "dlq.stage_failed"
    assert "this reading breaks the stage" in dlq.data.decode()
    assert POISON_UNIT not in {int(m.subject.rsplit(".", 1)[1]) for m in unique}
    assert calls[POISON_UNIT] == 3, "three failures in a row make it poison"
    assert (await js.consumer_info("VALID", "dedupe")).num_ack_pending == 0


async def test_a_transient_error_is_retried_until_it_passes_and_nothing_goes_to_the_dlq(
    js, nats_server
) -> None:
    failures = {"left": 4}

    def fn(r: Reading) -> list[Reading]:
        if r.einheit_id == POISON_UNIT and failures["left"]:
            failures["left"] -= 1
            raise ConnectionRefusedError("database away")
        return [r]

    async with dedupe_runner(js, fn) as runner:
        await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"),
            lambda got: len(got) == len(UNITS),
        )
        assert runner.healthy
    assert failures["left"] == 0
    assert await stream_messages(nats_server.url, "DLQ") == []


async def test_a_batched_stage_failing_on_one_message_is_retried_one_by_one(
    js, nats_server
) -> None:
    class Batched:
        batched = True

        def __call__(self, batch: list[Reading]) -> list[Reading]:
            if any(r.einheit_id == POISON_UNIT for r in batch):
                raise KeyError("poison inside")
            return batch

    async with dedupe_runner(js, Batched()):
        await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"), lambda got: len(got) == 9
        )
        dlq = await eventually(
            lambda: stream_messages(nats_server.url, "DLQ"), lambda got: len(got) == 1
        )
    assert dlq[0].subject == "dlq.stage_failed"


async def after_a_dead_worker(
    js: Any, redelivery: Redelivery
) -> tuple[Callable[[Reading], list[Reading]], list[Reading]]:
    """A stand-in stage that records what it sees, with every message already taken once by
    a worker that died before acknowledging it."""
    seen: list[Reading] = []

    def fn(r: Reading) -> list[Reading]:
        seen.append(r)
        return [r]

    config = ChainRunner(
        js, [Step(BY_NAME["dedupe"], fn)], Metrics(), asyncio.Event(), redelivery=redelivery
    ).consumer_config()
    await js.add_consumer("VALID", config=config)
    sub = await js.pull_subscribe_bind(durable="dedupe", stream="VALID")
    taken = await sub.fetch(batch=len(UNITS), timeout=5)
    assert len(taken) == len(UNITS)
    await sub.unsubscribe()
    return fn, seen


async def test_a_redelivered_reading_reaches_the_stage_marked_as_redelivered(
    js, nats_server
) -> None:
    redelivery = Redelivery(ack_wait_s=1.0, max_deliver=5)
    fn, seen = await after_a_dead_worker(js, redelivery)
    async with dedupe_runner(js, fn, redelivery):
        await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"),
            lambda got: len(got) == len(UNITS),
        )
    assert len(seen) == len(UNITS)
    assert all(r.redelivered for r in seen)


async def test_a_message_delivered_max_deliver_times_goes_to_the_dlq_unprocessed(
    js, nats_server
) -> None:
    redelivery = Redelivery(ack_wait_s=1.0, max_deliver=2)
    fn, seen = await after_a_dead_worker(js, redelivery)  # delivery 1 died with its worker
    async with dedupe_runner(js, fn, redelivery):  # delivery 2 is the last one allowed
        dlq = await eventually(
            lambda: stream_messages(nats_server.url, "DLQ"),
            lambda got: len(got) == len(UNITS),
        )
    assert {m.subject for m in dlq} == {"dlq.max_deliveries"}
    assert seen == []
    assert await stream_messages(nats_server.url, "UNIQUE") == []


async def test_a_consumer_deleted_on_the_server_is_created_again_and_the_stage_goes_on(
    js, nats_server
) -> None:
    async with dedupe_runner(js, lambda r: [r]):
        await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"),
            lambda got: len(got) == len(UNITS),
        )
        await js.delete_consumer("VALID", "dedupe")
        body, headers = encode(reading(42))
        await js.publish(f"valid.{ORG}.42", body, headers=headers)
        await eventually(
            lambda: stream_messages(nats_server.url, "UNIQUE"),
            lambda got: len(got) == len(UNITS) + 1,
        )
