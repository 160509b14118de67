"""window_aggregate: sum closed 15-minute intervals into `messwerte` and queue them for publishing.

An interval (end - 15 min, end] closes when the wall clock passes end + grace (design §5). Two
things trigger an aggregation: `sweep()`, run periodically by the pipeline, finds every closed
interval that still has unprocessed raw rows (which is also the catch-up after a stop), and a
`Persisted` event for an already closed interval (late reading or correction) aggregates that
interval at once.

The event path does not aggregate by itself: it sets `due`, which wakes the sweeper early.
A backfill that delivers one closed interval's readings over several batches is so summed
once, not once per batch, and the database stays the only source of what is due.

One statement per set of intervals does, in one transaction: lock the intervals' raw rows in
key order, sum *all* of them (never only the unprocessed ones), upsert `messwerte` with
the `quelle` all its raw rows share (`'MQTT'`, `'CSV'` from an import, `'API'` over HTTP), and
`'MQTT'` where they differ, raising `revision` only when
something changed, append each changed row to the outbox, and mark the raw rows `verarbeitet`.
A raw row changed concurrently is either seen by the lock (and summed) or reset to unprocessed
after it (and summed by the next sweep).
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
from stages.db import Database

log = structlog.get_logger("stages.window_aggregate")

STAGE = "window_aggregate"
#: Intervals per statement; bounds lock time and statement size during a large catch-up.
CHUNK = 500

AGGREGATE_SQL = """
WITH keys AS (
    SELECT DISTINCT * FROM unnest($1::bigint[], $2::timestamptz[]) AS k(einheit_id, zeit)
), locked AS (
    SELECT z.id, z.einheit_id, k.zeit, z.organization_id, z.verbrauch, z.einspeisung,
           z.verarbeitet, z.quelle
    FROM zaehler_rohdaten z
    JOIN keys k ON z.einheit_id = k.einheit_id
               AND z.timestamp > k.zeit - INTERVAL '15 minutes' AND z.timestamp <= k.zeit
    ORDER BY z.einheit_id, z.timestamp
    FOR UPDATE OF z
), marked AS (
    UPDATE zaehler_rohdaten z SET verarbeitet = TRUE, verarbeitet_am = NOW()
    FROM locked l WHERE z.id = l.id AND l.verarbeitet IS NOT TRUE
    RETURNING z.id
), sums AS (
    SELECT einheit_id, zeit, (array_agg(organization_id))[1] AS organization_id,
           sum(verbrauch) AS verbrauch, sum(einspeisung) AS einspeisung,
           count(*)::integer AS anzahl,
           CASE WHEN min(quelle) = max(quelle) THEN min(quelle) ELSE 'MQTT' END AS quelle
    FROM locked GROUP BY einheit_id, zeit
), upserted AS (
    INSERT INTO messwerte AS m (einheit_id, zeit, verbrauch, einspeisung, quelle,
                                anzahl_rohwerte, revision)
    SELECT einheit_id, zeit, verbrauch, einspeisung, quelle, anzahl, 1 FROM sums
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

DUE_SQL = """
SELECT DISTINCT einheit_id, messwerte_interval_end(timestamp) AS zeit
FROM zaehler_rohdaten
WHERE verarbeitet = FALSE AND timestamp <= $1 AND messwerte_interval_end(timestamp) <= $1
LIMIT $2
"""


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
        pool: Database,
        *,
        grace: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self.grace = grace
        self._clock = clock
        #: Set when a row of an already closed interval changed: sweep soon.
        self.due = asyncio.Event()
        #: Intervals the database refused to sum (overflow); they stay unprocessed and logged.
        self.poisoned: set[tuple[int, datetime]] = set()

    def is_closed(self, end: datetime) -> bool:
        return end + self.grace <= self._clock()

    def __call__(self, batch: Sequence[Persisted]) -> list[Any]:
        for p in batch:  # a changed row may be the correction that makes the sum fit
            self.poisoned.discard((p.einheit_id, interval_end(p.timestamp)))
        if any(self.is_closed(interval_end(p.timestamp)) for p in batch):
            self.due.set()
        return []

    async def sweep(self) -> AggregationRun:
        """Aggregate every closed interval that still has unprocessed raw rows."""
        total = AggregationRun()
        while True:
            cutoff = self._clock() - self.grace
            rows = await self._pool.fetch(DUE_SQL, cutoff, CHUNK + len(self.poisoned))
            keys = [(r["einheit_id"], r["zeit"]) for r in rows]
            keys = [k for k in keys if k not in self.poisoned]
            if not keys:
                return total
            run = await self.aggregate(keys)
            total += run
            if run.marked == 0:  # nothing left that this pass could take over
                return total

    async def aggregate(self, keys: Iterable[tuple[int, datetime]]) -> AggregationRun:
        ordered = sorted(set(keys))
        total = AggregationRun()
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start : start + CHUNK]
            try:
                total += await self._aggregate(chunk)
            except asyncpg.DataError:
                # One interval whose sum does not fit NUMERIC(12,4) must not hold up the rest.
                for key in chunk:
                    try:
                        total += await self._aggregate([key])
                    except asyncpg.DataError as exc:
                        self.poisoned.add(key)
                        log.error(
                            "interval cannot be aggregated",
                            einheit_id=key[0],
                            zeit=key[1].isoformat(),
                            error=str(exc),
                        )
        return total

    async def _aggregate(self, keys: Sequence[tuple[int, datetime]]) -> AggregationRun:
        row = await self._pool.fetchrow(AGGREGATE_SQL, [k[0] for k in keys], [k[1] for k in keys])
        return AggregationRun(
            intervals=row["intervals"],
            marked=row["marked"],
            summed=row["summed"],
            changed=row["changed"],
        )
