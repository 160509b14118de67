"""window_aggregate: sum closed 15-minute intervals into `messwerte` and queue them for publishing.

An interval (end - 15 min, end] closes when the wall clock passes end + grace (design §5).
Persist marks the interval of every new or changed raw row as due (`messwerte_interval_dirty`)
in the statement that stores the row. `sweep()`, run periodically by the pipeline, takes the
marks of closed intervals, oldest first, a chunk per transaction (also the catch-up after a
stop); a `Persisted` event for an already closed interval (late reading or correction) only
wakes the sweeper early, so a backfill spread over several batches is summed once, and the
database stays the only source of what is due.

Per chunk, in one transaction: lock its marks (`FOR UPDATE SKIP LOCKED`: concurrent sweepers
and replicas take disjoint chunks), sum *all* raw rows of each interval (never only the
unprocessed ones), upsert `messwerte` with the `quelle` all its raw rows share (`'MQTT'`,
`'CSV'` from an import, `'API'` over HTTP; `'MQTT'` where they differ), raising `revision` only
when something changed, append each changed row to the outbox, mark the raw rows `verarbeitet`
and remove the marks. A raw row that persist is changing meanwhile is skipped (it is locked),
and persist's mark of it waits for this transaction's lock on the mark, then inserts a new
one: the change is summed by the next sweep, never lost between a sum and its unmarking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from schemas.messages import Persisted, interval_end
from stages.db import Database, Transactional

log = structlog.get_logger("stages.window_aggregate")

STAGE = "window_aggregate"
#: Intervals per statement; bounds lock time and statement size during a large catch-up.
CHUNK = 500

AGGREGATE_SQL = """
WITH keys AS (
    SELECT DISTINCT * FROM unnest($1::bigint[], $2::timestamptz[]) AS k(einheit_id, zeit)
), raw AS (
    -- Per interval, an index range scan of the unique key (einheit_id, timestamp). OFFSET 0
    -- keeps the planner from flattening this into a join it may run as a sequential scan of
    -- the whole table when its statistics are stale (right after a large load).
    SELECT z.id, k.einheit_id, k.zeit, z.organization_id, z.verbrauch, z.einspeisung,
           z.verarbeitet, z.quelle
    FROM keys k CROSS JOIN LATERAL (
        SELECT * FROM zaehler_rohdaten r
        WHERE r.einheit_id = k.einheit_id
          AND r.timestamp > k.zeit - INTERVAL '15 minutes' AND r.timestamp <= k.zeit
        OFFSET 0
    ) z
), taken AS (
    -- A row locked here is being changed by persist, which marks its interval again once
    -- this transaction has removed the mark: it is summed by the next sweep.
    SELECT z.id FROM zaehler_rohdaten z JOIN raw r ON z.id = r.id
    WHERE r.verarbeitet IS NOT TRUE
    FOR UPDATE OF z SKIP LOCKED
), marked AS (
    UPDATE zaehler_rohdaten z SET verarbeitet = TRUE, verarbeitet_am = NOW()
    FROM taken t WHERE z.id = t.id
    RETURNING z.id
), unmarked AS (
    DELETE FROM messwerte_interval_dirty d USING keys k
    WHERE d.einheit_id = k.einheit_id AND d.zeit = k.zeit
), sums AS (
    SELECT einheit_id, zeit, (array_agg(organization_id))[1] AS organization_id,
           sum(verbrauch) AS verbrauch, sum(einspeisung) AS einspeisung,
           count(*)::integer AS anzahl,
           CASE WHEN min(quelle) = max(quelle) THEN min(quelle) ELSE 'MQTT' END AS quelle
    FROM raw GROUP BY einheit_id, zeit
), upserted AS (
    INSERT INTO messwerte AS m (einheit_id, zeit, verbrauch, einspeisung, quelle,
                                anzahl_rohwerte, revision)
    SELECT einheit_id, zeit, verbrauch, einspeisung, quelle, anzahl, 1 FROM sums
    ORDER BY einheit_id, zeit
    ON CONFLICT (einheit_id, zeit) DO UPDATE SET
        verbrauch = EXCLUDED.verbrauch,
        einspeisung = EXCLUDED.einspeisung,
        quelle = EXCLUDED.quelle,
        anzahl_rohwerte = EXCLUDED.anzahl_rohwerte,
        revision = m.revision + 1
    WHERE (m.verbrauch, m.einspeisung, m.quelle, m.anzahl_rohwerte)
        IS DISTINCT FROM (EXCLUDED.verbrauch, EXCLUDED.einspeisung, EXCLUDED.quelle,
                          EXCLUDED.anzahl_rohwerte)
    RETURNING m.einheit_id, m.zeit, m.verbrauch, m.einspeisung, m.anzahl_rohwerte, m.quelle,
              m.revision
), queued AS (
    INSERT INTO messwerte_outbox (einheit_id, organization_id, zeit, verbrauch, einspeisung,
                                  anzahl_rohwerte, quelle, revision)
    SELECT u.einheit_id, s.organization_id, u.zeit, u.verbrauch, u.einspeisung,
           u.anzahl_rohwerte, u.quelle, u.revision
    FROM upserted u JOIN sums s USING (einheit_id, zeit)
    RETURNING einheit_id, zeit, revision
)
SELECT (SELECT count(*) FROM sums) AS intervals,
       (SELECT count(*) FROM marked) AS marked,
       (SELECT coalesce(sum(anzahl), 0) FROM sums) AS summed,
       (SELECT count(*) FROM queued) AS changed
"""

#: The closed intervals persist marked, oldest first; an index range scan on
#: `messwerte_interval_dirty (zeit, einheit_id)`, however many rows wait in open intervals.
#: Marks another transaction holds are skipped, so replicas (and this worker's own sweepers)
#: take disjoint chunks.
DUE_SQL = """
SELECT einheit_id, zeit FROM messwerte_interval_dirty
WHERE zeit <= $1
  AND (einheit_id, zeit) NOT IN (SELECT * FROM unnest($3::bigint[], $4::timestamptz[]))
ORDER BY zeit, einheit_id
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

#: The marks of given intervals, waited for: `aggregate()` of chosen keys.
LOCK_SQL = """
SELECT d.einheit_id, d.zeit FROM messwerte_interval_dirty d
JOIN unnest($1::bigint[], $2::timestamptz[]) AS k(einheit_id, zeit) USING (einheit_id, zeit)
ORDER BY d.zeit, d.einheit_id
FOR UPDATE OF d
"""

Key = tuple[int, datetime]


@dataclass(frozen=True, slots=True)
class AggregationRun:
    """What one aggregation did: intervals summed, raw rows newly marked, rows published anew."""

    intervals: int = 0
    marked: int = 0
    summed: int = 0
    changed: int = 0

    def __add__(self, other: AggregationRun) -> AggregationRun:
        return AggregationRun(
            self.intervals + other.intervals,
            self.marked + other.marked,
            self.summed + other.summed,
            self.changed + other.changed,
        )


class WindowAggregate:
    """Stage `window_aggregate` (batched): `Persisted` events -> aggregation of closed intervals."""

    batched = True

    def __init__(
        self,
        pool: Transactional,
        *,
        grace: timedelta = timedelta(seconds=60),
        chunk: int = CHUNK,
        concurrency: int = 1,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self.grace = grace
        self.chunk = chunk
        #: Chunks summed at once, each in its own transaction (PostgreSQL sums one per core).
        self.concurrency = concurrency
        self._clock = clock
        #: Set when a row of an already closed interval changed: sweep soon.
        self.due = asyncio.Event()
        #: Intervals the database refused to sum (overflow); they stay marked and logged.
        self.poisoned: set[Key] = set()

    def is_closed(self, end: datetime) -> bool:
        return end + self.grace <= self._clock()

    def __call__(self, batch: Sequence[Persisted]) -> list[Any]:
        for p in batch:  # a changed row may be the correction that makes the sum fit
            self.poisoned.discard((p.einheit_id, interval_end(p.timestamp)))
        if any(self.is_closed(interval_end(p.timestamp)) for p in batch):
            self.due.set()
        return []

    async def sweep(self) -> AggregationRun:
        """Aggregate every closed interval that is marked, a chunk per transaction."""
        cutoff = self._clock() - self.grace
        runs = await asyncio.gather(*(self._drain(cutoff) for _ in range(self.concurrency)))
        return sum(runs, AggregationRun())

    async def _drain(self, cutoff: datetime) -> AggregationRun:
        total = AggregationRun()
        while True:
            run, taken = await self._chunk(cutoff)
            total += run
            if taken < self.chunk:  # nothing left that is not taken by another transaction
                return total

    async def _chunk(self, cutoff: datetime) -> tuple[AggregationRun, int]:
        poisoned = sorted(self.poisoned)
        keys: list[Key] = []
        try:
            async with self._pool.transaction() as tx:
                rows = await tx.fetch(
                    DUE_SQL, cutoff, self.chunk, [k[0] for k in poisoned], [k[1] for k in poisoned]
                )
                keys = [(r["einheit_id"], r["zeit"]) for r in rows]
                if not keys:
                    return AggregationRun(), 0
                return await self._sum(tx, keys), len(keys)
        except asyncpg.DataError:
            # One interval whose sum does not fit NUMERIC(12,4) must not hold up the rest.
            return await self.aggregate(keys), len(keys)

    async def aggregate(self, keys: Iterable[Key]) -> AggregationRun:
        """Sum the given intervals now, marked or not, a chunk per transaction. An interval
        whose sum the database refuses is set aside (`poisoned`) and keeps its mark."""
        ordered = sorted(set(keys))
        total = AggregationRun()
        for start in range(0, len(ordered), self.chunk):
            chunk = ordered[start : start + self.chunk]
            try:
                total += await self._locked_sum(chunk)
            except asyncpg.DataError:
                for key in chunk:
                    try:
                        total += await self._locked_sum([key])
                    except asyncpg.DataError as exc:
                        self.poisoned.add(key)
                        log.error(
                            "interval cannot be aggregated",
                            einheit_id=key[0],
                            zeit=key[1].isoformat(),
                            error=str(exc),
                        )
        return total

    async def _locked_sum(self, keys: Sequence[Key]) -> AggregationRun:
        async with self._pool.transaction() as tx:
            await tx.fetch(LOCK_SQL, [k[0] for k in keys], [k[1] for k in keys])
            return await self._sum(tx, keys)

    @staticmethod
    async def _sum(tx: Database, keys: Sequence[Key]) -> AggregationRun:
        row = await tx.fetchrow(AGGREGATE_SQL, [k[0] for k in keys], [k[1] for k in keys])
        return AggregationRun(
            intervals=row["intervals"],
            marked=row["marked"],
            summed=row["summed"],
            changed=row["changed"],
        )
