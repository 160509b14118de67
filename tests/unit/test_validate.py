"""Stage `validate`: unit checks, future readings, and that a good message survives a bad one."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from schemas.messages import IngestMessage, Reading, Reject, RejectReason
from stages.validate import Validate

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
OTHER_ORG = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
NOW = datetime(2025, 12, 24, 15, 0, tzinfo=UTC)


class Units:
    def __init__(self, units: dict[int, uuid.UUID]) -> None:
        self.units = units

    async def organization_of(self, einheit_id: int) -> uuid.UUID | None:
        return self.units.get(einheit_id)


def message(unit: int = 7, org: uuid.UUID = ORG, seq: int = 1, **fields: object) -> IngestMessage:
    body = {
        "timestamp": "2025-12-24T14:30:00+01:00",
        "verbrauch": 1.5,
        "einspeisung": 0.25,
        **fields,
    }
    return IngestMessage(
        topic=f"zev/{org}/{unit}/messwert",
        payload=json.dumps(body).encode(),
        received_at=NOW,
        ingest_seq=seq,
    )


def stage() -> Validate:
    return Validate(Units({7: ORG, 8: OTHER_ORG}), clock=lambda: NOW)


async def test_valid_message_becomes_a_reading_in_utc() -> None:
    [out] = await stage()(message())
    assert isinstance(out, Reading)
    assert (out.organization_id, out.einheit_id) == (ORG, 7)
    assert out.timestamp == datetime(2025, 12, 24, 13, 30, tzinfo=UTC)
    assert out.timestamp.utcoffset() == timedelta(0)
    assert out.ingest_seq == 1


async def test_unknown_unit_is_rejected_with_its_reason() -> None:
    [out] = await stage()(message(unit=99))
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.UNKNOWN_UNIT
    assert "99" in out.detail


async def test_unit_of_another_organization_is_rejected_and_logged_as_error(capsys) -> None:
    from pipeline.logging import configure

    configure("json", "info")
    [out] = await stage()(message(unit=8))
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.ORGANIZATION_MISMATCH
    logged = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    assert any(e["level"] == "error" and e["reason"] == "organization_mismatch" for e in logged)


async def test_reading_in_the_future_is_kept_with_a_warning(capsys) -> None:
    from pipeline.logging import configure

    configure("json", "info")
    future = (NOW + timedelta(days=1)).isoformat()
    [out] = await stage()(message(timestamp=future))
    assert isinstance(out, Reading)
    logged = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    assert any(e["level"] == "warning" and "future" in e["event"] for e in logged)


async def test_reject_keeps_original_topic_and_payload() -> None:
    bad = IngestMessage(
        topic=f"zev/{ORG}/7/messwert", payload=b"{oops", received_at=NOW, ingest_seq=3
    )
    [out] = await stage()(bad)
    assert isinstance(out, Reject)
    assert (out.topic, out.payload, out.payload_encoding) == (bad.topic, "{oops", "utf-8")
    assert out.reason == RejectReason.INVALID_JSON


async def test_reject_of_binary_payload_is_base64() -> None:
    import base64

    bad = IngestMessage(topic=f"zev/{ORG}/7/messwert", payload=b"\xff\x00", received_at=NOW)
    [out] = await stage()(bad)
    assert isinstance(out, Reject)
    assert out.payload_encoding == "base64"
    assert base64.b64decode(out.payload) == b"\xff\x00"


async def test_good_message_next_to_bad_ones_is_not_lost() -> None:
    validate = stage()
    batch = [
        message(seq=1, verbrauch="x"),
        message(seq=2),
        message(seq=3, unit=99),
        message(seq=4, timestamp="2025-12-24T14:45:00Z"),
    ]
    outputs = [out for msg in batch for out in await validate(msg)]
    assert [type(o).__name__ for o in outputs] == ["Reject", "Reading", "Reject", "Reading"]
    assert [o.ingest_seq for o in outputs if isinstance(o, Reading)] == [2, 4]


async def test_payload_cut_by_the_bridge_is_rejected_as_too_large_with_its_real_size() -> None:
    from stages.mqtt_bridge import OVERSIZE_KEPT_BYTES, to_ingest

    huge = b"{" + b" " * (5 * 1024 * 1024) + b"}"
    envelope = to_ingest(f"zev/{ORG}/7/messwert", huge, NOW, 64 * 1024)
    assert len(envelope.payload) == OVERSIZE_KEPT_BYTES
    [out] = await stage()(envelope)
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.PAYLOAD_TOO_LARGE
    assert str(len(huge)) in out.detail


def test_payload_within_the_limit_travels_untouched() -> None:
    from stages.mqtt_bridge import to_ingest

    raw = b'{"timestamp": 1}'
    envelope = to_ingest(f"zev/{ORG}/7/messwert", raw, NOW, 64 * 1024)
    assert (envelope.payload, envelope.payload_size) == (raw, None)


async def test_a_parser_bug_rejects_the_message_instead_of_blocking_the_stage(monkeypatch) -> None:
    import stages.validate as module

    def explode(payload: bytes, max_bytes: int) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(module, "parse_payload", explode)
    [out] = await stage()(message())
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.UNDECODABLE
    assert "ZeroDivisionError" in out.detail


async def test_reading_older_than_the_raw_retention_is_too_old_and_the_next_one_taken() -> None:
    validate = Validate(Units({7: ORG}), clock=lambda: NOW, retention=timedelta(days=30))
    old = (NOW - timedelta(days=30, seconds=1)).isoformat()
    inside = (NOW - timedelta(days=29, hours=23)).isoformat()
    [out] = await validate(message(timestamp=old))
    [good] = await validate(message(timestamp=inside, seq=2))
    assert isinstance(out, Reject)
    assert out.reason == RejectReason.TOO_OLD
    assert "30 days" in out.detail
    assert isinstance(good, Reading)


async def test_without_a_raw_retention_no_reading_is_too_old() -> None:
    [out] = await stage()(message(timestamp="1990-01-01T00:00:00Z"))
    assert isinstance(out, Reading)
