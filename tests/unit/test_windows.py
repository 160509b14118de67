"""Design §5: a reading at t belongs to (end - 15 min, end], end = t rounded up to the quarter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schemas.messages import interval_end
from stages.window_aggregate import WindowAggregate

ZURICH = ZoneInfo("Europe/Zurich")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reading", "end"),
    [
        (utc(2025, 1, 1, 14, 15, 0), utc(2025, 1, 1, 14, 15)),
        (utc(2025, 1, 1, 14, 15, 0, 1000), utc(2025, 1, 1, 14, 30)),
        (utc(2025, 1, 1, 14, 15, 0, 1), utc(2025, 1, 1, 14, 30)),
        (utc(2025, 1, 1, 14, 0, 0, 1), utc(2025, 1, 1, 14, 15)),
        (utc(2025, 1, 1, 14, 14, 59, 999999), utc(2025, 1, 1, 14, 15)),
        (utc(2025, 1, 1, 23, 59, 59), utc(2025, 1, 2, 0, 0)),
        (utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 0)),
    ],
)
def test_interval_end_rounds_up_to_the_quarter_hour(reading: datetime, end: datetime) -> None:
    assert interval_end(reading) == end


def test_reading_on_the_quarter_closes_the_previous_interval_in_any_offset() -> None:
    local = datetime(2025, 6, 1, 16, 15, tzinfo=ZURICH)  # = 14:15 UTC
    assert interval_end(local) == utc(2025, 6, 1, 14, 15)


@pytest.mark.parametrize(
    "day",
    [datetime(2025, 3, 30, tzinfo=ZURICH), datetime(2025, 10, 26, tzinfo=ZURICH)],
    ids=["spring-forward", "fall-back"],
)
def test_dst_days_have_quarter_hours_on_local_quarters(day: datetime) -> None:
    """Every quarter of a DST day, in UTC steps, ends on a local quarter hour too."""
    start = day.astimezone(UTC)
    ends = set()
    for minute in range(0, 25 * 60, 5):
        moment = start + timedelta(minutes=minute, seconds=1)
        end = interval_end(moment)
        assert end.astimezone(ZURICH).minute % 15 == 0
        assert end - timedelta(minutes=15) < moment <= end
        ends.add(end)
    assert len(ends) == 25 * 4  # a 23- or 25-hour local day is still 15-minute steps in UTC


def test_interval_is_closed_only_after_end_plus_grace() -> None:
    now = [utc(2025, 1, 1, 14, 15, 59)]
    window = WindowAggregate(pool=None, grace=timedelta(seconds=60), clock=lambda: now[0])  # type: ignore[arg-type]
    assert not window.is_closed(utc(2025, 1, 1, 14, 15))
    now[0] = utc(2025, 1, 1, 14, 16, 0)
    assert window.is_closed(utc(2025, 1, 1, 14, 15))
    assert not window.is_closed(utc(2025, 1, 1, 14, 30))
