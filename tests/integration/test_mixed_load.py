"""A few thousand mixed messages, as an acceptance check would send them, against a reference.

Valid readings, exact repeats, corrections, late readings after their interval was published,
future readings, timestamps with offsets, quarter-hour boundary readings and bad input, in one
stream; the tables, the replayed `MESSWERTE` stream and the failure metric must match what plain
Python computes from the same messages (last write wins per unit and instant).
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from tests.conftest import eventually
from tests.integration.support import (
    Reference,
    latest_by_key,
    messwerte_published,
    metric,
    publish,
    running,
)

ORGS = [
    uuid.UUID(int=0x550E8400E29B41D4A716446655440000),
    uuid.UUID(int=0x6BA7B8109DAD11D180B400C04FD430C8),
]
UNITS = {unit: ORGS[unit % 2] for unit in range(1, 21)}
BASE = (datetime.now(UTC) - timedelta(hours=4)).replace(minute=0, second=0, microsecond=0)
BAD = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"x"',
    b"{}",
    b"\xff\xfe",
    b'{"verbrauch": 1, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00", "verbrauch": 1, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": -1, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": "1", "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": true, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": NaN, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": 1e12, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": null, "einspeisung": 0}',
    b'{"timestamp": "2025-01-01T00:00:00Z", "verbrauch": 1, "verbrauch": 2, "einspeisung": 0}',
]


def fmt(at: datetime, rng: random.Random) -> str:
    offset = timezone(timedelta(minutes=rng.choice([0, 60, 120, -300, 330])))
    text = at.astimezone(offset).isoformat()
    return text.replace("+00:00", "Z") if rng.random() < 0.5 else text


def payload(at: datetime, verbrauch: str, einspeisung: str, rng: random.Random) -> bytes:
    return f'{{"timestamp": {json.dumps(fmt(at, rng))}, "verbrauch": {verbrauch}, "einspeisung": {einspeisung}}}'.encode()


def phase(
    rng: random.Random, count: int, span_min: int
) -> tuple[list[tuple[str, bytes]], list[tuple[int, datetime, str, str]], int]:
    messages: list[tuple[str, bytes]] = []
    valid: list[tuple[int, datetime, str, str]] = []
    bad = 0
    for _ in range(count):
        unit = rng.choice(list(UNITS))
        topic = f"zev/{UNITS[unit]}/{unit}/messwert"
        roll = rng.random()
        if roll < 0.06:
            messages.append((topic, rng.choice(BAD)))
            bad += 1
            continue
        if roll < 0.08:
            messages.append(
                (f"zev/{UNITS[unit]}/{unit + 1000}/messwert", payload(BASE, "1", "0", rng))
            )
            bad += 1  # unknown unit
            continue
        if roll < 0.09:
            messages.append(
                (f"zev/{ORGS[(unit + 1) % 2]}/{unit}/messwert", payload(BASE, "1", "0", rng))
            )
            bad += 1  # another organization's unit
            continue
        if roll < 0.25 and valid:
            previous = rng.choice(valid)  # exact repeat or correction of an earlier reading
            if rng.random() < 0.5:
                unit, at, v, e = previous
            else:
                unit, at, v, e = (
                    previous[0],
                    previous[1],
                    f"{rng.randint(0, 9999) / 1000}",
                    previous[3],
                )
            messages.append((f"zev/{UNITS[unit]}/{unit}/messwert", payload(at, v, e, rng)))
            valid.append((unit, at, v, e))
            continue
        if roll < 0.30:
            at = BASE + timedelta(minutes=15 * rng.randint(1, span_min // 15))  # on a quarter hour
        elif roll < 0.32:
            at = datetime.now(UTC) + timedelta(
                days=rng.randint(1, 30)
            )  # future: stored, not summed
        else:
            at = BASE + timedelta(
                seconds=rng.randint(0, span_min * 60), microseconds=rng.choice([0, 1, 500_000])
            )
        v, e = f"{rng.randint(0, 20000) / 10000}", f"{rng.randint(0, 5000) / 10000}"
        messages.append((topic, payload(at, v, e, rng)))
        valid.append((unit, at, v, e))
    return messages, valid, bad


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_mixed_load_matches_the_reference(mode, settings, mqtt_broker, db) -> None:
    await db.executemany("INSERT INTO einheit VALUES ($1, $2)", list(UNITS.items()))
    settings = settings.model_copy(
        update={"window_grace_seconds": 5, "sweep_interval_seconds": 0.5}
    )
    rng = random.Random(20261122)
    first, valid_1, bad_1 = phase(rng, 1500, 150)
    second, valid_2, bad_2 = phase(
        rng, 1000, 150
    )  # late readings and corrections of published intervals
    reference = Reference.of(valid_1 + valid_2)
    now = datetime.now(UTC)
    expected = {
        k: v for k, v in reference.messwerte().items() if k[1] + timedelta(seconds=5) <= now
    }

    async with running(settings, mode) as pipeline:
        await publish(mqtt_broker.url, first)
        await eventually(
            lambda: messwerte_published(settings.nats_url), lambda got: len(got) > 0, timeout_s=30
        )
        await publish(mqtt_broker.url, second)
        await eventually(
            lambda: metric(pipeline, "zev_mqtt_messages_received_total"),
            lambda n: n == len(first) + len(second),
            timeout_s=60,
        )

        async def messwerte() -> dict[tuple[int, datetime], tuple[Decimal, Decimal, int]]:
            rows = await db.fetch(
                "SELECT einheit_id, zeit, verbrauch, einspeisung, anzahl_rohwerte FROM messwerte"
            )
            return {
                (r["einheit_id"], r["zeit"]): (
                    r["verbrauch"],
                    r["einspeisung"],
                    r["anzahl_rohwerte"],
                )
                for r in rows
            }

        await eventually(messwerte, lambda got: got == expected, timeout_s=60)
        published = await eventually(
            lambda: messwerte_published(settings.nats_url),
            lambda got: (
                {
                    (k[0], k[1]): (
                        Decimal(str(m["verbrauch"])),
                        Decimal(str(m["einspeisung"])),
                        m["anzahlRohwerte"],
                    )
                    for k, m in latest_by_key(got).items()
                }
                == {(u, z.isoformat().replace("+00:00", "Z")): v for (u, z), v in expected.items()}
            ),
            timeout_s=30,
        )
        failed = await metric(pipeline, "zev_mqtt_messages_failed_total")

    rows = await db.fetch(
        "SELECT einheit_id, timestamp, verbrauch, einspeisung, verarbeitet FROM zaehler_rohdaten"
    )
    assert {
        (r["einheit_id"], r["timestamp"]): (r["verbrauch"], r["einspeisung"]) for r in rows
    } == reference.raw
    closed_unprocessed = [
        r for r in rows if not r["verarbeitet"] and r["timestamp"] < now - timedelta(minutes=20)
    ]
    assert closed_unprocessed == []
    assert failed == bad_1 + bad_2
    revisions: dict[tuple[int, str], list[int]] = {}
    for message in published:
        revisions.setdefault((message["einheitId"], message["zeit"]), []).append(
            message["revision"]
        )
    assert all(r == list(range(1, len(r) + 1)) for r in revisions.values()), (
        "revisions rise by one from 1"
    )
