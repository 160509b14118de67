"""persist, for BESS telemetry: upsert samples into `bess_telemetry`, and mark the intervals a
new or changed sample can change as due for computing (`bess_interval_dirty`).

The same rules as meter readings (`stages.persist`): one statement per batch, the latest in
broker order wins, a change of values resets `verarbeitet`. What differs is the second half: a
sample's energy reaches into the intervals of the stretches on both sides of it, so every
interval within `PIPELINE_BESS_MAX_GAP_SECONDS` of it is marked, in the same statement; the
aggregator takes a marked interval once it is closed. The mark takes a row lock (`DO UPDATE`),
so an aggregator computing that interval at this moment either sees this sample or leaves the
mark to be taken again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas.bess import VALUE_FIELDS, BessPersisted, BessSample

_VALUES = ", ".join((*VALUE_FIELDS, "alarms"))
_CHANGED = f"({', '.join(f'b.{c}' for c in (*VALUE_FIELDS, 'alarms'))}) IS DISTINCT FROM " + (
    f"({', '.join(f'EXCLUDED.{c}' for c in (*VALUE_FIELDS, 'alarms'))})"
)

UPSERT_SQL = f"""
WITH input AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(
        site text, device text, organization_id uuid, ts timestamptz,
        soc float8, p float8, p_ch float8, p_dis float8, v_dc float8, i_dc float8,
        t_cell_max float8, soh float8, alarms text[],
        empfangen_am timestamptz, quelle varchar(20), ingest_seq bigint)
), upserted AS (
    INSERT INTO bess_telemetry AS b (
        site, device, organization_id, ts, {_VALUES}, empfangen_am, quelle, ingest_seq)
    SELECT site, device, organization_id, ts, {_VALUES}, empfangen_am, quelle, ingest_seq
    FROM input ORDER BY site, device, ts
    ON CONFLICT (site, device, ts) DO UPDATE SET
        organization_id = EXCLUDED.organization_id,
        {", ".join(f"{c} = EXCLUDED.{c}" for c in (*VALUE_FIELDS, "alarms"))},
        empfangen_am = EXCLUDED.empfangen_am,
        ingest_seq = EXCLUDED.ingest_seq,
        quelle = CASE WHEN {_CHANGED} THEN EXCLUDED.quelle ELSE b.quelle END,
        verarbeitet = CASE WHEN {_CHANGED} THEN FALSE ELSE b.verarbeitet END,
        verarbeitet_am = CASE WHEN {_CHANGED} THEN NULL ELSE b.verarbeitet_am END
    WHERE (EXCLUDED.empfangen_am, EXCLUDED.ingest_seq)
        > (coalesce(b.empfangen_am, '-infinity'::timestamptz), b.ingest_seq)
    RETURNING b.site, b.device, b.ts, b.verarbeitet
), changed AS (
    SELECT site, device, ts FROM upserted WHERE verarbeitet IS NOT TRUE
), marked AS (
    INSERT INTO bess_interval_dirty (site, device, interval_end)
    SELECT DISTINCT c.site, c.device, e.interval_end
    FROM changed c, generate_series(
        messwerte_interval_end(c.ts - make_interval(secs => $2)),
        messwerte_interval_end(c.ts + make_interval(secs => $2)),
        INTERVAL '15 minutes') AS e(interval_end)
    ORDER BY 1, 2, 3
    -- Keeps the first mark's time (the aggregator lets a mark settle for a moment, and a mark
    -- renewed by every sample of a stream would never settle); the update is for its lock.
    ON CONFLICT (site, device, interval_end)
        DO UPDATE SET marked_at = bess_interval_dirty.marked_at
)
SELECT site, device, ts FROM changed
"""


def _row(s: BessSample) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(s, name) for name in VALUE_FIELDS}
    row.update(
        site=s.site,
        device=s.device,
        organization_id=str(s.organization_id),
        ts=s.ts.isoformat(),
        alarms=list(s.alarms),
        empfangen_am=s.received_at.isoformat(),
        quelle=s.quelle,
        ingest_seq=s.ingest_seq,
    )
    return row


class BessTelemetry:
    """`bess_telemetry`: BESS samples, and the intervals they make due."""

    def __init__(self, max_gap_s: float) -> None:
        self.max_gap_s = max_gap_s

    def upsert(self, rows: Sequence[BessSample]) -> tuple[str, list[Any]]:
        return UPSERT_SQL, [json.dumps([_row(s) for s in rows]), float(self.max_gap_s)]

    def timestamp_of(self, row: BessSample) -> datetime:
        return row.ts

    def key_of(self, record: Any) -> tuple[str, str, datetime]:
        return (record["site"], record["device"], record["ts"])

    def persisted(self, row: BessSample) -> BessPersisted:
        return BessPersisted(
            organization_id=row.organization_id,
            site=row.site,
            device=row.device,
            ts=row.ts,
            content_hash=row.content_hash,
            ingest_seq=row.ingest_seq,
        )
