"""Raw-data retention against a real PostgreSQL: what `prune` deletes and what it never touches,
and `too_old` at persist."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from pipeline.database import TimedPool
from pipeline.prune import METERS, SLACK, bess_table, cutoff, prune
from schemas.bess import BessSample
from schemas.messages import Reading, Reject, RejectReason, interval_end
from stages.persist import Persist
from stages.persist_bess import BessTelemetry
from stages.window_aggregate import WindowAggregate
from stages.window_aggregate_bess import WindowAggregateBess

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
NOW = datetime(2026, 6, 10, 12, 7, 30, tzinfo=UTC)
KEEP = timedelta(days=2)
GRACE = timedelta(seconds=60)
#: The last quarter hour whose rows retention lets go at NOW.
CUT = cutoff(NOW, KEEP, GRACE, METERS)


@pytest.fixture
async def pool(database: str):
    raw = await asyncpg.create_pool(database, min_size=1, max_size=6)
    await raw.execute("INSERT INTO einheit (id, organization_id) VALUES (1, $1), (2, $1)", ORG)
    yield TimedPool(raw, acquire_s=10, statement_s=30)
    await raw.close()


def reading(at: datetime, verbrauch: str = "1.0", unit: int = 1, seq: int = 1) -> Reading:
    return Reading(
        organization_id=ORG,
        einheit_id=unit,
        timestamp=at,
        verbrauch=Decimal(verbrauch),
        einspeisung=Decimal("0"),
        received_at=at,
        ingest_seq=seq,
    )


async def store_and_sum(pool: TimedPool, readings: list[Reading]) -> None:
    await Persist(pool)(readings)
    await WindowAggregate(pool, grace=GRACE, clock=lambda: NOW).sweep()


async def raw_times(pool: TimedPool) -> set[datetime]:
    return {r["timestamp"] for r in await pool.fetch("SELECT timestamp FROM zaehler_rohdaten")}


async def run_prune(pool: TimedPool, **kw) -> int:
    results = await prune(pool, (METERS,), retention=KEEP, grace=GRACE, now=NOW, **kw)
    return results[0].rows


def test_cutoff_is_a_quarter_hour_behind_the_horizon_by_the_slack_and_never_after_grace() -> None:
    # NOW - 2 days - 5 min = 2026-06-08 12:02:30, down to its quarter hour.
    assert datetime(2026, 6, 8, 12, 0, tzinfo=UTC) == CUT
    tiny = cutoff(NOW, timedelta(seconds=1), timedelta(hours=2), METERS)
    assert tiny <= NOW - timedelta(hours=2)


async def test_prune_deletes_processed_rows_at_or_before_the_cutoff_and_keeps_the_rest(
    pool,
) -> None:
    old = [CUT - timedelta(minutes=m) for m in (0, 3, 14, 15, 16, 200)]
    young = [CUT + timedelta(microseconds=1), CUT + timedelta(minutes=5), NOW - timedelta(hours=1)]
    await store_and_sum(pool, [reading(t) for t in old + young])
    deleted = await run_prune(pool)
    assert deleted == len(old)
    assert await raw_times(pool) == set(young)
    # The sums stay: prune deletes raw rows, never an aggregate.
    intervals = {interval_end(t) for t in old + young}
    assert await pool.fetchval("SELECT count(*) FROM messwerte") == len(intervals)


async def test_prune_never_deletes_unprocessed_rows(pool) -> None:
    old = CUT - timedelta(days=1)
    await Persist(pool)([reading(old), reading(old - timedelta(minutes=1))])  # never summed
    assert await run_prune(pool) == 0
    assert await raw_times(pool) == {old, old - timedelta(minutes=1)}


async def test_prune_keeps_every_row_of_an_interval_marked_due(pool) -> None:
    """A corrected row makes its whole interval due again: its processed siblings stay, or the
    re-sum would be partial."""
    end = CUT - timedelta(hours=1)
    rows = [end - timedelta(minutes=m) for m in (1, 5, 10)]
    await store_and_sum(pool, [reading(t) for t in rows])
    await Persist(pool)([reading(rows[0], "7.0", seq=2)])  # a correction, not yet summed
    assert await run_prune(pool) == 0
    assert await raw_times(pool) == set(rows)


async def test_dry_run_counts_what_prune_then_deletes_and_changes_nothing(pool) -> None:
    times = [CUT - timedelta(minutes=m) for m in range(0, 120, 7)]
    await store_and_sum(pool, [reading(t) for t in times])
    counted = (await prune(pool, (METERS,), retention=KEEP, grace=GRACE, now=NOW, dry_run=True))[0]
    assert counted.rows == len(times)
    assert await raw_times(pool) == set(times)
    assert await run_prune(pool) == counted.rows


async def test_prune_goes_in_batches_until_nothing_is_left(pool) -> None:
    times = [CUT - timedelta(minutes=m) for m in range(50)]
    await store_and_sum(pool, [reading(t, unit=u) for t in times for u in (1, 2)])
    assert await run_prune(pool, batch=7) == 100
    assert await pool.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 0


async def test_prune_while_readings_stream_in_loses_nothing(pool) -> None:
    """Persist and aggregation go on while prune deletes old rows in small batches: every new
    reading is stored, and every new interval is summed from all of its readings."""
    old = [CUT - timedelta(minutes=m) for m in range(0, 600, 2)]
    await store_and_sum(pool, [reading(t, unit=u) for t in old for u in (1, 2)])
    start = NOW - timedelta(hours=3)
    new = [
        reading(start + timedelta(seconds=20 * i), f"0.{i % 10}1", unit=1 + i % 2, seq=i)
        for i in range(400)
    ]
    persist = Persist(pool)
    window = WindowAggregate(pool, grace=GRACE, clock=lambda: NOW)

    async def stream_in() -> None:
        for i in range(0, len(new), 10):
            await persist(new[i : i + 10])
            await window.sweep()

    pruned, _ = await asyncio.gather(run_prune(pool, batch=10), stream_in())
    await window.sweep()
    assert pruned == len(old) * 2
    assert await raw_times(pool) == {r.timestamp for r in new}
    expected: dict[tuple[int, datetime], Decimal] = {}
    for r in new:
        key = (r.einheit_id, interval_end(r.timestamp))
        expected[key] = expected.get(key, Decimal(0)) + r.verbrauch
    got = {
        (r["einheit_id"], r["zeit"]): r["verbrauch"]
        for r in await pool.fetch(
            "SELECT einheit_id, zeit, verbrauch FROM messwerte WHERE zeit > $1", CUT
        )
    }
    assert got == expected


async def test_persist_refuses_a_reading_that_grew_older_than_the_retention(pool) -> None:
    """It waited in a stream past the horizon: refused `too_old`; its batch-mate is stored."""
    persist = Persist(pool, retention=KEEP, clock=lambda: NOW)
    stale, fresh = reading(NOW - KEEP - timedelta(seconds=1)), reading(NOW - timedelta(hours=1))
    out = await persist([stale, fresh])
    rejects = [m for m in out if isinstance(m, Reject)]
    assert [r.reason for r in rejects] == [RejectReason.TOO_OLD]
    assert await raw_times(pool) == {fresh.timestamp}


def sample(at: datetime, p: float = 10.0) -> BessSample:
    return BessSample(
        organization_id=ORG,
        site="s1",
        device="d1",
        ts=at,
        soc=50.0,
        p=p,
        received_at=at,
        ingest_seq=1,
    )


async def test_bess_samples_are_kept_two_gaps_and_a_quarter_hour_longer(pool) -> None:
    """An interval's energy integrates across its edges: a sample still accepted may have an
    interval re-computed that reads samples that far back."""
    await pool.execute("INSERT INTO bess_device VALUES ('s1', 'd1', $1)", ORG)
    gap_s = 300.0
    table = bess_table(gap_s)
    bess_cut = cutoff(NOW, KEEP, GRACE, table)
    assert bess_cut <= NOW - KEEP - SLACK - timedelta(seconds=2 * gap_s) - timedelta(minutes=15)
    times = [bess_cut - timedelta(minutes=m) for m in range(0, 60, 1)]
    times += [bess_cut + timedelta(minutes=m) for m in range(1, 30)]
    await Persist(pool, BessTelemetry(gap_s))([sample(t) for t in times])
    await WindowAggregateBess(
        pool, grace=GRACE, max_gap_s=gap_s, settle_s=0, clock=lambda: NOW
    ).sweep()
    results = await prune(pool, (table,), retention=KEEP, grace=GRACE, now=NOW)
    kept = {r["ts"] for r in await pool.fetch("SELECT ts FROM bess_telemetry")}
    assert results[0].rows == 60
    assert kept == {t for t in times if t > bess_cut}
