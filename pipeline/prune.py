"""Raw-data retention (`pipeline prune [--dry-run]`, and daily from the sweeper): delete processed
raw rows older than PIPELINE_RAW_RETENTION_DAYS.

What may go, and why it is safe:

* only whole intervals: rows with a timestamp at or before a quarter-hour cutoff, so an
  interval is never left half pruned;
* only rows marked `verarbeitet`, and never a row of an interval that is marked due
  (`messwerte_interval_dirty` / `bess_interval_dirty`): an interval waiting to be summed keeps
  all of its rows;
* the cutoff lies `SLACK` behind the horizon validate and persist reject `too_old` by: a reading
  accepted just inside the horizon is stored (and its interval marked) long before prune could
  reach it, even with a persist statement at its timeout and clocks apart by minutes;
* BESS samples are kept a further `2 × max gap + 15 min`: an interval's energy integrates across
  its edges, so a late sample still accepted may re-compute an interval that reads samples that
  far back.

Rows go in batches of `BATCH`, oldest first, each batch its own short transaction that skips
rows another transaction holds: ingestion never waits for a prune.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from schemas.messages import QUARTER_HOUR

log = structlog.get_logger("pipeline.prune")

BATCH = 5_000
SLACK = timedelta(minutes=5)


@dataclass(frozen=True)
class RawTable:
    """One raw table as prune sees it: its time column and the marks of its due intervals."""

    name: str
    ts: str
    #: A correlated condition on `r` (the raw row): its interval is marked due.
    marked: str
    #: How much further back than the horizon rows must stay.
    keep_extra: timedelta = timedelta(0)

    def _where(self) -> str:
        return f"r.verarbeitet = TRUE AND r.{self.ts} <= $1 AND NOT EXISTS ({self.marked})"

    def delete_sql(self) -> str:
        return f"""
WITH doomed AS (
    SELECT r.id FROM {self.name} r WHERE {self._where()}
    ORDER BY r.{self.ts} LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
)
DELETE FROM {self.name} t USING doomed WHERE t.id = doomed.id
"""

    def count_sql(self) -> str:
        return f"SELECT count(*) FROM {self.name} r WHERE {self._where()}"


METERS = RawTable(
    "zaehler_rohdaten",
    "timestamp",
    "SELECT 1 FROM messwerte_interval_dirty d WHERE d.einheit_id = r.einheit_id "
    "AND d.zeit = messwerte_interval_end(r.timestamp)",
)


def bess_table(max_gap_s: float) -> RawTable:
    gap = timedelta(seconds=max_gap_s)
    return RawTable(
        "bess_telemetry",
        "ts",
        # A sample feeds the intervals within a gap of it: none of those may be due.
        "SELECT 1 FROM bess_interval_dirty d WHERE d.site = r.site AND d.device = r.device "
        "AND d.interval_end BETWEEN r.ts - make_interval(secs => "
        f"{max_gap_s}) AND r.ts + make_interval(secs => {max_gap_s}) + INTERVAL '15 minutes'",
        keep_extra=2 * gap + QUARTER_HOUR,
    )


def quarter_floor(t: datetime) -> datetime:
    return t - timedelta(minutes=t.minute % 15, seconds=t.second, microseconds=t.microsecond)


def cutoff(now: datetime, retention: timedelta, grace: timedelta, table: RawTable) -> datetime:
    """Rows at or before this may go: whole intervals behind the horizon by SLACK (and by the
    table's extra), and never one that has not closed."""
    return quarter_floor(min(now - retention - SLACK - table.keep_extra, now - grace))


@dataclass(frozen=True)
class Pruned:
    table: str
    cutoff: datetime
    rows: int
    dry_run: bool

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        at = self.cutoff.isoformat()
        return f"{self.table}: {verb} {self.rows} processed rows at or before {at}"


async def prune(
    pool: Any,
    tables: tuple[RawTable, ...],
    *,
    retention: timedelta,
    grace: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
    batch: int = BATCH,
) -> list[Pruned]:
    """Delete (or, dry, count) what retention lets go, table by table."""
    now = now or datetime.now(UTC)
    out = []
    for table in tables:
        limit = cutoff(now, retention, grace, table)
        if dry_run:
            rows = int(await pool.fetchval(table.count_sql(), limit))
        else:
            rows = 0
            while True:
                status = await pool.execute(table.delete_sql(), limit, batch)
                deleted = int(status.split()[-1])
                rows += deleted
                if deleted < batch:
                    break
                await asyncio.sleep(0)  # let the worker's other tasks in between batches
        result = Pruned(table.name, limit, rows, dry_run)
        log.info("raw rows pruned" if not dry_run else "raw rows prunable", **vars(result))
        out.append(result)
    return out
