"""Design §2/§3 at the payload level: each bad input is refused with its reason."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from schemas.messages import RejectReason
from stages.validate import Refused, parse_payload, parse_topic

GOOD = {"timestamp": "2025-12-24T14:30:00Z", "verbrauch": 1.25, "einspeisung": 0.0}


def payload(**changes: object) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def reason_of(raw: bytes) -> RejectReason:
    with pytest.raises(Refused) as caught:
        parse_payload(raw)
    return caught.value.reason


def test_a_good_payload_parses_with_exact_decimals() -> None:
    parsed = parse_payload(payload(verbrauch=0.1, zaehlerstandVerbrauch=12345.67))
    assert parsed.verbrauch == Decimal("0.1")
    assert parsed.zaehlerstand_verbrauch == Decimal("12345.67")
    assert parsed.zaehlerstand_einspeisung is None


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse_payload(payload(firmware="1.2.3", extra={"a": 1})).verbrauch == Decimal("1.25")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", RejectReason.INVALID_JSON),
        (b"   ", RejectReason.INVALID_JSON),
        (b"not json", RejectReason.INVALID_JSON),
        (b'{"timestamp": "2025-12-24T14:30:00Z",', RejectReason.INVALID_JSON),
        (b"\xff\xfe{}", RejectReason.INVALID_JSON),
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT),
        (b'"text"', RejectReason.NOT_AN_OBJECT),
        (b"42", RejectReason.NOT_AN_OBJECT),
        (b"null", RejectReason.NOT_AN_OBJECT),
        (b"[" * 5000 + b"]" * 5000, RejectReason.INVALID_JSON),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, RejectReason.INVALID_JSON),
    ],
)
def test_payload_that_is_not_a_json_object_is_rejected(raw: bytes, reason: RejectReason) -> None:
    assert reason_of(raw) == reason


def test_payload_over_the_size_limit_is_rejected() -> None:
    raw = payload(padding="x" * (64 * 1024))
    assert reason_of(raw) == RejectReason.PAYLOAD_TOO_LARGE


def test_duplicate_keys_are_rejected() -> None:
    raw = b'{"timestamp": "2025-12-24T14:30:00Z", "verbrauch": 1, "verbrauch": 2, "einspeisung": 0}'
    assert reason_of(raw) == RejectReason.INVALID_JSON


@pytest.mark.parametrize("field", ["timestamp", "verbrauch", "einspeisung"])
def test_missing_required_field_is_rejected(field: str) -> None:
    assert reason_of(payload(**{field: ...})) == RejectReason.MISSING_FIELD


@pytest.mark.parametrize("field", ["timestamp", "verbrauch", "einspeisung"])
def test_null_required_field_is_rejected(field: str) -> None:
    assert reason_of(payload(**{field: None})) == RejectReason.MISSING_FIELD


@pytest.mark.parametrize("value", [True, False, "1.5", [1], {"v": 1}])
def test_non_number_where_a_number_belongs_is_rejected(value: object) -> None:
    assert reason_of(payload(verbrauch=value)) == RejectReason.INVALID_NUMBER


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_rejected(literal: bytes) -> None:
    raw = b'{"timestamp": "2025-12-24T14:30:00Z", "verbrauch": ' + literal + b', "einspeisung": 0}'
    assert reason_of(raw) == RejectReason.INVALID_NUMBER


@pytest.mark.parametrize(
    "stamp",
    [
        "2025-12-24T14:30:00",  # no offset
        "2025-12-24",
        "24.12.2025 14:30",
        "1700000000",
        "2025-13-24T14:30:00Z",
        "2025-12-24T25:30:00Z",
        "yesterday",
        "",
        1700000000,
    ],
)
def test_timestamp_not_iso_8601_with_offset_is_rejected(stamp: object) -> None:
    assert reason_of(payload(timestamp=stamp)) == RejectReason.INVALID_TIMESTAMP


@pytest.mark.parametrize(
    ("stamp", "utc"),
    [
        ("2025-12-24T14:30:00+01:00", "2025-12-24T13:30:00+00:00"),
        ("2025-12-24T14:30:00.123456789Z", "2025-12-24T14:30:00.123456+00:00"),
        ("2025-12-24T14:30Z", "2025-12-24T14:30:00+00:00"),
        ("2025-12-24T14:30:00-0230", "2025-12-24T17:00:00+00:00"),
    ],
)
def test_timestamps_with_offsets_are_accepted(stamp: str, utc: str) -> None:
    from datetime import UTC

    assert parse_payload(payload(timestamp=stamp)).timestamp.astimezone(UTC).isoformat() == utc


@pytest.mark.parametrize("field", ["verbrauch", "einspeisung", "zaehlerstandVerbrauch"])
def test_negative_value_is_rejected(field: str) -> None:
    assert reason_of(payload(**{field: -0.5})) == RejectReason.NEGATIVE_VALUE


@pytest.mark.parametrize("value", [100_000_000, 1e20, 99999999.99995, 10**400])
def test_value_outside_numeric_12_4_is_rejected(value: object) -> None:
    raw = (
        json.dumps({**GOOD, "verbrauch": 0})
        .encode()
        .replace(b'"verbrauch": 0', b'"verbrauch": ' + str(value).encode())
    )
    assert reason_of(raw) == RejectReason.OUT_OF_RANGE


def test_largest_numeric_12_4_value_is_accepted() -> None:
    assert parse_payload(payload(verbrauch=99999999.9999)).verbrauch == Decimal("99999999.9999")


def test_values_round_to_four_decimals_as_postgresql_does() -> None:
    assert parse_payload(payload(verbrauch=0.00005)).verbrauch == Decimal("0.0001")
    assert parse_payload(payload(verbrauch=1.23454)).verbrauch == Decimal("1.2345")


def test_negative_zero_is_zero() -> None:
    assert str(parse_payload(payload(einspeisung=-0.0)).einspeisung) == "0.0000"


@pytest.mark.parametrize(
    "topic",
    [
        "zev/not-a-uuid/1/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/0/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/-3/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/abc/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/1.5/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/99999999999999999999/messwert",
        "zev/550e8400-e29b-41d4-a716-446655440000/1/other",
        "zev/550e8400-e29b-41d4-a716-446655440000/1",
        "foo/550e8400-e29b-41d4-a716-446655440000/1/messwert",
        "zev/{550e8400-e29b-41d4-a716-446655440000}/1/messwert",
    ],
)
def test_bad_topic_is_rejected(topic: str) -> None:
    with pytest.raises(Refused) as caught:
        parse_topic(topic)
    assert caught.value.reason == RejectReason.INVALID_TOPIC


def test_good_topic_parses() -> None:
    org, unit = parse_topic("zev/550e8400-e29b-41d4-a716-446655440000/123/messwert")
    assert str(org) == "550e8400-e29b-41d4-a716-446655440000"
    assert unit == 123


@pytest.mark.parametrize(
    "stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:00-14:00", "9999-12-31T23:50:00Z"]
)
def test_timestamp_outside_representable_utc_range_is_rejected(stamp: str) -> None:
    assert reason_of(payload(timestamp=stamp)) == RejectReason.INVALID_TIMESTAMP


def test_earliest_representable_timestamp_is_accepted() -> None:
    assert parse_payload(payload(timestamp="0001-01-01T00:00:00Z")).timestamp.year == 1
