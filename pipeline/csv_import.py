"""`pipeline import-csv FILE`: existing CSV readings through the same path as MQTT (`quelle='CSV'`).

Each row (`einheit_id,timestamp,verbrauch,einspeisung`, header row, optional
`zaehlerstand_verbrauch,zaehlerstand_einspeisung`) becomes the payload a meter would have sent,
on the topic of its unit (organization from `einheit`), and is published to `ingest.…` with the
source noted. The running pipeline validates, de-duplicates, stores and aggregates it like any
reading; rows it refuses land on `dlq.>` with their reason. The summary counts rows by the same
validation, run here once more.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from uuid import UUID

import asyncpg
from tqdm import tqdm

from pipeline.broker import declare_streams, make_broker
from pipeline.codec import encode
from pipeline.config import Settings
from pipeline.publishing import JetStreamOut
from schemas.messages import IngestMessage, Reject
from stages.mqtt_bridge import ingest_subject
from stages.validate import Validate

REQUIRED = ("einheit_id", "timestamp", "verbrauch", "einspeisung")
OPTIONAL = {
    "zaehlerstand_verbrauch": "zaehlerstandVerbrauch",
    "zaehlerstand_einspeisung": "zaehlerstandEinspeisung",
}
UNKNOWN_ORG = UUID(int=0)
BATCH = 500
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


@dataclass
class ImportSummary:
    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        rejected = sum(self.rejected.values())
        return f"import-csv: {self.rows} rows, {self.accepted} accepted, {rejected} rejected" + (
            f" ({reasons})" if reasons else ""
        )


def _value(text: str | None) -> str:
    """A CSV cell as a JSON value: numbers as numbers, empty as null, anything else as text."""
    if text is None or not text.strip():
        return "null"
    text = text.strip()
    return text if _JSON_NUMBER.fullmatch(text) else json.dumps(text)


def rows_to_messages(
    reader: csv.DictReader[str], units: dict[int, UUID]
) -> Iterator[IngestMessage]:
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"CSV header lacks {', '.join(missing)} (needs {','.join(REQUIRED)})")
    for row in reader:
        unit_text = (row.get("einheit_id") or "").strip()
        org = units.get(int(unit_text)) if unit_text.isdigit() else None
        fields = [f'"timestamp": {json.dumps((row.get("timestamp") or "").strip() or None)}']
        fields += [f'"{name}": {_value(row.get(name))}' for name in ("verbrauch", "einspeisung")]
        fields += [
            f'"{key}": {_value(row.get(col))}' for col, key in OPTIONAL.items() if row.get(col)
        ]
        yield IngestMessage(
            topic=f"zev/{org or UNKNOWN_ORG}/{unit_text}/messwert",
            payload=("{" + ", ".join(fields) + "}").encode(),
            received_at=datetime.now(UTC),
            quelle="CSV",
        )


class _Units:
    def __init__(self, units: dict[int, UUID]) -> None:
        self._units = units

    async def organization_of(self, einheit_id: int) -> UUID | None:
        return self._units.get(einheit_id)


async def import_csv(
    settings: Settings, path: Path, progress: TextIO | None = sys.stderr
) -> ImportSummary:
    conn = await asyncpg.connect(settings.database_url)
    try:
        units: dict[int, UUID] = {
            r["id"]: r["organization_id"]
            for r in await conn.fetch("SELECT id, organization_id FROM einheit")
        }
    finally:
        await conn.close()
    validate = Validate(_Units(units), max_payload_bytes=settings.max_payload_bytes)
    broker = make_broker(settings.nats_servers, name="messwerte-import-csv")
    nc = await broker.connect()
    summary = ImportSummary()
    try:
        js = nc.jetstream()
        await declare_streams(js, settings.streams)
        # The stop event is never set: an import retries until stored.
        out = JetStreamOut(js, asyncio.Event(), streams=settings.streams)
        batch: list[tuple[str, bytes, dict[str, str]]] = []
        bar = tqdm(
            total=_data_rows(path),
            unit=" rows",
            desc="import-csv",
            file=progress,
            disable=progress is None,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        with bar, path.open(newline="", encoding="utf-8-sig") as handle:
            for message in rows_to_messages(csv.DictReader(handle), units):
                summary.rows += 1
                [verdict] = await validate(message)
                if isinstance(verdict, Reject):
                    summary.rejected[str(verdict.reason)] += 1
                else:
                    summary.accepted += 1
                body, headers = encode(message)
                batch.append((ingest_subject(message.topic), body, headers))
                if len(batch) >= BATCH:
                    await out.publish(batch)
                    bar.update(len(batch))
                    batch = []
            await out.publish(batch)
            bar.update(len(batch))
    finally:
        await broker.stop()
    return summary


def _data_rows(path: Path) -> int:
    """Lines after the header: the bar's total (a quoted line break makes it a little high)."""
    with path.open("rb") as handle:
        return max(sum(1 for _ in handle) - 1, 0)
