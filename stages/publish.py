"""publish: an outbox row (a new or changed `messwerte` row) becomes the output message.

The pipeline claims outbox rows, publishes each message on `messwerte.{org}.{einheit}` with
`Nats-Msg-Id: {einheitId}:{zeit}:{revision}` (so a re-publish after a crash is dropped by
JetStream), and deletes the rows once JetStream has stored them. `Outbox` is the database half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.messages import QUARTER_HOUR
from schemas.output import MesswertMessage
from stages.db import Database

STAGE = "publish"

CLAIM_SQL = """
SELECT id, einheit_id, organization_id, zeit, verbrauch, einspeisung, anzahl_rohwerte, quelle,
       revision
FROM messwerte_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""


def to_message(row: Any) -> MesswertMessage:
    """Stage `publish`: outbox row -> `MesswertMessage`."""
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


async def claim(conn: Database, limit: int) -> list[Any]:
    """Lock up to `limit` outbox rows, oldest first; call inside a transaction."""
    return await conn.fetch(CLAIM_SQL, limit)


async def done(conn: Database, ids: Sequence[int]) -> None:
    """Remove published rows; call in the transaction that claimed them."""
    await conn.execute("DELETE FROM messwerte_outbox WHERE id = ANY($1::bigint[])", list(ids))
