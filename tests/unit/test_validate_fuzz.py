"""Property: no bytes and no topic crash the bridge's pure half or validate. Whatever comes in
becomes exactly one `Reading` or one `Reject`, and a `Reading` keeps the payload rules."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.messages import Reading, Reject
from stages.mqtt_bridge import UNROUTABLE_SUBJECT, ingest_subject, to_ingest
from stages.validate import Validate
from tests.corpus.hostile import GOOD, ORG_A, TOPIC
from tests.unit.test_hostile_corpus import Registered

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIMIT = 64 * 1024
SUBJECT = re.compile(r"ingest\.[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,64}")
FIELDS = [
    "timestamp",
    "verbrauch",
    "einspeisung",
    "zaehlerstandVerbrauch",
    "zaehlerstandEinspeisung",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
meter_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(
    lambda d: json.dumps(d).encode()
)
topics = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda org, unit: f"zev/{org}/{unit}/messwert",
        st.one_of(st.just(str(ORG_A)), st.uuids().map(str), st.text(max_size=40)),
        st.one_of(st.integers(-5, 10**20).map(str), st.text(max_size=20)),
    ),
)


def verdict(topic: str, payload: bytes) -> list[Any]:
    subject = ingest_subject(topic)
    assert subject == UNROUTABLE_SUBJECT or SUBJECT.fullmatch(subject)
    envelope = to_ingest(topic, payload, NOW, LIMIT)
    return asyncio.run(Validate(Registered())(envelope))


def check(outcome: list[Any]) -> None:
    assert len(outcome) == 1
    [out] = outcome
    assert isinstance(out, Reading | Reject)
    if isinstance(out, Reading):
        assert out.timestamp.tzinfo is not None
        for value in (out.verbrauch, out.einspeisung):
            assert Decimal(0) <= value < Decimal(10**8)
    else:
        assert out.detail


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(topic=topics, payload=st.binary(max_size=2048))
def test_no_bytes_and_no_topic_crash_validate(topic: str, payload: bytes) -> None:
    check(verdict(topic, payload))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(payload=meter_like)
def test_no_json_shaped_like_a_reading_crashes_validate(payload: bytes) -> None:
    check(verdict(TOPIC, payload))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(min_size=1, max_size=64))
def test_junk_after_a_good_payload_is_rejected_not_crashed(junk: bytes) -> None:
    check(verdict(TOPIC, GOOD + junk))
