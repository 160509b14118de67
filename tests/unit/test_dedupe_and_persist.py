"""Stages `dedupe` and the pure half of `persist`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from schemas.messages import Reading
from stages.dedupe import Dedupe
from stages.persist import collapse

ORG = uuid.uuid4()
T = datetime(2025, 1, 1, 14, 5, tzinfo=UTC)


def reading(
    seq: int, verbrauch: str = "1.5", unit: int = 1, at: datetime = T, redelivered: bool = False
) -> Reading:
    return Reading(
        organization_id=ORG,
        einheit_id=unit,
        timestamp=at,
        verbrauch=Decimal(verbrauch),
        einspeisung=Decimal("0"),
        received_at=T,
        ingest_seq=seq,
        redelivered=redelivered,
    )


def test_exact_repeat_is_dropped() -> None:
    dedupe = Dedupe()
    assert dedupe(reading(1)) == [reading(1)]
    assert dedupe(reading(2)) == []
    assert dedupe.duplicates == 1


def test_same_value_written_differently_is_a_repeat() -> None:
    dedupe = Dedupe()
    dedupe(reading(1, "1.5"))
    assert dedupe(reading(2, "1.5000")) == []


def test_changed_values_pass_as_an_update() -> None:
    dedupe = Dedupe()
    dedupe(reading(1, "1.5"))
    assert dedupe(reading(2, "2.0")) == [reading(2, "2.0")]


def test_reverting_to_an_earlier_value_is_an_update_not_a_repeat() -> None:
    dedupe = Dedupe()
    dedupe(reading(1, "1.5"))
    dedupe(reading(2, "2.0"))
    assert dedupe(reading(3, "1.5")) == [reading(3, "1.5")]


def test_redelivery_of_the_same_message_passes_again() -> None:
    """Its first pass may never have reached the next subject; downstream is idempotent."""
    dedupe = Dedupe()
    dedupe(reading(5))
    assert dedupe(reading(5)) == [reading(5)]


def test_other_units_and_timestamps_are_independent() -> None:
    dedupe = Dedupe()
    dedupe(reading(1))
    assert dedupe(reading(2, unit=2)) != []
    assert dedupe(reading(3, at=T.replace(minute=6))) != []


def test_an_older_reading_after_a_newer_one_passes_and_leaves_the_state() -> None:
    """Persist decides (it keeps the newer); the repeat of the newer is still recognised."""
    dedupe = Dedupe()
    dedupe(reading(20, "2.0"))
    assert dedupe(reading(10, "1.0")) == [reading(10, "1.0")]
    assert dedupe(reading(30, "2.0")) == []


def test_a_redelivered_reading_passes_without_setting_the_state() -> None:
    """After a restart it may be older than the row; a later genuine repeat of its value must
    not be dropped as a duplicate of it."""
    dedupe = Dedupe()
    assert dedupe(reading(10, "1.0", redelivered=True)) == [reading(10, "1.0", redelivered=True)]
    assert dedupe(reading(30, "1.0")) == [reading(30, "1.0")]


def test_x_then_y_redelivered_then_x_again_passes_the_second_x() -> None:
    """Y reaches dedupe as a redelivery (or a failover's replay) between two X: the row then
    holds Y, so the second X is no repeat of what is stored and must pass (design §14)."""
    dedupe = Dedupe()
    assert dedupe(reading(10, "1.0")) == [reading(10, "1.0")]
    assert dedupe(reading(20, "2.0", redelivered=True)) == [reading(20, "2.0", redelivered=True)]
    assert dedupe(reading(30, "1.0")) == [reading(30, "1.0")]


def test_collapse_keeps_the_reading_latest_in_broker_order() -> None:
    batch = [reading(5, "2.0"), reading(3, "1.0")]  # a redelivery of 3 fetched after 5
    assert [r.verbrauch for r in collapse(batch)] == [Decimal("2.0")]


def test_collapse_keeps_the_later_reading_of_a_key() -> None:
    batch = [reading(1, "1.0"), reading(2, "9.0", unit=2), reading(3, "2.0")]
    collapsed = collapse(batch)
    assert [(r.einheit_id, r.verbrauch) for r in collapsed] == [
        (1, Decimal("2.0")),
        (2, Decimal("9.0")),
    ]


def test_collapse_orders_by_key() -> None:
    batch = [reading(1, unit=3), reading(2, unit=1), reading(3, unit=2)]
    assert [r.einheit_id for r in collapse(batch)] == [1, 2, 3]


def test_dedupe_forgets_the_least_recently_seen_key_beyond_its_capacity() -> None:
    """Bounded memory: with room for two keys, a third evicts the one seen longest ago, whose
    repeat then passes on (persist's upsert ignores it); a recently seen one is still caught."""
    dedupe = Dedupe(capacity=2)
    dedupe(reading(1, unit=1))
    dedupe(reading(2, unit=2))
    assert dedupe(reading(3, unit=1)) == []  # unit 1 seen again: now the most recent
    dedupe(reading(4, unit=3))  # evicts unit 2
    assert dedupe(reading(5, unit=2)) == [reading(5, unit=2)]  # evicts unit 1
    assert dedupe(reading(6, unit=3)) == []
