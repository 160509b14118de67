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


async def rejected_and_kept(
    settings, db, mqtt_broker, mode: str, corpus, good, table: str
) -> tuple[Counter[str], Counter[str], int, float]:
    """Send each carried case of `corpus` followed by `good(index)`; (reasons on the DLQ,
    reasons expected, rows stored in `table`, zev_mqtt_messages_failed_total)."""
    carried = "mosquitto" if isinstance(mqtt_broker.process, Mosquitto) else "nats"
    cases = [h for h in corpus if h.carried_by in ("any", carried)]
    messages: list[tuple[str, bytes]] = []
    for index, case in enumerate(cases):
        messages.append((case.topic, case.payload))
        messages.append(good(index))
    async with running(settings, mode) as pipeline:
        await publish(mqtt_broker.url, messages)
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"),
            lambda got: len(got) >= len(cases),
            timeout_s=30,
        )
        stored = await eventually(
            lambda: db.fetchval(f"SELECT count(*) FROM {table}"), lambda n: n >= len(cases)
        )
        failed = await metric(pipeline, "zev_mqtt_messages_failed_total")
    got = Counter(m.subject.removeprefix("dlq.") for m in dlq)
    return got, Counter(c.reason for c in cases), stored, failed


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_every_hostile_message_is_rejected_with_its_reason_and_no_good_one_lost(
    mode, settings, db, mqtt_broker
) -> None:
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", list(UNITS.items()))
    got, expected, stored, failed = await rejected_and_kept(
        settings, db, mqtt_broker, mode, HOSTILE,
        lambda i: (TOPIC, body(BASE + timedelta(seconds=i), f"{i}.5")), "zaehler_rohdaten",
    )  # fmt: skip
    assert got == expected
    assert stored == failed == expected.total()


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_every_hostile_bess_message_is_rejected_with_its_reason_and_no_good_one_lost(
    mode, settings, db, mqtt_broker
) -> None:
    await db.executemany(
        "INSERT INTO bess_device VALUES ($1, $2, $3)",
        [(site, device, org) for (site, device), org in hostile_bess.DEVICES.items()],
    )

    def good(index: int) -> tuple[str, bytes]:
        at = (BASE + timedelta(seconds=index)).isoformat()
        return hostile_bess.TOPIC, hostile_bess.obj(ts=at, soc=index)

    got, expected, stored, failed = await rejected_and_kept(
        settings, db, mqtt_broker, mode, hostile_bess.HOSTILE_BESS, good, "bess_telemetry"
    )
    assert got == expected
    assert stored == failed == expected.total()
