"""The hostile corpus through a real broker and pipeline: each message lands on `dlq.{reason}`
with its reason, and the good reading sent after each one is stored."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.devstack import Mosquitto
from tests.conftest import eventually
from tests.corpus import hostile_bess
from tests.corpus.hostile import HOSTILE, TOPIC, UNITS
from tests.integration.support import body, metric, publish, running, stream_messages

BASE = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_every_hostile_message_is_rejected_with_its_reason_and_no_good_one_lost(
    mode, settings, db, mqtt_broker
) -> None:
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", list(UNITS.items()))
    carried = "mosquitto" if isinstance(mqtt_broker.process, Mosquitto) else "nats"
    cases = [h for h in HOSTILE if h.carried_by == "any" or h.carried_by == carried]
    messages: list[tuple[str, bytes]] = []
    for index, case in enumerate(cases):
        messages.append((case.topic, case.payload))
        messages.append((TOPIC, body(BASE + timedelta(seconds=index), f"{index}.5")))
    async with running(settings, mode) as pipeline:
        await publish(mqtt_broker.url, messages)
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"),
            lambda got: len(got) >= len(cases),
            timeout_s=30,
        )
        stored = await eventually(
            lambda: db.fetchval("SELECT count(*) FROM zaehler_rohdaten"),
            lambda n: n >= len(cases),
        )
        failed = await metric(pipeline, "zev_mqtt_messages_failed_total")
    assert Counter(m.subject.removeprefix("dlq.") for m in dlq) == Counter(c.reason for c in cases)
    assert stored == len(cases)
    assert failed == len(cases)


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_every_hostile_bess_message_is_rejected_with_its_reason_and_no_good_one_lost(
    mode, settings, db, mqtt_broker
) -> None:
    await db.executemany(
        "INSERT INTO bess_device VALUES ($1, $2, $3)",
        [(site, device, org) for (site, device), org in hostile_bess.DEVICES.items()],
    )
    carried = "mosquitto" if isinstance(mqtt_broker.process, Mosquitto) else "nats"
    cases = [h for h in hostile_bess.HOSTILE_BESS if h.carried_by in ("any", carried)]
    messages: list[tuple[str, bytes]] = []
    for index, case in enumerate(cases):
        messages.append((case.topic, case.payload))
        good = hostile_bess.obj(ts=(BASE + timedelta(seconds=index)).isoformat(), soc=index)
        messages.append((hostile_bess.TOPIC, good))
    async with running(settings, mode):
        await publish(mqtt_broker.url, messages)
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"),
            lambda got: len(got) >= len(cases),
            timeout_s=30,
        )
        stored = await eventually(
            lambda: db.fetchval("SELECT count(*) FROM bess_telemetry"),
            lambda n: n >= len(cases),
        )
    assert Counter(m.subject.removeprefix("dlq.") for m in dlq) == Counter(c.reason for c in cases)
    assert stored == len(cases)
