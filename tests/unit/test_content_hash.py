"""A reading's content hash: what dedupe compares and internal message ids carry (design §7).

It must be equal for equal readings (values as numbers, the instant not its notation),
different whenever a value differs, and the same in every process of a deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from schemas.messages import Reading

ORG = uuid.UUID("6f1c1f4e-3a4b-4c5d-8e9f-0a1b2c3d4e5f")
T = datetime(2025, 1, 1, 14, 5, tzinfo=UTC)


def reading(
    verbrauch: str = "1.5",
    einspeisung: str = "0",
    zaehlerstand: str | None = None,
    at: datetime = T,
    unit: int = 1,
) -> Reading:
    return Reading(
        organization_id=ORG,
        einheit_id=unit,
        timestamp=at,
        verbrauch=Decimal(verbrauch),
        einspeisung=Decimal(einspeisung),
        zaehlerstand_verbrauch=None if zaehlerstand is None else Decimal(zaehlerstand),
        received_at=T,
    )


def test_values_equal_as_numbers_hash_equal() -> None:
    assert reading("1.5").content_hash == reading("1.5000").content_hash
    assert reading("0").content_hash == reading("0.0000").content_hash


def test_the_instant_counts_not_its_offset() -> None:
    zurich = T.astimezone(timezone(timedelta(hours=1)))
    assert reading(at=zurich).content_hash == reading(at=T).content_hash


def test_every_four_place_value_hashes_apart() -> None:
    """One-to-one over the values validate lets through: 0 to 10**8, 4 places."""
    values = [f"{n / 10_000:.4f}" for n in range(20_000)] + ["99999999.9999", "12345678.0001"]
    assert len({reading(v).content_hash for v in values}) == len(values)


def test_a_missing_count_differs_from_a_count_of_zero() -> None:
    assert reading(zaehlerstand=None).content_hash != reading(zaehlerstand="0").content_hash


def test_values_swapped_between_fields_differ() -> None:
    assert reading("1.5", "0.5").content_hash != reading("0.5", "1.5").content_hash


def test_key_is_part_of_the_hash() -> None:
    assert reading(unit=1).content_hash != reading(unit=2).content_hash
    assert reading(at=T).content_hash != reading(at=T + timedelta(microseconds=1)).content_hash


def test_the_same_in_every_process() -> None:
    """str hashes differ per process (PYTHONHASHSEED); this hash must not, or a replica's
    redelivery would carry another message id than the original."""
    code = (
        "from tests.unit.test_content_hash import reading;"
        "print(reading('1.5', '0.25', '12345.6789').content_hash)"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "random")
    }
    assert seen == {reading("1.5", "0.25", "12345.6789").content_hash}
