"""Every message of the hostile corpus is rejected by the stages with its reason, and the good
messages between them are not lost."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import pytest

from schemas.messages import Reading, Reject
from stages.mqtt_bridge import UNROUTABLE_SUBJECT, ingest_subject, to_ingest
from stages.validate import Validate
from stages.validate_bess import ValidateBess
from tests.corpus import hostile_bess
from tests.corpus.hostile import GOOD, HOSTILE, TOPIC, UNITS, Hostile

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIMIT = 64 * 1024


class Registered:
    async def organization_of(self, einheit_id: int) -> UUID | None:
        return UNITS.get(einheit_id)


def test_the_corpus_holds_at_least_50_messages() -> None:
    assert len(HOSTILE) >= 50
    assert len({h.name for h in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda h: h.name)
async def test_hostile_message_is_rejected_with_its_reason(case: Hostile) -> None:
    [out] = await Validate(Registered())(to_ingest(case.topic, case.payload, NOW, LIMIT))
    assert isinstance(out, Reject), out
    assert out.reason == case.reason, out.detail
    assert out.detail
    assert out.topic == case.topic


@pytest.mark.parametrize(
    "case", [h for h in HOSTILE if h.reason == "invalid_topic"], ids=lambda h: h.name
)
def test_hostile_topic_never_becomes_a_subject_of_its_own(case: Hostile) -> None:
    """A topic that could address other subjects (`.`, `*`, `>`) is routed nowhere special."""
    assert ingest_subject(case.topic) in (UNROUTABLE_SUBJECT, *_plain_subjects(case.topic))


def _plain_subjects(topic: str) -> tuple[str, ...]:
    parts = topic.split("/")
    return (f"ingest.{parts[1]}.{parts[2]}",) if len(parts) == 4 else ()


async def test_good_messages_between_hostile_ones_are_all_kept() -> None:
    validate = Validate(Registered())
    outcomes = []
    for case in HOSTILE:
        outcomes += await validate(to_ingest(case.topic, case.payload, NOW, LIMIT))
        outcomes += await validate(to_ingest(TOPIC, GOOD, NOW, LIMIT))
    readings = [o for o in outcomes if isinstance(o, Reading)]
    rejects = [o for o in outcomes if isinstance(o, Reject)]
    assert len(readings) == len(HOSTILE)
    assert [r.reason for r in rejects] == [h.reason for h in HOSTILE]


class Devices:
    async def organization_of(self, site: str, device: str) -> UUID | None:
        return hostile_bess.DEVICES.get((site, device))


def test_the_bess_corpus_holds_at_least_30_messages() -> None:
    assert len(hostile_bess.HOSTILE_BESS) >= 30
    assert len({h.name for h in hostile_bess.HOSTILE_BESS}) == len(hostile_bess.HOSTILE_BESS)


@pytest.mark.parametrize("case", hostile_bess.HOSTILE_BESS, ids=lambda h: h.name)
async def test_hostile_bess_message_is_rejected_with_its_reason_and_the_next_kept(
    case: Hostile,
) -> None:
    validate = ValidateBess(Devices(), clock=lambda: NOW)
    [out] = await validate(to_ingest(case.topic, case.payload, NOW, LIMIT))
    [good] = await validate(to_ingest(hostile_bess.TOPIC, hostile_bess.GOOD, NOW, LIMIT))
    assert isinstance(out, Reject), out
    assert out.reason == case.reason, out.detail
    assert out.detail
    assert out.topic == case.topic
    assert not isinstance(good, Reject), good
