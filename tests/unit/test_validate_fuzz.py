"""Property: no bytes and no topic crash the bridge's pure half or validate, of either kind.
Whatever comes in becomes exactly one `Reading` (or `BessSample`) or one `Reject`, and what
passes keeps the payload rules."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.bess import BessSample
from schemas.messages import Reading, Reject
from stages.mqtt_bridge import ROUTES, ingest_subject, route_of, to_ingest
from stages.validate import Validate
from stages.validate_bess import ValidateBess
from tests.corpus.hostile import GOOD, ORG_A, TOPIC
from tests.unit.test_hostile_corpus import Registered

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIMIT = 64 * 1024
SUBJECT = re.compile(r"(bess\.)?ingest\.[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,64}")
UNROUTABLE = {route.unroutable for route in ROUTES}
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


class Devices:
    async def organization_of(self, site: str, device: str) -> Any:
        return ORG_A if (site, device) == ("site1", "bess1") else None


bess_like = st.dictionaries(
    st.sampled_from(["ts", "soc", "p", "p_ch", "p_dis", "v_dc", "i_dc", "t_cell_max", "soh",
                     "alarms", "site", "device"]),
    json_values,
    max_size=12,
).map(lambda d: json.dumps(d).encode())  # fmt: skip
topics = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda site, device: f"bess/{site}/{device}/telemetry",
        st.one_of(st.just("site1"), st.text(max_size=70)),
        st.one_of(st.just("bess1"), st.text(max_size=70)),
    ),
    st.builds(
        lambda org, unit: f"zev/{org}/{unit}/messwert",
        st.one_of(st.just(str(ORG_A)), st.uuids().map(str), st.text(max_size=40)),
        st.one_of(st.integers(-5, 10**20).map(str), st.text(max_size=20)),
    ),
)


def verdict(topic: str, payload: bytes) -> list[Any]:
    subject = ingest_subject(topic)
    assert subject in UNROUTABLE or SUBJECT.fullmatch(subject)
    envelope = to_ingest(topic, payload, NOW, LIMIT)
    if route_of(topic).kind == "bess":
        return asyncio.run(ValidateBess(Devices(), clock=lambda: NOW)(envelope))
    return asyncio.run(Validate(Registered())(envelope))


def check(outcome: list[Any]) -> None:
    assert len(outcome) == 1
    [out] = outcome
    assert isinstance(out, Reading | BessSample | Reject)
    if isinstance(out, BessSample):
        assert 0 <= out.soc <= 100
        assert abs(out.p) <= 1_000_000
    elif isinstance(out, Reading):
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


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(payload=bess_like)
def test_no_json_shaped_like_a_bess_sample_crashes_validate(payload: bytes) -> None:
    check(verdict("bess/site1/bess1/telemetry", payload))
