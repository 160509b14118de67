"""MQTT in -> `zaehler_rohdaten` -> `messwerte` -> `messwerte.>`, in both run modes, against
real servers; every comparison is with a result computed independently in Python."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import nats
import pytest

from pipeline.devstack import Mosquitto
from tests.conftest import eventually
from tests.integration.support import (
    Reference,
    body,
    latest_by_key,
    messwerte_published,
    metric,
    publish,
    running,
    stream_messages,
    topic,
)

ORG_A = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
ORG_B = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
UNITS = {1: ORG_A, 2: ORG_A, 3: ORG_B}
#: A closed stretch of time: three quarter hours well in the past.
BASE = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)


@pytest.fixture
async def units(db: asyncpg.Connection) -> dict[int, uuid.UUID]:
    await db.executemany(
        "INSERT INTO einheit (id, organization_id) VALUES ($1, $2)", list(UNITS.items())
    )
    return UNITS


async def db_messwerte(
    db: asyncpg.Connection,
) -> dict[tuple[int, datetime], tuple[Decimal, Decimal, int]]:
    rows = await db.fetch(
        "SELECT einheit_id, zeit, verbrauch, einspeisung, anzahl_rohwerte, quelle FROM messwerte"
    )
    assert all(r["quelle"] == "MQTT" for r in rows)
    return {
        (r["einheit_id"], r["zeit"]): (r["verbrauch"], r["einspeisung"], r["anzahl_rohwerte"])
        for r in rows
    }


async def db_raw(db: asyncpg.Connection) -> dict[tuple[int, datetime], tuple[Decimal, Decimal]]:
    rows = await db.fetch(
        "SELECT einheit_id, timestamp, verbrauch, einspeisung FROM zaehler_rohdaten"
    )
    return {(r["einheit_id"], r["timestamp"]): (r["verbrauch"], r["einspeisung"]) for r in rows}


def data_set() -> list[tuple[int, datetime, str, str]]:
    """Readings every 4 minutes for 45 minutes, including quarter-hour boundary readings."""
    readings = []
    for unit in UNITS:
        for step in range(12):
            at = BASE + timedelta(minutes=4 * step)
            readings.append((unit, at, f"{unit}.{step:02d}", f"0.{step:02d}5"))
        readings.append((unit, BASE + timedelta(minutes=15), "0.7", "0"))  # exactly on a quarter
        readings.append((unit, BASE + timedelta(minutes=15, microseconds=1000), "0.3", "0"))
    return readings


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_readings_become_rows_messwerte_and_messages(
    mode, settings, units, db, mqtt_broker
) -> None:
    readings = data_set()
    reference = Reference.of(readings)
    async with running(settings, mode) as pipeline:
        await publish(
            mqtt_broker.url, [(topic(UNITS[u], u), body(at, v, e)) for u, at, v, e in readings]
        )
        expected = reference.messwerte()
        await eventually(lambda: db_messwerte(db), lambda got: got == expected)
        assert await db_raw(db) == reference.raw
        assert (
            await db.fetchval(
                "SELECT count(*) FROM zaehler_rohdaten WHERE verarbeitet IS NOT TRUE OR verarbeitet_am IS NULL"
            )
            == 0
        )
        published = await eventually(
            lambda: messwerte_published(settings.nats_url),
            lambda got: len(latest_by_key(got)) == len(expected),
        )
        assert pipeline.metrics.registry.get_sample_value("zev_mqtt_messages_failed_total") == 0
    latest = latest_by_key(published)
    for (unit, end), (verbrauch, einspeisung, count) in expected.items():
        message = latest[(unit, end.isoformat().replace("+00:00", "Z"))]
        assert Decimal(str(message["verbrauch"])) == verbrauch
        assert Decimal(str(message["einspeisung"])) == einspeisung
        assert message["anzahlRohwerte"] == count
        assert message["organizationId"] == str(UNITS[unit])
        assert message["quelle"] == "MQTT"
        assert message["intervalStart"] == (end - timedelta(minutes=15)).isoformat().replace(
            "+00:00", "Z"
        )


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_each_message_goes_out_on_its_units_subject_with_an_idempotency_key(
    mode, settings, units, db, mqtt_broker
) -> None:
    async with running(settings, mode):
        await publish(
            mqtt_broker.url, [(topic(ORG_B, 3), body(BASE + timedelta(minutes=3), "1.5"))]
        )
        await eventually(
            lambda: stream_messages(settings.nats_url, "MESSWERTE"), lambda got: len(got) == 1
        )
    [message] = await stream_messages(settings.nats_url, "MESSWERTE")
    zeit = (BASE + timedelta(minutes=15)).isoformat().replace("+00:00", "Z")
    assert message.subject == f"messwerte.{ORG_B}.3"
    assert message.headers["Nats-Msg-Id"] == f"3:{zeit}:1"


async def test_exact_repeats_are_dropped_and_change_nothing(
    settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=1)
    async with running(settings) as pipeline:
        await publish(
            mqtt_broker.url,
            [(topic(ORG_A, 1), body(at, "1.5"))] * 5 + [(topic(ORG_A, 1), body(at, 1.50))],
        )
        await eventually(lambda: messwerte_published(settings.nats_url), lambda got: len(got) >= 1)
        await eventually(
            lambda: metric(pipeline, "pipeline_stage_messages_in_total", {"stage": "dedupe"}),
            lambda n: n == 6,
        )
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 1
    published = await messwerte_published(settings.nats_url)
    assert [m["revision"] for m in published] == [1]
    assert pipeline.metrics.registry.get_sample_value("zev_mqtt_messages_failed_total") == 0


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_correction_after_close_republishes_with_revision_2(
    mode, settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=2)
    async with running(settings, mode):
        await publish(
            mqtt_broker.url,
            [
                (topic(ORG_A, 1), body(at, "1.0")),
                (topic(ORG_A, 1), body(at + timedelta(minutes=5), "2.0")),
            ],
        )
        await eventually(
            lambda: messwerte_published(settings.nats_url),
            lambda got: any(m["anzahlRohwerte"] == 2 for m in got),
        )
        first = latest_by_key(await messwerte_published(settings.nats_url))
        await publish(mqtt_broker.url, [(topic(ORG_A, 1), body(at, "4.0"))])
        published = await eventually(
            lambda: messwerte_published(settings.nats_url),
            lambda got: any(m["verbrauch"] == 6.0 for m in got),
            timeout_s=5,
        )
    [(key, before)] = first.items()
    after = latest_by_key(published)[key]
    assert after["revision"] == before["revision"] + 1
    assert (after["verbrauch"], after["anzahlRohwerte"]) == (6.0, 2)
    row = await db.fetchrow("SELECT verbrauch, revision FROM messwerte")
    assert (row["verbrauch"], row["revision"]) == (Decimal("6.0000"), after["revision"])


async def test_late_reading_for_a_closed_interval_is_summed_with_the_whole_interval(
    settings, units, db, mqtt_broker
) -> None:
    async with running(settings):
        await publish(
            mqtt_broker.url,
            [(topic(ORG_A, 2), body(BASE + timedelta(minutes=m), "1")) for m in (1, 2, 3)],
        )
        await eventually(
            lambda: db_messwerte(db), lambda got: bool(got) and next(iter(got.values()))[2] == 3
        )
        await publish(
            mqtt_broker.url, [(topic(ORG_A, 2), body(BASE + timedelta(minutes=14), "0.5"))]
        )
        got = await eventually(
            lambda: db_messwerte(db), lambda got: next(iter(got.values()))[2] == 4, timeout_s=5
        )
    assert next(iter(got.values())) == (Decimal("3.5000"), Decimal("0.0000"), 4)


async def test_reading_in_an_open_interval_is_stored_but_not_aggregated(
    settings, units, db, mqtt_broker
) -> None:
    now = datetime.now(UTC)
    async with running(settings) as pipeline:
        await publish(
            mqtt_broker.url,
            [
                (topic(ORG_A, 1), body(now, "1")),
                (topic(ORG_A, 1), body(now + timedelta(days=1), "2")),
            ],
        )
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM zaehler_rohdaten"), lambda n: n == 2
        )
        runs = pipeline.metrics.registry.get_sample_value("zev_aggregation_runs_total") or 0
        await eventually(
            lambda: metric(pipeline, "zev_aggregation_runs_total"),
            lambda n: n >= runs + 2,
        )
    assert await db.fetchval("SELECT count(*) FROM messwerte") == 0
    assert await db.fetchval("SELECT count(*) FROM zaehler_rohdaten WHERE verarbeitet") == 0


async def test_bad_messages_go_to_the_dlq_with_reasons_and_good_ones_survive(
    settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=7)
    bad = [
        (topic(ORG_A, 1), b"not json"),
        (topic(ORG_A, 1), b""),
        (topic(ORG_A, 1), body(at, -1)),
        (topic(ORG_A, 1), body(at, True)),
        (topic(ORG_A, 999), body(at, 1)),
        (topic(ORG_B, 1), body(at, 1)),
        ("zev/not-a-uuid/1/messwert", body(at, 1)),
        (
            topic(ORG_A, 1),
            b'{"timestamp": "2025-01-01T00:00:00", "verbrauch": 1, "einspeisung": 0}',
        ),
    ]
    good = (topic(ORG_A, 1), body(at, "2.5"))
    mixed = [bad[0], good, *bad[1:]]
    async with running(settings) as pipeline:
        await publish(mqtt_broker.url, mixed)
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == len(bad)
        )
        await eventually(lambda: db_raw(db), lambda got: len(got) == 1)
        failed = pipeline.metrics.registry.get_sample_value("zev_mqtt_messages_failed_total")
    assert failed == len(bad)
    reasons = sorted(m.subject.removeprefix("dlq.") for m in dlq)
    assert reasons == sorted(
        [
            "invalid_json",
            "invalid_json",
            "negative_value",
            "invalid_number",
            "unknown_unit",
            "organization_mismatch",
            "invalid_topic",
            "invalid_timestamp",
        ]
    )
    assert (await db_raw(db))[(1, at)] == (Decimal("2.5000"), Decimal("0.0000"))


async def test_unit_inserted_while_running_is_recognised_within_5_seconds(
    settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=3)
    async with running(settings):
        await publish(mqtt_broker.url, [(topic(ORG_B, 42), body(at, "1"))])
        await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == 1
        )
        await db.execute("INSERT INTO einheit (id, organization_id) VALUES (42, $1)", ORG_B)
        inserted = asyncio.get_running_loop().time()
        sent: list[datetime] = []

        async def send_and_look() -> set[datetime]:
            """A meter keeps sending; report which of its readings are stored so far."""
            reading_at = at + timedelta(seconds=len(sent) + 1)
            sent.append(reading_at)
            await publish(mqtt_broker.url, [(topic(ORG_B, 42), body(reading_at, "1"))])
            return {ts for unit, ts in await db_raw(db) if unit == 42}

        await eventually(send_and_look, bool, timeout_s=5, interval_s=0.2)
    assert asyncio.get_running_loop().time() - inserted < 5


async def test_restart_aggregates_every_closed_interval_left_unprocessed(
    settings, units, db, mqtt_broker
) -> None:
    readings = [
        (u, BASE + timedelta(minutes=10 * i), f"{i}.25", "0.5") for u in UNITS for i in range(6)
    ]
    # Run without the window stage, as if the worker died before aggregating.
    async with running(settings, stages=["mqtt_bridge", "validate", "dedupe", "persist"]):
        await publish(
            mqtt_broker.url, [(topic(UNITS[u], u), body(at, v, e)) for u, at, v, e in readings]
        )
        await eventually(lambda: db_raw(db), lambda got: len(got) == len(readings))
    assert await db.fetchval("SELECT count(*) FROM messwerte") == 0
    expected = Reference.of(readings).messwerte()
    async with running(settings):
        await eventually(lambda: db_messwerte(db), lambda got: got == expected)
        published = await eventually(
            lambda: messwerte_published(settings.nats_url), lambda got: len(got) == len(expected)
        )
    assert {m["revision"] for m in published} == {1}


async def test_payload_larger_than_nats_accepts_is_rejected_and_the_next_one_stored(
    settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=8)
    # Over NATS's 1 MiB max_payload where the broker allows it: the bridge must not stall on it.
    size = min(2 * 1024 * 1024, mqtt_broker.max_payload_bytes - 64)
    huge = b'{"timestamp": "' + b"x" * size + b'"}'
    async with running(settings):
        await publish(
            mqtt_broker.url, [(topic(ORG_A, 1), huge), (topic(ORG_A, 1), body(at, "1.5"))]
        )
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == 1
        )
        await eventually(lambda: db_raw(db), lambda got: (1, at) in got)
    assert dlq[0].subject == "dlq.payload_too_large"
    assert str(len(huge)) in dlq[0].data.decode()


async def test_topics_with_nats_wildcards_or_dots_are_rejected_as_invalid_topic(
    settings, units, db, mqtt_broker
) -> None:
    at = BASE + timedelta(minutes=9)
    tricky = [
        f"zev/{ORG_A}.x/1/messwert",
        "zev/*/1/messwert",
        f"zev/{'9' * 300}/1/messwert",
    ]
    if isinstance(mqtt_broker.process, Mosquitto):
        # nats-server's MQTT listener refuses a space and silently drops a `>` token itself.
        tricky += [f"zev/{ORG_A}/1 /messwert", "zev/>/1/messwert"]
    good = (topic(ORG_A, 1), body(at, "1"))
    async with running(settings) as pipeline:
        await publish(mqtt_broker.url, [*[(t, body(at, "1")) for t in tricky], good])
        await eventually(lambda: db_raw(db), lambda got: (1, at) in got)
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == len(tricky)
        )
        failed = await metric(pipeline, "zev_mqtt_messages_failed_total")
    assert {m.subject for m in dlq} == {"dlq.invalid_topic"}
    assert failed == len(tricky)


async def test_streams_lost_on_the_server_are_declared_again_and_readings_flow(
    settings, units, db, mqtt_broker
) -> None:
    """A JetStream store lost with a restart, or a stream deleted by hand: the workers create
    what they need again instead of retrying into nothing."""
    at = BASE + timedelta(minutes=4)
    async with running(settings):
        nc = await nats.connect(settings.nats_url)
        js = nc.jetstream()
        for stream in ("INGEST", "MESSWERTE"):
            await js.delete_stream(stream)
        await nc.close()
        await publish(mqtt_broker.url, [(topic(ORG_A, 1), body(at, "2.5"))])
        await eventually(lambda: db_raw(db), lambda got: (1, at) in got)
        await eventually(
            lambda: stream_messages(settings.nats_url, "MESSWERTE"), lambda got: len(got) == 1
        )


async def test_reading_older_than_the_raw_retention_goes_to_dlq_too_old_and_the_next_is_stored(
    settings, units, db, mqtt_broker
) -> None:
    """PIPELINE_RAW_RETENTION_DAYS=1: a reading of two days ago would re-sum an interval whose
    raw rows may be pruned."""
    kept = settings.model_copy(update={"raw_retention_days": 1.0})
    old = datetime.now(UTC) - timedelta(days=2)
    at = BASE + timedelta(minutes=8)
    async with running(kept):
        await publish(
            mqtt_broker.url, [(topic(ORG_A, 1), body(old, "9")), (topic(ORG_A, 1), body(at, "1.5"))]
        )
        dlq = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == 1
        )
        await eventually(lambda: db_raw(db), lambda got: (1, at) in got)
    assert dlq[0].subject == "dlq.too_old"
    assert list(await db_raw(db)) == [(1, at)]
