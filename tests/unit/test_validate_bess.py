"""Stage `validate` for BESS telemetry: every rule and reason of design §13, each bad sample
followed by a good one that must come through, and the plausibility warnings."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.metrics import Metrics
from schemas.bess import BessSample
from schemas.messages import IngestMessage, Reject, RejectReason
from stages.validate_bess import ValidateBess

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TOPIC = "bess/site1/bess1/telemetry"
GOOD: dict[str, Any] = {
    "ts": "2025-06-01T13:59:30+02:00",
    "soc": 57.1,
    "p": -120.0,
    "p_ch": 120.0,
    "p_dis": 0.0,
    "v_dc": 780.5,
    "i_dc": -160.2,
    "t_cell_max": 31.5,
    "soh": 98.6,
    "alarms": [],
}


class Devices:
    async def organization_of(self, site: str, device: str) -> uuid.UUID | None:
        return ORG if (site, device) in {("site1", "bess1"), ("site1", "bess2")} else None


def message(payload: bytes | dict[str, Any], topic: str = TOPIC) -> IngestMessage:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return IngestMessage(topic=topic, payload=body, received_at=NOW, ingest_seq=7)


def stage() -> ValidateBess:
    return ValidateBess(Devices(), clock=lambda: NOW)


async def judged(bad: IngestMessage) -> Reject:
    """The bad message's reject; the good message right after it still passes."""
    validate = stage()
    [out] = await validate(bad)
    [good] = await validate(message(GOOD))
    assert isinstance(good, BessSample), good
    assert isinstance(out, Reject), out
    return out


async def test_a_valid_sample_becomes_a_sample_in_utc_with_its_owner() -> None:
    [out] = await stage()(message(GOOD))
    assert isinstance(out, BessSample)
    assert (out.organization_id, out.site, out.device) == (ORG, "site1", "bess1")
    assert out.ts == datetime(2025, 6, 1, 11, 59, 30, tzinfo=UTC)
    assert (out.soc, out.p, out.i_dc, out.alarms) == (57.1, -120.0, -160.2, ())
    assert out.warnings == ()


async def test_optional_fields_may_be_absent_or_null() -> None:
    [out] = await stage()(message({"ts": GOOD["ts"], "soc": 50, "p": 0, "soh": None}))
    assert isinstance(out, BessSample)
    assert (out.p_ch, out.soh, out.t_cell_max, out.alarms) == (None, None, None, ())


async def test_unknown_fields_are_ignored() -> None:
    [out] = await stage()(message({**GOOD, "firmware": "1.2", "nested": {"a": [1]}}))
    assert isinstance(out, BessSample)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"soc": None}, RejectReason.MISSING_FIELD),
        ({"p": None}, RejectReason.MISSING_FIELD),
        ({"ts": None}, RejectReason.MISSING_FIELD),
        ({"soc": True}, RejectReason.INVALID_NUMBER),
        ({"p": "12.5"}, RejectReason.INVALID_NUMBER),
        ({"v_dc": [1]}, RejectReason.INVALID_NUMBER),
        ({"soc": -0.1}, RejectReason.OUT_OF_RANGE),
        ({"soc": 100.01}, RejectReason.OUT_OF_RANGE),
        ({"p": 1_000_000.5}, RejectReason.OUT_OF_RANGE),
        ({"p": -1_000_001}, RejectReason.OUT_OF_RANGE),
        ({"p_ch": -1}, RejectReason.OUT_OF_RANGE),
        ({"p_dis": -0.5}, RejectReason.OUT_OF_RANGE),
        ({"v_dc": -3}, RejectReason.OUT_OF_RANGE),
        ({"t_cell_max": -60.5}, RejectReason.OUT_OF_RANGE),
        ({"t_cell_max": 150.1}, RejectReason.OUT_OF_RANGE),
        ({"soh": 101}, RejectReason.OUT_OF_RANGE),
        ({"alarms": "OVERTEMP"}, RejectReason.OUT_OF_RANGE),
        ({"alarms": [""]}, RejectReason.OUT_OF_RANGE),
        ({"alarms": ["x" * 65]}, RejectReason.OUT_OF_RANGE),
        ({"alarms": [f"a{i}" for i in range(65)]}, RejectReason.OUT_OF_RANGE),
        ({"alarms": [1]}, RejectReason.OUT_OF_RANGE),
        ({"ts": "2025-06-01T12:00:00"}, RejectReason.INVALID_TIMESTAMP),
        ({"ts": "yesterday"}, RejectReason.INVALID_TIMESTAMP),
        ({"site": "site2"}, RejectReason.TOPIC_MISMATCH),
        ({"device": "bess2"}, RejectReason.TOPIC_MISMATCH),
        ({"device": 1}, RejectReason.TOPIC_MISMATCH),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v),
)
async def test_a_bad_field_is_rejected_with_its_reason(
    change: dict[str, Any], reason: RejectReason
) -> None:
    out = await judged(message({**GOOD, **change}))
    assert out.reason == reason
    assert out.detail


@pytest.mark.parametrize("missing", ["ts", "soc", "p"])
async def test_a_missing_required_field_is_missing_field(missing: str) -> None:
    out = await judged(message({k: v for k, v in GOOD.items() if k != missing}))
    assert out.reason == RejectReason.MISSING_FIELD
    assert missing in out.detail


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", RejectReason.INVALID_JSON),
        (b"{", RejectReason.INVALID_JSON),
        (b'{"ts": "2025-06-01T12:00:00Z", "soc": NaN, "p": 1}', RejectReason.INVALID_NUMBER),
        (b'{"ts": "2025-06-01T12:00:00Z", "soc": 1, "soc": 2, "p": 1}', RejectReason.INVALID_JSON),
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT),
        (b"\xff\xfe", RejectReason.INVALID_JSON),
        (b"[" * 100_000, RejectReason.PAYLOAD_TOO_LARGE),
    ],
    ids=["empty", "truncated", "nan", "duplicate-key", "array", "not-utf8", "too-large"],
)
async def test_json_rules_are_those_of_meter_readings(payload: bytes, reason: RejectReason) -> None:
    assert (await judged(message(payload))).reason == reason


@pytest.mark.parametrize(
    "topic",
    ["bess/site1/telemetry", "bess/site 1/bess1/telemetry", "bess/site1/bess1/status",
     f"bess/{'s' * 65}/bess1/telemetry", "bess/site1/bess1/telemetry/x"],
)  # fmt: skip
async def test_a_bad_topic_is_invalid_topic(topic: str) -> None:
    assert (await judged(message(GOOD, topic))).reason == RejectReason.INVALID_TOPIC


async def test_an_unregistered_device_is_unknown_device() -> None:
    out = await judged(message(GOOD, "bess/site9/bess1/telemetry"))
    assert out.reason == RejectReason.UNKNOWN_DEVICE
    assert "site9/bess1" in out.detail


async def test_site_and_device_in_the_payload_may_repeat_the_topic() -> None:
    [out] = await stage()(message({**GOOD, "site": "site1", "device": "bess1"}))
    assert isinstance(out, BessSample)


async def test_a_reject_keeps_the_original_topic_and_payload() -> None:
    out = await judged(message({**GOOD, "soc": 500}))
    assert out.topic == TOPIC
    assert json.loads(out.payload)["soc"] == 500


async def test_a_sample_in_the_future_is_kept_with_a_warning() -> None:
    ahead = (NOW + timedelta(hours=1)).isoformat()
    [out] = await stage()(message({**GOOD, "ts": ahead}))
    assert isinstance(out, BessSample)
    assert out.warnings == ("future_timestamp",)


@pytest.mark.parametrize(
    ("p", "p_ch", "p_dis", "warned"),
    [
        (-120.0, 120.0, 0.0, False),  # balanced
        (100.0, 0.0, 104.9, False),  # 4.9 kW off, within 5 % of 100 kW
        (100.0, 0.0, 105.1, True),  # 5.1 kW off
        (10.0, 0.0, 10.9, False),  # under 1 kW off
        (10.0, 0.0, 11.1, True),  # over 1 kW off: 5 % of 10 kW is less than 1 kW
        (-120.0, 0.0, 120.0, True),  # the guide's example: signs the other way round
    ],
)
async def test_power_balance_warns_when_p_ch_and_p_dis_do_not_add_up_to_p(
    p: float, p_ch: float, p_dis: float, warned: bool
) -> None:
    [out] = await stage()(message({**GOOD, "p": p, "p_ch": p_ch, "p_dis": p_dis}))
    assert isinstance(out, BessSample)
    assert ("power_balance" in out.warnings) is warned


async def test_power_balance_needs_both_p_ch_and_p_dis() -> None:
    [out] = await stage()(message({**GOOD, "p": 500.0, "p_ch": None, "p_dis": 0.0}))
    assert isinstance(out, BessSample)
    assert out.warnings == ()


async def test_warnings_are_counted_and_the_latest_sample_sets_the_gauges() -> None:
    metrics = Metrics()
    validate = stage()
    late = {**GOOD, "ts": "2025-06-01T11:00:00Z", "soc": 10.0}
    for payload in (GOOD, {**GOOD, "p": 500.0, "p_ch": 0.0, "p_dis": 0.0}, late):
        [out] = await validate(message(payload))
        metrics.validated(out)
    sample = metrics.registry.get_sample_value
    labels = {"site": "site1", "device": "bess1"}
    assert sample("bess_plausibility_warnings_total", {"check": "power_balance"}) == 1
    assert sample("bess_soc_percent", labels) == 57.1  # the late sample (11:00) does not win
    assert sample("bess_power_kw", labels) == 500.0
    assert sample("bess_cell_temperature_max_celsius", labels) == 31.5
    assert sample("bess_alarms_active", labels) == 0
    assert (
        sample("bess_last_telemetry_timestamp_seconds", labels)
        == datetime(2025, 6, 1, 11, 59, 30, tzinfo=UTC).timestamp()
    )


async def test_a_sample_older_than_the_raw_retention_is_too_old() -> None:
    validate = ValidateBess(Devices(), clock=lambda: NOW, retention=timedelta(days=7))
    old = {**GOOD, "ts": (NOW - timedelta(days=7, minutes=1)).isoformat()}
    [out] = await validate(message(old))
    [good] = await validate(message(GOOD))
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.TOO_OLD
    assert isinstance(good, BessSample)
