"""A poison message in every batch: hostile MQTT messages between the readings, and in split
mode also undecodable or database-refused messages on every internal subject. Each lands on
`dlq.{reason}` alone; every good reading around it is stored, summed and published."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import nats
import pytest

from pipeline.devstack import Mosquitto
from schemas.messages import Reading
from tests.conftest import eventually
from tests.corpus.hostile import HOSTILE, ORG_A
from tests.faults.conftest import Stack
from tests.faults.harness import DataSet, data_set, scenario
from tests.integration.support import stream_messages

#: One hostile MQTT message after every this many readings (fetches hold about this many).
EVERY = 8
INTERNAL_ROUNDS = 40
INTERNAL_PAUSE_S = 0.1


def poisoned(data: DataSet, hostile_reasons: Counter[str], carried: str) -> DataSet:
    cases = [h for h in HOSTILE if h.carried_by in ("any", carried)]
    messages: list[tuple[str, bytes]] = []
    for index, message in enumerate(data.messages):
        if index % EVERY == 0:
            case = cases[(index // EVERY) % len(cases)]
            messages.append((case.topic, case.payload))
            hostile_reasons[case.reason] += 1
        messages.append(message)
    return DataSet(messages, data.readings, data.base)


def reading(unit: int, verbrauch: str, round_: int) -> bytes:
    """A valid-looking reading the database refuses; each round its own key."""
    return (
        Reading(
            organization_id=ORG_A,
            einheit_id=unit,
            timestamp=datetime(2025, 6, 1, 10, 7, tzinfo=UTC) + timedelta(seconds=round_),
            verbrauch=Decimal(verbrauch),
            einspeisung=Decimal(0),
            received_at=datetime.now(UTC),
        )
        .model_dump_json()
        .encode()
    )


def internal(round_: int) -> list[tuple[str, bytes, str]]:
    """(subject, body, reason) of what split mode also gets on its internal subjects."""
    tag = f" #{round_}".encode()
    return [
        ("ingest.poison.1", b"no headers: no topic, no receive time" + tag, "undecodable"),
        (f"valid.{ORG_A}.1", b"not a reading" + tag, "undecodable"),
        (f"unique.{ORG_A}.1", reading(999_999, "1", round_), "persist_failed"),  # FK refuses
        (f"unique.{ORG_A}.1", reading(1, "1000000000", round_), "persist_failed"),  # overflow
        (f"persisted.{ORG_A}.1", b"{}" + tag, "undecodable"),
    ]


@contextlib.asynccontextmanager
async def injecting(nats_url: str, reasons: Counter[str]) -> AsyncIterator[None]:
    """Publish one of each internal poison every `INTERNAL_PAUSE_S` while the block runs."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def inject() -> None:
        for round_ in range(INTERNAL_ROUNDS):
            for subject, body, reason in internal(round_):
                await js.publish(subject, body)
                reasons[reason] += 1
            await asyncio.sleep(INTERNAL_PAUSE_S)

    task = asyncio.create_task(inject())
    try:
        yield
        await task
    finally:
        task.cancel()
        await nc.close()


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_a_poison_message_in_every_batch_is_rejected_alone(stack: Stack, mode: str) -> None:
    reasons: Counter[str] = Counter()
    carried = "mosquitto" if isinstance(stack.broker.process, Mosquitto) else "nats"
    data = poisoned(data_set(31), reasons, carried)
    workers = stack.workers(mode)
    async with contextlib.AsyncExitStack() as inside:

        async def start_injecting() -> None:
            if mode == "split":
                await inside.enter_async_context(injecting(stack.nats.url, reasons))

        await scenario(
            f"a poison message in every batch ({mode})",
            workers,
            stack.broker.port,
            stack.dsn,
            stack.nats.url,
            data,
            lambda _: [(0.0, start_injecting)],
        )

    async def rejected() -> Counter[str]:
        dlq = await stream_messages(stack.nats.url, "DLQ")
        return Counter(m.subject.removeprefix("dlq.") for m in dlq)

    assert await eventually(rejected, lambda got: got == reasons, timeout_s=30) == reasons
