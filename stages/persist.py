"""persist: upsert a batch of readings into `zaehler_rohdaten` and report which rows changed.

One statement per batch (`INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE`). PostgreSQL
refuses to touch one row twice in a statement, so the batch is first collapsed per key,
keeping the reading latest in broker order. The last write wins by broker order, not by
arrival: a row is only overwritten by a reading that is newer (receive time, then INGEST
sequence) than the one it holds, so a redelivery that arrives after a newer reading, after a
crash, changes nothing. A row whose values change is reset to `verarbeitet = FALSE` so its
interval is summed again, and the statement marks the interval of every such row as due
(`messwerte_interval_dirty`); a newer repeat of the same values only moves the row's order forward
and, once its interval is summed, yields nothing. Rows are written in key order so concurrent
writers lock them in one order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
import structlog
from pydantic import BaseModel

from schemas.messages import IngestMessage, Persisted, Reading, Reject, RejectReason
from stages.db import Database

log = structlog.get_logger("stages.persist")

STAGE = "persist"
#: What the database says about a row itself (unit gone, value refused), not about its health.
ROW_REFUSED = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)

_CHANGED = """(z.verbrauch, z.einspeisung, z.zaehlerstand_verbrauch, z.zaehlerstand_einspeisung)
    IS DISTINCT FROM (EXCLUDED.verbrauch, EXCLUDED.einspeisung,
                      EXCLUDED.zaehlerstand_verbrauch, EXCLUDED.zaehlerstand_einspeisung)"""

# A newer reading always moves the row's order forward, also when its values are the same:
# otherwise an older, different reading redelivered after it would still count as newer.
# Only a change of values resets `verarbeitet` (and takes over the source), so only changed
# or new rows come back as not yet processed.
UPSERT_SQL = f"""
WITH upserted AS (
    INSERT INTO zaehler_rohdaten AS z (
        einheit_id, organization_id, timestamp, verbrauch, einspeisung,
        zaehlerstand_verbrauch, zaehlerstand_einspeisung, empfangen_am, quelle, ingest_seq)
    SELECT * FROM unnest(
        $1::bigint[], $2::uuid[], $3::timestamptz[], $4::numeric[], $5::numeric[],
        $6::numeric[], $7::numeric[], $8::timestamptz[], $9::varchar[], $10::bigint[])
    ON CONFLICT (einheit_id, timestamp) DO UPDATE SET
        organization_id = EXCLUDED.organization_id,
        verbrauch = EXCLUDED.verbrauch,
        einspeisung = EXCLUDED.einspeisung,
        zaehlerstand_verbrauch = EXCLUDED.zaehlerstand_verbrauch,
        zaehlerstand_einspeisung = EXCLUDED.zaehlerstand_einspeisung,
        empfangen_am = EXCLUDED.empfangen_am,
        ingest_seq = EXCLUDED.ingest_seq,
        quelle = CASE WHEN {_CHANGED} THEN EXCLUDED.quelle ELSE z.quelle END,
        verarbeitet = CASE WHEN {_CHANGED} THEN FALSE ELSE z.verarbeitet END,
        verarbeitet_am = CASE WHEN {_CHANGED} THEN NULL ELSE z.verarbeitet_am END
    WHERE (EXCLUDED.empfangen_am, EXCLUDED.ingest_seq)
        > (coalesce(z.empfangen_am, '-infinity'::timestamptz), z.ingest_seq)
    RETURNING z.einheit_id, z.timestamp, z.verarbeitet
), changed AS (
    SELECT einheit_id, timestamp FROM upserted WHERE verarbeitet IS NOT TRUE
), marked AS (
    -- The row's interval is due once closed (window_aggregate finds the marks by an index
    -- range scan). An existing mark is only locked, not rewritten (the WHERE is false): the
    -- lock waits for an aggregator that holds it, and once that one has removed it, a new
    -- mark is inserted, so a change is never lost between a sum and its unmarking.
    INSERT INTO messwerte_interval_dirty (einheit_id, zeit)
    SELECT DISTINCT einheit_id, messwerte_interval_end(timestamp) FROM changed ORDER BY 1, 2
    ON CONFLICT (einheit_id, zeit) DO UPDATE SET marked_at = EXCLUDED.marked_at WHERE FALSE
)
SELECT einheit_id, timestamp FROM changed
"""


class Keyed(Protocol):
    @property
    def key(self) -> Any: ...

    @property
    def order(self) -> tuple[datetime, int]: ...


R = TypeVar("R", bound=Keyed)
R_in = TypeVar("R_in", bound=Keyed, contravariant=True)


def collapse(batch: Sequence[R]) -> list[R]:
    """One reading per key, the latest in broker order winning, in key order."""
    latest: dict[Any, R] = {}
    for reading in batch:
        held = latest.get(reading.key)
        if held is None or reading.order >= held.order:
            latest[reading.key] = reading
    return [latest[key] for key in sorted(latest)]


class RawTable(Protocol[R_in]):
    """How one kind's raw rows are written: the part of persist that differs between kinds."""

    def upsert(self, rows: Sequence[R_in]) -> tuple[str, list[Any]]:
        """The statement and its arguments; it returns the key columns of new or changed rows."""
        ...

    def key_of(self, record: Any) -> Any: ...

    def timestamp_of(self, row: R_in) -> datetime: ...

    def persisted(self, row: R_in) -> BaseModel: ...


class Meters:
    """`zaehler_rohdaten`: meter readings."""

    def upsert(self, rows: Sequence[Reading]) -> tuple[str, list[Any]]:
        return UPSERT_SQL, [
            [r.einheit_id for r in rows],
            [r.organization_id for r in rows],
            [r.timestamp for r in rows],
            [r.verbrauch for r in rows],
            [r.einspeisung for r in rows],
            [r.zaehlerstand_verbrauch for r in rows],
            [r.zaehlerstand_einspeisung for r in rows],
            [r.received_at for r in rows],
            [r.quelle for r in rows],
            [r.ingest_seq for r in rows],
        ]

    def key_of(self, record: Any) -> tuple[int, datetime]:
        return (record["einheit_id"], record["timestamp"])

    def timestamp_of(self, row: Reading) -> datetime:
        return row.timestamp

    def persisted(self, row: Reading) -> Persisted:
        return Persisted(
            organization_id=row.organization_id,
            einheit_id=row.einheit_id,
            timestamp=row.timestamp,
            content_hash=row.content_hash,
            ingest_seq=row.ingest_seq,
        )


class Persist:
    """Stage `persist` (batched): readings -> a persisted event for every inserted or changed
    row. `table` says which table and how; meter readings by default.

    With a raw retention, a reading that has grown older than it since validate took it (it
    waited in a stream) is refused `too_old` here too: prune may be about to take its
    interval's other rows."""

    batched = True

    def __init__(
        self,
        pool: Database,
        table: RawTable[Any] | None = None,
        *,
        retention: timedelta | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self._table: RawTable[Any] = table if table is not None else Meters()
        self._retention = retention
        self._clock = clock

    async def __call__(self, batch: Sequence[Any]) -> list[BaseModel]:
        rows = collapse(batch)
        late: list[BaseModel] = []
        if self._retention is not None:
            horizon = self._clock() - self._retention
            late = [
                too_old(r, self._table.timestamp_of(r))
                for r in rows
                if self._table.timestamp_of(r) < horizon
            ]
            rows = [r for r in rows if self._table.timestamp_of(r) >= horizon]
        if not rows:
            return late
        return late + await self._store(rows)

    async def _store(self, rows: Sequence[Any]) -> list[BaseModel]:
        try:
            changed = await self._upsert(rows)
        except ROW_REFUSED:
            # One poison row must not fail its batch-mates: retry them one at a time.
            return await self._one_by_one(rows)
        return [self._table.persisted(r) for r in rows if r.key in changed]

    async def _upsert(self, rows: Sequence[Any]) -> set[Any]:
        sql, args = self._table.upsert(rows)
        return {self._table.key_of(record) for record in await self._pool.fetch(sql, *args)}

    async def _one_by_one(self, rows: Sequence[Any]) -> list[BaseModel]:
        out: list[BaseModel] = []
        for row in rows:
            try:
                changed = await self._upsert([row])
            except ROW_REFUSED as exc:
                log.warning("row refused by the database", key=str(row.key), error=str(exc))
                out.append(refused(row, row.topic, exc))
                continue
            if row.key in changed:
                out.append(self._table.persisted(row))
        return out


def refused(row: BaseModel, topic: str, exc: Exception) -> Reject:
    """A row the database refused, for `dlq.persist_failed`, with the row as its payload."""
    return _reject(row, topic, RejectReason.PERSIST_FAILED, f"database refused the row: {exc}")


def too_old(row: BaseModel, ts: datetime) -> Reject:
    """A row older than the raw retention by the time it reached persist, for `dlq.too_old`."""
    topic: str = row.topic  # type: ignore[attr-defined]
    log.warning("reading older than the raw retention, refused", topic=topic, ts=ts.isoformat())
    detail = f"timestamp {ts.isoformat()} is older than the raw retention"
    return _reject(row, topic, RejectReason.TOO_OLD, detail)


def _reject(row: BaseModel, topic: str, reason: RejectReason, detail: str) -> Reject:
    original = IngestMessage(
        topic=topic,
        payload=row.model_dump_json().encode(),
        received_at=row.received_at,  # type: ignore[attr-defined]
        ingest_seq=row.ingest_seq,  # type: ignore[attr-defined]
    )
    return Reject.of(original, reason, detail, STAGE)
