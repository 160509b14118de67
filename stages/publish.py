"""publish: an outbox row (a new or changed aggregate) becomes the output message.

The pipeline claims outbox rows, publishes each message on its subject with its `Nats-Msg-Id`
(`{einheitId}:{zeit}:{revision}` for messwerte, so a re-publish after a crash is dropped by
JetStream), and deletes the rows once JetStream has stored them. An `Outbox` is the database
half of one kind: which table, and how a row becomes a message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.bess import BessIntervalMessage
from schemas.messages import QUARTER_HOUR
from schemas.output import MesswertMessage
from stages.db import Database

STAGE = "publish"


def to_message(row: Any) -> MesswertMessage:
    """Stage `publish`: `messwerte_outbox` row -> `MesswertMessage`."""
    return MesswertMessage(
        organization_id=row["organization_id"],
        einheit_id=row["einheit_id"],
        zeit=row["zeit"],
        interval_start=row["zeit"] - QUARTER_HOUR,
        verbrauch=row["verbrauch"],
        einspeisung=row["einspeisung"],
        anzahl_rohwerte=row["anzahl_rohwerte"],
        quelle=row["quelle"],
        revision=row["revision"],
    )


def to_bess_message(row: Any) -> BessIntervalMessage:
    """Stage `publish`: `bess_interval_outbox` row (the message, as JSON) -> the message."""
    return BessIntervalMessage.model_validate_json(row["body"])


@dataclass(frozen=True)
class Outbox:
    """One outbox table: its rows, oldest first, and the message each becomes."""

    table: str
    columns: str
    to_message: Callable[[Any], MesswertMessage | BessIntervalMessage]

    @property
    def channel(self) -> str:
        """What `LISTEN` waits on: a trigger notifies on every insert."""
        return self.table

    async def claim(self, conn: Database, limit: int) -> list[Any]:
        """Lock up to `limit` rows, oldest first; call inside a transaction."""
        return await conn.fetch(
            f"SELECT id, {self.columns} FROM {self.table} ORDER BY id LIMIT $1 "
            "FOR UPDATE SKIP LOCKED",
            limit,
        )

    async def done(self, conn: Database, ids: Sequence[int]) -> None:
        """Remove published rows; call in the transaction that claimed them."""
        await conn.execute(f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[])", list(ids))


MESSWERTE = Outbox(
    "messwerte_outbox",
    "einheit_id, organization_id, zeit, verbrauch, einspeisung, anzahl_rohwerte, quelle, revision",
    to_message,
)
BESS_INTERVALS = Outbox("bess_interval_outbox", "body::text AS body", to_bess_message)
