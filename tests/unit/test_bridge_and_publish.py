"""The pure halves of `mqtt_bridge` and `publish`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from stages.mqtt_bridge import UNROUTABLE_SUBJECT, ingest_subject, to_ingest
from stages.publish import to_message

ORG = "550e8400-e29b-41d4-a716-446655440000"


def test_topic_maps_to_its_ingest_subject() -> None:
    assert ingest_subject(f"zev/{ORG}/12/messwert") == f"ingest.{ORG}.12"


@pytest.mark.parametrize(
    "topic",
    [
        f"zev/{ORG}/1.2/messwert",
        f"zev/{ORG}/*/messwert",
        f"zev/{ORG}/>/messwert",
        f"zev/{ORG}/1 2/messwert",
        f"zev/{ORG}//messwert",
        f"zev/{'a' * 300}/1/messwert",
        f"zev/{ORG}/1/messwert/extra",
        "zev",
    ],
)
def test_topic_tokens_unsafe_for_nats_go_to_the_unroutable_subject(topic: str) -> None:
    assert ingest_subject(topic) == UNROUTABLE_SUBJECT


def test_envelope_carries_payload_untouched() -> None:
    raw = b'{"timestamp":"x",  "verbrauch" :1}'
    at = datetime(2025, 1, 1, tzinfo=UTC)
    envelope = to_ingest(f"zev/{ORG}/1/messwert", raw, at, 64 * 1024)
    assert (envelope.payload, envelope.received_at, envelope.topic) == (
        raw,
        at,
        f"zev/{ORG}/1/messwert",
    )


def test_outbox_row_becomes_the_contract_message() -> None:
    row = {
        "organization_id": uuid.UUID(ORG),
        "einheit_id": 7,
        "zeit": datetime(2025, 3, 30, 1, 15, tzinfo=UTC),
        "verbrauch": Decimal("1.2000"),
        "einspeisung": Decimal("0.1000"),
        "anzahl_rohwerte": 3,
        "quelle": "MQTT",
        "revision": 2,
    }
    message = to_message(row)
    assert json.loads(message.to_json()) == {
        "organizationId": ORG,
        "einheitId": 7,
        "zeit": "2025-03-30T01:15:00Z",
        "intervalStart": "2025-03-30T01:00:00Z",
        "verbrauch": 1.2,
        "einspeisung": 0.1,
        "anzahlRohwerte": 3,
        "quelle": "MQTT",
        "revision": 2,
    }
    assert message.subject == f"messwerte.{ORG}.7"
    assert message.msg_id == "7:2025-03-30T01:15:00Z:2"


def test_large_sums_survive_as_exact_json_numbers() -> None:
    row = {
        "organization_id": uuid.UUID(ORG),
        "einheit_id": 7,
        "zeit": datetime(2025, 1, 1, tzinfo=UTC),
        "verbrauch": Decimal("99999999.9999"),
        "einspeisung": Decimal("0.0001"),
        "anzahl_rohwerte": 1,
        "quelle": "MQTT",
        "revision": 1,
    }
    decoded = json.loads(to_message(row).to_json(), parse_float=Decimal)
    assert (decoded["verbrauch"], decoded["einspeisung"]) == (
        Decimal("99999999.9999"),
        Decimal("0.0001"),
    )
