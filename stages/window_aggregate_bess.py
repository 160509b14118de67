"""window_aggregate, for BESS telemetry: compute closed 15-minute intervals into
`bess_interval` and queue the changed ones for publishing.

Persist marks every interval a new or changed sample can reach (`bess_interval_dirty`); a
marked interval is due once the wall clock passes its end + grace. One transaction per chunk of
due intervals: take their marks (`FOR UPDATE SKIP LOCKED`, so replicas share the work), read
each device's samples around them, compute energy and statistics (`stages.bess_energy`),
upsert the rows, raising `revision` only where something changed, put each changed row's
message in the outbox, remove the marks and mark the intervals' samples `verarbeitet`.

`Persisted` events only wake the sweeper early, as for meters: the marks are what is due.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from schemas.bess import BessIntervalMessage, BessPersisted
from stages.bess_energy import INTERVAL, Interval, Sample, interval, touched_ends
from stages.db import Transactional
from stages.window_aggregate import AggregationRun

log = structlog.get_logger("stages.window_aggregate_bess")

#: Intervals per transaction.
CHUNK = 500

#: A mark is taken once it is this old, so a burst of late samples into one interval (a
#: backfill, a device catching up) is computed once a second rather than on every sweep; a
#: closed interval's samples have long been marked, so closing is not delayed.
SETTLE_S = 1.0

DUE_SQL = """
SELECT site, device, interval_end FROM bess_interval_dirty
WHERE interval_end <= $1 AND marked_at <= NOW() - make_interval(secs => $3)
ORDER BY interval_end, site, device
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

SAMPLES_SQL = """
SELECT t.site, t.device, t.organization_id, t.ts, t.p, t.soc, t.t_cell_max, t.soh, t.alarms
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS w(site, device, lo, hi)
JOIN bess_telemetry t ON t.site = w.site AND t.device = w.device AND t.ts BETWEEN w.lo AND w.hi
"""

_STATS = (
    "energy_charged_kwh", "energy_discharged_kwh", "covered_seconds", "samples", "soc_min",
    "soc_max", "soc_last", "t_cell_max", "soh_last", "alarms",
)  # fmt: skip

UPSERT_SQL = f"""
WITH input AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(
        site text, device text, organization_id uuid, interval_end timestamptz,
        energy_charged_kwh numeric, energy_discharged_kwh numeric, covered_seconds integer,
        samples integer, soc_min float8, soc_max float8, soc_last float8, t_cell_max float8,
        soh_last float8, alarms text[])
)
INSERT INTO bess_interval AS b (site, device, organization_id, interval_end, {", ".join(_STATS)},
                                revision)
SELECT site, device, organization_id, interval_end, {", ".join(_STATS)}, 1
FROM input ORDER BY site, device, interval_end
ON CONFLICT (site, device, interval_end) DO UPDATE SET
    organization_id = EXCLUDED.organization_id,
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _STATS)},
    revision = b.revision + 1
WHERE ({", ".join(f"b.{c}" for c in _STATS)})
    IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _STATS)})
RETURNING b.*
"""

DONE_SQL = """
WITH keys AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(site, device, interval_end)
), unmarked AS (
    DELETE FROM bess_interval_dirty d USING keys k
    WHERE d.site = k.site AND d.device = k.device AND d.interval_end = k.interval_end
), taken AS (
    -- A sample locked here is being changed: it will mark its intervals again.
    SELECT t.id FROM bess_telemetry t JOIN keys k
        ON t.site = k.site AND t.device = k.device
       AND t.ts > k.interval_end - INTERVAL '15 minutes' AND t.ts <= k.interval_end
    WHERE t.verarbeitet IS NOT TRUE
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE bess_telemetry t SET verarbeitet = TRUE, verarbeitet_am = NOW()
FROM taken WHERE t.id = taken.id
"""

Key = tuple[str, str, datetime]


def message(row: Any) -> BessIntervalMessage:
    """The output message of a stored `bess_interval` row."""
    return BessIntervalMessage(
        organization_id=row["organization_id"],
        site=row["site"],
        device=row["device"],
        interval_start=row["interval_end"] - INTERVAL,
        interval_end=row["interval_end"],
        energy_charged_kwh=float(row["energy_charged_kwh"]),
        energy_discharged_kwh=float(row["energy_discharged_kwh"]),
        covered_seconds=row["covered_seconds"],
        samples=row["samples"],
        soc_min=row["soc_min"],
        soc_max=row["soc_max"],
        soc_last=row["soc_last"],
        t_cell_max=row["t_cell_max"],
        soh_last=row["soh_last"],
        alarms=list(row["alarms"]),
        revision=row["revision"],
    )


def _row(key: Key, org: Any, computed: Interval) -> dict[str, Any]:
    site, device, end = key
    e = computed.energy
    return {
        "site": site,
        "device": device,
        "organization_id": str(org),
        "interval_end": end.isoformat(),
        "energy_charged_kwh": str(e.charged_kwh),
        "energy_discharged_kwh": str(e.discharged_kwh),
        "covered_seconds": e.covered_seconds,
        "samples": computed.samples,
        "soc_min": computed.soc_min,
        "soc_max": computed.soc_max,
        "soc_last": computed.soc_last,
        "t_cell_max": computed.t_cell_max,
        "soh_last": computed.soh_last,
        "alarms": list(computed.alarms),
    }


class WindowAggregateBess:
    """Stage `window_aggregate` for BESS (batched): events wake the sweep; `sweep()` computes."""

    batched = True

    def __init__(
        self,
        pool: Transactional,
        *,
        grace: timedelta = timedelta(seconds=60),
        max_gap_s: float = 300.0,
        settle_s: float = SETTLE_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self.settle_s = settle_s
        self.grace = grace
        self.max_gap_s = max_gap_s
        self._clock = clock
        self.due = asyncio.Event()

    def is_closed(self, end: datetime) -> bool:
        return end + self.grace <= self._clock()

    def __call__(self, batch: Sequence[BessPersisted]) -> list[Any]:
        if any(self.is_closed(touched_ends(p.ts, self.max_gap_s)[0]) for p in batch):
            self.due.set()
        return []

    async def sweep(self) -> AggregationRun:
        """Compute every closed interval that is marked, a chunk per transaction."""
        total = AggregationRun()
        while True:
            run, taken = await self._chunk(self._clock() - self.grace)
            total += run
            if taken < CHUNK:
                return total

    async def _chunk(self, cutoff: datetime) -> tuple[AggregationRun, int]:
        async with self._pool.transaction() as tx:
            keys: list[Key] = [
                (r["site"], r["device"], r["interval_end"])
                for r in await tx.fetch(DUE_SQL, cutoff, CHUNK, self.settle_s)
            ]
            if not keys:
                return AggregationRun(), 0
            samples, owners = await self._samples(tx, keys)
            rows = []
            summed = 0
            for key in keys:
                computed = interval(samples[key[:2]], key[2], self.max_gap_s)
                summed += computed.samples
                if computed.exists:
                    rows.append(_row(key, owners[key[:2]], computed))
            changed = await tx.fetch(UPSERT_SQL, json.dumps(rows)) if rows else []
            if changed:
                bodies = [message(row).model_dump_json(by_alias=True) for row in changed]
                await tx.execute(
                    "INSERT INTO bess_interval_outbox (body) SELECT * FROM unnest($1::jsonb[])",
                    bodies,
                )
            status = await tx.execute(
                DONE_SQL, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
            )
        marked = int(status.split()[-1])
        return AggregationRun(len(keys), marked, summed, len(changed)), len(keys)

    async def _samples(
        self, tx: Any, keys: Sequence[Key]
    ) -> tuple[dict[tuple[str, str], list[Sample]], dict[tuple[str, str], Any]]:
        """Each device's samples from a gap before its first interval to a gap after its last."""
        gap = timedelta(seconds=self.max_gap_s)
        spans: dict[tuple[str, str], list[datetime]] = defaultdict(list)
        for site, device, end in keys:
            spans[(site, device)].append(end)
        devices = list(spans)
        records = await tx.fetch(
            SAMPLES_SQL,
            [d[0] for d in devices],
            [d[1] for d in devices],
            [min(spans[d]) - INTERVAL - gap for d in devices],
            [max(spans[d]) + gap for d in devices],
        )
        samples: dict[tuple[str, str], list[Sample]] = defaultdict(list)
        owners: dict[tuple[str, str], Any] = {}
        for r in sorted(records, key=lambda r: r["ts"]):
            which = (r["site"], r["device"])
            samples[which].append(
                Sample(r["ts"], r["p"], r["soc"], r["t_cell_max"], r["soh"], tuple(r["alarms"]))
            )
            owners[which] = r["organization_id"]  # the latest sample's organization
        return samples, owners
