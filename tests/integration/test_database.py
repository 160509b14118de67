"""persist and window_aggregate against a real PostgreSQL; migrations."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from pipeline.database import TimedPool
from pipeline.migrations import STEPS, migrate
from schemas.messages import Persisted, Reading, Reject, RejectReason
from stages.persist import Persist
from stages.window_aggregate import AggregationRun, WindowAggregate

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
END = datetime(2025, 3, 30, 1, 15, tzinfo=UTC)  # a quarter hour on the spring DST day


@pytest.fixture
async def pool(database: str):
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    await pool.execute("INSERT INTO einheit (id, organization_id) VALUES (1, $1), (2, $1)", ORG)
    yield pool
    await pool.close()


def reading(
    at: datetime, verbrauch: str, unit: int = 1, seq: int = 1, received: datetime | None = None
) -> Reading:
    return Reading(
        organization_id=ORG,
        einheit_id=unit,
        timestamp=at,
        verbrauch=Decimal(verbrauch),
        einspeisung=Decimal("0.1"),
        received_at=received or at,
        ingest_seq=seq,
    )


def window(pool, now: datetime, grace_s: float = 60) -> WindowAggregate:
    timed = TimedPool(pool, acquire_s=10, statement_s=30)
    return WindowAggregate(timed, grace=timedelta(seconds=grace_s), clock=lambda: now)


async def test_migrate_twice_applies_nothing_the_second_time(database: str) -> None:
    assert await migrate(database) == []


async def test_migrate_works_on_tables_the_zev_system_already_created(postgres_server) -> None:
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_server.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(postgres_server.dsn_for(name))
    try:
        await conn.execute(
            """CREATE TABLE einheit (id BIGINT PRIMARY KEY, organization_id UUID NOT NULL, name TEXT);
               CREATE TABLE messwerte (id BIGSERIAL PRIMARY KEY, einheit_id BIGINT NOT NULL REFERENCES einheit(id),
                   zeit TIMESTAMPTZ NOT NULL, verbrauch DECIMAL(12,4) NOT NULL, einspeisung DECIMAL(12,4) NOT NULL);
               INSERT INTO einheit VALUES (1, '550e8400-e29b-41d4-a716-446655440000', 'Whg 1');
               INSERT INTO messwerte (einheit_id, zeit, verbrauch, einspeisung) VALUES (1, '2025-01-01 00:15+00', 1, 2);"""
        )
        assert await migrate(postgres_server.dsn_for(name)) == [v for v, _, _ in STEPS]
        row = await conn.fetchrow("SELECT verbrauch, quelle, revision FROM messwerte")
        assert (row["verbrauch"], row["quelle"], row["revision"]) == (Decimal("1.0000"), "CSV", 0)
        unique = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'messwerte' AND indexdef LIKE '%UNIQUE%(einheit_id, zeit)%'"
        )
        assert unique == 1
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_batch_holding_one_key_twice_keeps_the_later_reading(pool) -> None:
    at = END - timedelta(minutes=5)
    out = await Persist(pool)([reading(at, "1.0", seq=1), reading(at, "2.0", seq=2)])
    assert [p.ingest_seq for p in out if isinstance(p, Persisted)] == [2]
    assert await pool.fetchval("SELECT verbrauch FROM zaehler_rohdaten") == Decimal("2.0000")


async def test_unchanged_repeat_is_a_no_op_and_a_change_resets_verarbeitet(pool) -> None:
    at = END - timedelta(minutes=5)
    persist = Persist(pool)
    await persist([reading(at, "1.0")])
    await pool.execute("UPDATE zaehler_rohdaten SET verarbeitet = TRUE, verarbeitet_am = NOW()")
    assert await persist([reading(at, "1.0000", seq=2)]) == []
    assert await pool.fetchval("SELECT verarbeitet FROM zaehler_rohdaten") is True
    assert len(await persist([reading(at, "1.5", seq=3)])) == 1
    row = await pool.fetchrow("SELECT verbrauch, verarbeitet, verarbeitet_am FROM zaehler_rohdaten")
    assert (row["verbrauch"], row["verarbeitet"], row["verarbeitet_am"]) == (
        Decimal("1.5000"),
        False,
        None,
    )


async def test_poison_row_does_not_fail_its_batch_mates(pool) -> None:
    at = END - timedelta(minutes=5)
    out = await Persist(pool)(
        [reading(at, "1.0", unit=1), reading(at, "1.0", unit=77), reading(at, "1.0", unit=2)]
    )
    rejects = [o for o in out if isinstance(o, Reject)]
    assert [r.reason for r in rejects] == [RejectReason.PERSIST_FAILED]
    assert "77" in rejects[0].topic
    assert await pool.fetchval("SELECT count(*) FROM zaehler_rohdaten") == 2


async def test_interval_closes_only_after_end_plus_grace(pool) -> None:
    await Persist(pool)([reading(END - timedelta(minutes=10), "1.0")])
    assert await window(pool, END + timedelta(seconds=59)).sweep() == AggregationRun()
    assert await pool.fetchval("SELECT count(*) FROM messwerte") == 0
    run = await window(pool, END + timedelta(seconds=60)).sweep()
    assert (run.intervals, run.marked, run.changed) == (1, 1, 1)


async def test_aggregation_sums_the_whole_interval_and_marks_every_row(pool) -> None:
    readings = [reading(END - timedelta(minutes=m), str(m)) for m in (0, 5, 10)]
    readings.append(reading(END - timedelta(minutes=15), "100"))  # previous interval
    readings.append(reading(END + timedelta(microseconds=1), "100"))  # next interval
    await Persist(pool)(readings)
    await window(pool, END + timedelta(hours=1)).sweep()
    rows = {r["zeit"]: r for r in await pool.fetch("SELECT * FROM messwerte")}
    row = rows[END]
    assert (
        row["verbrauch"],
        row["einspeisung"],
        row["anzahl_rohwerte"],
        row["quelle"],
        row["revision"],
    ) == (
        Decimal("15.0000"),
        Decimal("0.3000"),
        3,
        "MQTT",
        1,
    )
    assert set(rows) == {END - timedelta(minutes=15), END, END + timedelta(minutes=15)}
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM zaehler_rohdaten WHERE NOT verarbeitet OR verarbeitet_am IS NULL"
        )
        == 0
    )
    assert await pool.fetchval("SELECT count(*) FROM messwerte_outbox") == 3


async def test_correction_raises_the_revision_and_queues_it(pool) -> None:
    at = END - timedelta(minutes=5)
    persist, sweep = Persist(pool), window(pool, END + timedelta(hours=1)).sweep
    await persist([reading(at, "1.0"), reading(at - timedelta(minutes=1), "1.0", seq=2)])
    await sweep()
    await persist([reading(at, "3.0", seq=3)])
    run = await sweep()
    assert run.changed == 1
    outbox = await pool.fetch("SELECT verbrauch, revision FROM messwerte_outbox ORDER BY id")
    assert [(r["verbrauch"], r["revision"]) for r in outbox] == [
        (Decimal("2.0000"), 1),
        (Decimal("4.0000"), 2),
    ]


async def test_re_aggregating_unchanged_data_publishes_nothing_new(pool) -> None:
    at = END - timedelta(minutes=5)
    await Persist(pool)([reading(at, "1.0")])
    aggregate = window(pool, END + timedelta(hours=1))
    await aggregate.sweep()
    run = await aggregate.aggregate([(1, END)])
    assert (run.intervals, run.changed) == (1, 0)
    assert await pool.fetchval("SELECT revision FROM messwerte") == 1
    assert await pool.fetchval("SELECT count(*) FROM messwerte_outbox") == 1


async def test_no_raw_rows_no_messwerte_row(pool) -> None:
    run = await window(pool, END + timedelta(hours=1)).aggregate([(1, END)])
    assert run.intervals == 0
    assert await pool.fetchval("SELECT count(*) FROM messwerte") == 0


async def test_existing_csv_row_is_taken_over_as_revision_1(pool) -> None:
    await pool.execute(
        "INSERT INTO messwerte (einheit_id, zeit, verbrauch, einspeisung) VALUES (1, $1, 9, 9)", END
    )
    await Persist(pool)([reading(END - timedelta(minutes=1), "1.0")])
    await window(pool, END + timedelta(hours=1)).sweep()
    row = await pool.fetchrow("SELECT verbrauch, quelle, revision FROM messwerte")
    assert (row["verbrauch"], row["quelle"], row["revision"]) == (Decimal("1.0000"), "MQTT", 1)


async def test_sql_and_python_agree_on_interval_ends(pool) -> None:
    from schemas.messages import interval_end

    moments = [
        END + timedelta(microseconds=us)
        for us in (-1, 0, 1, 1000, 899_999_999, 900_000_000, 900_000_001)
    ]
    for moment in moments:
        assert await pool.fetchval("SELECT messwerte_interval_end($1)", moment) == interval_end(
            moment
        )


async def test_interval_whose_sum_overflows_does_not_hold_up_the_others(pool) -> None:
    big = [reading(END - timedelta(minutes=m), "99999999.9999") for m in (1, 2)]
    fine = reading(END + timedelta(minutes=5), "1.0")
    await Persist(pool)([*big, fine])
    aggregate = window(pool, END + timedelta(hours=1))
    run = await aggregate.sweep()
    assert run.intervals == 1
    assert aggregate.poisoned == {(1, END)}
    assert await pool.fetchval("SELECT verbrauch FROM messwerte") == Decimal("1.0000")


async def test_overflowing_interval_is_retried_once_a_row_of_it_changes(pool) -> None:
    at = END - timedelta(minutes=1)
    persist = Persist(pool)
    await persist([reading(at, "99999999.9999"), reading(at - timedelta(minutes=1), "1")])
    aggregate = window(pool, END + timedelta(hours=1))
    await aggregate.sweep()
    assert (await aggregate.sweep()).intervals == 0  # not retried while nothing changed
    aggregate([p for p in await persist([reading(at, "2", seq=2)]) if isinstance(p, Persisted)])
    assert (await aggregate.sweep()).intervals == 1
    assert await pool.fetchval("SELECT verbrauch FROM messwerte") == Decimal("3.0000")


async def stored(pool, at: datetime) -> Decimal:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT verbrauch FROM zaehler_rohdaten WHERE einheit_id = 1 AND timestamp = $1", at
    )


async def test_redelivery_arriving_after_a_newer_reading_does_not_overwrite_it(pool) -> None:
    """After a crash JetStream redelivers the old batch behind newer messages."""
    at = END - timedelta(minutes=5)
    persist = Persist(pool)
    await persist([reading(at, "1.0", seq=10)])
    await persist([reading(at, "2.0", seq=20)])  # the correction, applied first after a restart
    assert await persist([reading(at, "1.0", seq=10)]) == []  # the redelivered original
    assert await stored(pool, at) == Decimal("2.0000")


async def test_a_newer_repeat_of_the_stored_value_still_moves_the_row_forward(pool) -> None:
    """1.0 (seq 10), 2.0 (seq 20), 1.0 again (seq 30): the last one wins even if 2.0 is
    redelivered after it."""
    at = END - timedelta(minutes=5)
    persist = Persist(pool)
    await persist([reading(at, "1.0", seq=10)])
    await persist([reading(at, "1.0", seq=30)])
    await persist([reading(at, "2.0", seq=20)])
    assert await stored(pool, at) == Decimal("1.0000")


async def test_a_later_receive_time_wins_over_a_higher_sequence(pool) -> None:
    """A recreated INGEST stream starts its sequence at 1 again; newer readings must still win."""
    at = END - timedelta(minutes=5)
    persist = Persist(pool)
    await persist([reading(at, "1.0", seq=5000, received=at)])
    await persist([reading(at, "2.0", seq=1, received=at + timedelta(days=1))])
    assert await stored(pool, at) == Decimal("2.0000")


async def test_a_batch_keeps_the_reading_latest_in_broker_order_not_the_last_fetched(pool) -> None:
    at = END - timedelta(minutes=5)
    await Persist(pool)([reading(at, "2.0", seq=20), reading(at, "1.0", seq=10)])
    assert await stored(pool, at) == Decimal("2.0000")


async def test_thousands_of_intervals_due_at_once_match_an_independent_reference(pool) -> None:
    """3,000 intervals (200 units × 15 quarter hours, 3 readings each) close together and are
    summed by two concurrent sweepers in chunks: each sum is the reference's, once."""
    import random

    rnd = random.Random(11)
    units = range(10, 210)
    await pool.executemany(
        "INSERT INTO einheit (id, organization_id) VALUES ($1, $2)", [(u, ORG) for u in units]
    )
    expected: dict[tuple[int, datetime], Decimal] = {}
    batch = []
    for u in units:
        for q in range(15):
            end = END + timedelta(minutes=15 * q)
            for minute in (1, 6, 15):  # the last one exactly on the interval end
                at = end - timedelta(minutes=15 - minute)
                value = Decimal(rnd.randrange(0, 100_000)).scaleb(-4)
                batch.append(reading(at, str(value), unit=u))
                expected[(u, end)] = expected.get((u, end), Decimal(0)) + value
    persist = Persist(pool)
    for i in range(0, len(batch), 1000):
        await persist(batch[i : i + 1000])
    timed = TimedPool(pool, acquire_s=10, statement_s=30)
    aggregate = WindowAggregate(
        timed, chunk=128, concurrency=2, clock=lambda: END + timedelta(days=1)
    )
    run = await aggregate.sweep()
    assert (run.intervals, run.summed, run.changed) == (3000, 9000, 3000)
    rows = await pool.fetch("SELECT einheit_id, zeit, verbrauch, revision FROM messwerte")
    assert {(r["einheit_id"], r["zeit"]): r["verbrauch"] for r in rows} == expected
    assert {r["revision"] for r in rows} == {1}
    assert await pool.fetchval("SELECT count(*) FROM messwerte_outbox") == 3000
    assert await pool.fetchval("SELECT count(*) FROM messwerte_interval_dirty") == 0
    assert await pool.fetchval("SELECT count(*) FROM zaehler_rohdaten WHERE NOT verarbeitet") == 0


async def test_a_sweep_takes_only_closed_intervals_and_leaves_open_ones_marked(pool) -> None:
    open_at = END + timedelta(minutes=20)
    await Persist(pool)([reading(END - timedelta(minutes=1), "1"), reading(open_at, "2")])
    run = await window(pool, END + timedelta(seconds=61)).sweep()
    assert run.intervals == 1
    marks = await pool.fetch("SELECT einheit_id, zeit FROM messwerte_interval_dirty")
    assert [(r["einheit_id"], r["zeit"]) for r in marks] == [(1, END + timedelta(minutes=30))]


async def test_migration_marks_intervals_left_unprocessed_before_it(database: str) -> None:
    """A database upgraded from before the marks: its unprocessed rows' intervals are due."""
    from pipeline.migrations import FLEET

    conn = await asyncpg.connect(database)
    try:
        await conn.execute("INSERT INTO einheit (id, organization_id) VALUES (5, $1)", ORG)
        await conn.execute(
            "INSERT INTO zaehler_rohdaten (einheit_id, organization_id, timestamp, verbrauch, "
            "einspeisung) VALUES (5, $1, $2, 1, 0)",
            ORG,
            END - timedelta(minutes=3),
        )
        await conn.execute("DELETE FROM messwerte_interval_dirty")
        await conn.execute(FLEET)  # the step again, as on an upgrade
        marks = await conn.fetch("SELECT einheit_id, zeit FROM messwerte_interval_dirty")
    finally:
        await conn.close()
    assert [(r["einheit_id"], r["zeit"]) for r in marks] == [(5, END)]
