"""BESS telemetry over MQTT -> `bess_telemetry` -> `bess_interval` -> `intervals.bess.>`, in both
run modes, against real servers; compared with `bess_reference`, computed independently."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from tests.conftest import eventually
from tests.integration import bess_reference
from tests.integration.support import publish, running, stream_messages

ORG_A = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
ORG_B = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
DEVICES = {("site1", "bess1"): ORG_A, ("site1", "bess2"): ORG_A, ("site2", "bess1"): ORG_B}
#: Three closed quarter hours.
BASE = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
GAP_S = 300.0


@pytest.fixture
async def devices(db: asyncpg.Connection) -> dict[tuple[str, str], uuid.UUID]:
    await db.executemany(
        "INSERT INTO bess_device (site, device, organization_id) VALUES ($1, $2, $3)",
        [(site, device, org) for (site, device), org in DEVICES.items()],
    )
    return DEVICES


def sample(ts: datetime, p: float, soc: float = 50.0, **more: Any) -> dict[str, Any]:
    return {"ts": ts.isoformat(), "soc": soc, "p": p, **more}


def message(site: str, device: str, fields: dict[str, Any]) -> tuple[str, bytes]:
    return f"bess/{site}/{device}/telemetry", json.dumps(fields).encode()


class Fleet:
    """What was sent, in order, and the samples that must be stored (last write wins)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.samples: bess_reference.Samples = {}

    def send(self, site: str, device: str, fields: dict[str, Any]) -> None:
        self.messages.append(message(site, device, fields))
        ts = datetime.fromisoformat(fields["ts"]).astimezone(UTC)
        self.samples[(site, device, ts)] = fields

    def expected(self) -> dict[tuple[str, str, datetime], bess_reference.Expected]:
        return bess_reference.intervals(self.samples, GAP_S)


def a_day_of_work() -> Fleet:
    """45 minutes of three devices: a charge/discharge swing through zero, samples on the
    quarter hours, an offset timestamp, a gap longer than 300 s, alarms, repeats, corrections."""
    fleet = Fleet()
    for step in range(0, 136):  # every 20 s, 0 … 45 min
        ts = BASE + timedelta(seconds=20 * step)
        swing = round(200 * math.sin(step / 9), 3)
        fleet.send(
            "site1", "bess1",
            sample(ts, swing, 40 + step / 10, t_cell_max=25 + step % 7, soh=97.5,
                   alarms=["OVERTEMP"] if step % 50 == 7 else []),
        )  # fmt: skip
        if not 30 <= step < 50:  # a gap of 400 s
            fleet.send("site1", "bess2", sample(ts + timedelta(seconds=3), -80.0, 70 - step / 10))
        if step % 3 == 0:
            local = (ts + timedelta(seconds=7)).astimezone(timezone(timedelta(hours=2)))
            fleet.send("site2", "bess1", sample(local, 15.5 + step, 20.0, p_ch=0.0))
    fleet.send("site1", "bess1", json.loads(fleet.messages[10][1]))  # an exact repeat
    corrected = sample(BASE + timedelta(seconds=200), -300.0, 41.0)  # a correction
    fleet.send("site1", "bess1", corrected)
    return fleet


async def db_intervals(db: asyncpg.Connection) -> dict[Any, bess_reference.Expected]:
    rows = await db.fetch("SELECT * FROM bess_interval")
    return {(r["site"], r["device"], r["interval_end"]): bess_reference.of_row(r) for r in rows}


async def published(nats_url: str) -> list[Any]:
    return await stream_messages(nats_url, "BESS_INTERVALS")


def latest(messages: list[Any]) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for m in messages:
        body = json.loads(m.data)
        key = (body["site"], body["device"], datetime.fromisoformat(body["intervalEnd"]))
        if key not in out or body["revision"] > out[key]["revision"]:
            out[key] = body
    return out


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_samples_become_rows_intervals_and_messages(
    mode, settings, devices, db, mqtt_broker
) -> None:
    fleet = a_day_of_work()
    expected = fleet.expected()
    async with running(settings, mode) as pipeline:
        await publish(mqtt_broker.url, fleet.messages)
        await eventually(lambda: db_intervals(db), lambda got: got == expected, timeout_s=30)
        messages = await eventually(
            lambda: published(settings.nats_url), lambda got: len(latest(got)) == len(expected)
        )
        assert pipeline.metrics.registry.get_sample_value("zev_mqtt_messages_failed_total") == 0
    stored = await db.fetch("SELECT site, device, ts, soc, p, alarms, quelle FROM bess_telemetry")
    assert {(r["site"], r["device"], r["ts"]) for r in stored} == set(fleet.samples)
    for r in stored:
        sent = fleet.samples[(r["site"], r["device"], r["ts"])]
        assert (r["soc"], r["p"], list(r["alarms"]), r["quelle"]) == (
            sent["soc"], sent["p"], sent.get("alarms", []), "MQTT",
        )  # fmt: skip
    assert await db.fetchval("SELECT count(*) FROM bess_telemetry WHERE NOT verarbeitet") == 0
    assert await db.fetchval("SELECT count(*) FROM bess_interval_dirty") == 0
    assert await db.fetchval("SELECT count(*) FROM bess_interval_outbox") == 0
    for key, body in latest(messages).items():
        assert bess_reference.of_row(body) == expected[key]
        site, device, end = key
        assert body["organizationId"] == str(DEVICES[(site, device)])
        assert body["intervalStart"] == (end - timedelta(minutes=15)).isoformat().replace(
            "+00:00", "Z"
        )
    first = messages[0]
    body = json.loads(first.data)
    assert (
        first.subject == f"intervals.bess.{body['organizationId']}.{body['site']}.{body['device']}"
    )
    assert first.headers["Nats-Msg-Id"] == (
        f"bess:{body['site']}:{body['device']}:{body['intervalEnd']}:{body['revision']}"
    )


@pytest.mark.parametrize("mode", ["fused", "split"])
async def test_a_late_sample_moves_both_neighbours_energy_and_nothing_else(
    mode, settings, devices, db, mqtt_broker
) -> None:
    """Samples at :13 and :17 make one stretch across the quarter hour; one at :15:30, late,
    splits it: both intervals change (revision 2); the interval after them does not."""
    fleet = Fleet()
    for minutes in (10, 13, 17, 20, 31, 35, 40, 44):
        fleet.send("site1", "bess1", sample(BASE + timedelta(minutes=minutes), 60.0))
    async with running(settings, mode):
        await publish(mqtt_broker.url, fleet.messages)
        await eventually(lambda: db_intervals(db), lambda got: got == fleet.expected())
        before = latest(
            await eventually(lambda: published(settings.nats_url), lambda g: len(g) == 3)
        )
        late = sample(BASE + timedelta(minutes=15, seconds=30), -600.0)
        fleet.send("site1", "bess1", late)
        await publish(mqtt_broker.url, fleet.messages[-1:])
        after = latest(
            await eventually(lambda: published(settings.nats_url), lambda g: len(g) == 5)
        )
        assert await db_intervals(db) == fleet.expected()
    first, second, third = (BASE + timedelta(minutes=m) for m in (15, 30, 45))
    key = ("site1", "bess1")
    assert {end: after[(*key, end)]["revision"] for end in (first, second, third)} == {
        first: 2, second: 2, third: 1,
    }  # fmt: skip
    assert after[(*key, third)] == before[(*key, third)]
    assert after[(*key, first)]["energyChargedKwh"] > 0  # the late sample charges
    revisions = await db.fetch("SELECT interval_end, revision FROM bess_interval")
    assert {r["interval_end"]: r["revision"] for r in revisions} == {first: 2, second: 2, third: 1}


async def test_an_exact_repeat_changes_nothing_and_a_correction_republishes(
    settings, devices, db, mqtt_broker
) -> None:
    fleet = Fleet()
    at = BASE + timedelta(minutes=5)
    fleet.send("site2", "bess1", sample(at, 10.0))
    fleet.send("site2", "bess1", sample(at + timedelta(minutes=2), 10.0))
    async with running(settings) as pipeline:
        await publish(mqtt_broker.url, fleet.messages)
        await eventually(lambda: published(settings.nats_url), lambda got: len(got) == 1)
        await publish(mqtt_broker.url, fleet.messages[:1] * 3)
        await eventually(
            lambda: _metric(pipeline, "pipeline_stage_messages_in_total", stage="dedupe_bess"),
            lambda n: n == 5,
        )
        fleet.send("site2", "bess1", sample(at, 70.0))
        await publish(mqtt_broker.url, fleet.messages[-1:])
        messages = await eventually(lambda: published(settings.nats_url), lambda g: len(g) == 2)
        assert await db_intervals(db) == fleet.expected()
    assert [json.loads(m.data)["revision"] for m in messages] == [1, 2]
    assert await db.fetchval("SELECT count(*) FROM bess_telemetry") == 2
    assert await db.fetchval("SELECT p FROM bess_telemetry WHERE ts = $1", at) == 70.0


async def test_intervals_left_when_the_aggregator_was_down_are_computed_on_start(
    settings, devices, db, mqtt_broker
) -> None:
    fleet = Fleet()
    for seconds in range(0, 1800, 45):
        fleet.send("site1", "bess2", sample(BASE + timedelta(seconds=seconds), -25.0))
    without_aggregation = ["mqtt_bridge", "validate", "dedupe", "persist", "publish"]
    async with running(settings, "split", without_aggregation):
        await publish(mqtt_broker.url, fleet.messages)
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM bess_telemetry"),
            lambda n: n == len(fleet.samples),
        )
        assert await db.fetchval("SELECT count(*) FROM bess_interval") == 0
        assert await db.fetchval("SELECT count(*) FROM bess_interval_dirty") > 0
    async with running(settings, "split", ["window_aggregate", "publish"]):
        await eventually(lambda: db_intervals(db), lambda got: got == fleet.expected())
        await eventually(
            lambda: published(settings.nats_url), lambda g: len(g) == len(fleet.expected())
        )


async def test_an_unknown_device_is_rejected_and_the_next_sample_kept(
    settings, devices, db, mqtt_broker
) -> None:
    good = sample(BASE + timedelta(minutes=1), 1.0)
    async with running(settings):
        await publish(
            mqtt_broker.url,
            [message("site9", "bess1", good), message("site1", "bess1", {**good, "soc": 101}),
             message("site1", "bess1", good)],
        )  # fmt: skip
        rejects = await eventually(
            lambda: stream_messages(settings.nats_url, "DLQ"), lambda got: len(got) == 2
        )
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM bess_telemetry"), lambda n: n == 1
        )
    assert sorted(m.subject for m in rejects) == ["dlq.out_of_range", "dlq.unknown_device"]


async def _metric(pipeline: Any, name: str, **labels: str) -> float:
    return pipeline.metrics.registry.get_sample_value(name, labels) or 0.0
