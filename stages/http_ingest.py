"""The pure half of the HTTP ingest API (design §12): a request body becomes ingest messages,
one per item, as the MQTT bridge makes them of MQTT messages.

A meter reading posted as `{"einheitId": 123, "timestamp": …}` becomes what its meter would
have published on `zev/{token's organization}/123/messwert`; a BESS item becomes a message on
`bess/{site}/{device}/telemetry`. Both carry `quelle='API'` and the token's organization, and
are then judged by the same validate stage functions as MQTT messages. What this half decides
itself is only what MQTT has no equivalent of: the shape of the body, and the unit or device an
item names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from schemas.bess import NAME_PATTERN
from schemas.messages import IngestMessage, Reject, RejectReason
from stages.validate import Refused, parse_json

STAGE = "http_ingest"
MAX_ITEMS = 1000
METER_PATH = "/api/zev/messwerte"
BESS_PATH = "/api/ingest"


class BodyRefused(Exception):
    """The body as a whole is refused (400): not JSON, not an object or array, or too many."""


def items_of(body: bytes, max_items: int = MAX_ITEMS) -> list[Any]:
    """The items of a body: one object, or an array of 1 to `max_items` of them."""
    try:
        data = parse_json(body, max_bytes=len(body) or 1)
    except Refused as refused:
        raise BodyRefused(refused.detail.replace("payload", "body")) from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise BodyRefused(f"body is a JSON {type(data).__name__}, not an object or an array")
    if not 1 <= len(data) <= max_items:
        raise BodyRefused(f"an array of {len(data)} items; 1 to {max_items} are accepted")
    return data


def dumps(value: Any) -> str:
    """JSON of a parsed value, numbers exactly as they were sent.

    Hand-written because `json` writes a `Decimal` only as a string or through a float, and
    both would change what validate reads; values come from `parse_json`, so they are dicts,
    lists, strings, Decimals, booleans and None, nested no deeper than it allows."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value)


def _meter(item: dict[str, Any], org: UUID) -> tuple[str, dict[str, Any]]:
    if item.get("einheitId") is None:
        raise Refused(RejectReason.MISSING_FIELD, "einheitId: required field is missing")
    unit = item["einheitId"]
    if not (isinstance(unit, Decimal) and unit == unit.to_integral_value() and 0 < unit < 10**18):
        raise Refused(
            RejectReason.INVALID_TOPIC, f"einheitId {str(unit)[:40]!r} is not a positive integer"
        )
    payload = {k: v for k, v in item.items() if k != "einheitId"}
    return f"zev/{org}/{int(unit)}/messwert", payload


def _bess(item: dict[str, Any], org: UUID) -> tuple[str, dict[str, Any]]:
    names = []
    for name in ("site", "device"):
        value = item.get(name)
        if value is None:
            raise Refused(RejectReason.MISSING_FIELD, f"{name}: required field is missing")
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise Refused(
                RejectReason.OUT_OF_RANGE,
                f"{name} must be 1 to 64 characters of A-Z a-z 0-9 _ -, got {str(value)[:80]!r}",
            )
        names.append(value)
    return f"bess/{names[0]}/{names[1]}/telemetry", item


#: What each ingest path makes of one item: the MQTT topic it stands for and its payload.
ADDRESSES: dict[str, Callable[[dict[str, Any], UUID], tuple[str, dict[str, Any]]]] = {
    METER_PATH: _meter,
    BESS_PATH: _bess,
}


def to_ingest(path: str, item: Any, org: UUID, received_at: datetime) -> IngestMessage:
    """An item as the ingest message its device would have sent over MQTT; `Refused` if it
    names no valid unit or device."""
    if not isinstance(item, dict):
        raise Refused(
            RejectReason.NOT_AN_OBJECT, f"item is a JSON {type(item).__name__}, not an object"
        )
    topic, payload = ADDRESSES[path](item, org)
    return IngestMessage(
        topic=topic,
        payload=dumps(payload).encode(),
        received_at=received_at,
        quelle="API",
        organization_id=org,
    )


def rejected(path: str, item: Any, reason: RejectReason, detail: str, at: datetime) -> Reject:
    """A refused item for `dlq.{reason}`, with the request's path as its topic."""
    original = IngestMessage(topic=path, payload=dumps(item).encode(), received_at=at, quelle="API")
    return Reject.of(original, reason, detail, STAGE)


@dataclass
class Verdict:
    """The answer to one request's items (design §12)."""

    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused_by_owner: bool = False

    def refuse(self, index: int, reason: RejectReason, detail: str) -> None:
        self.rejected.append({"index": index, "reason": str(reason), "detail": detail})
        if reason is RejectReason.ORGANIZATION_MISMATCH:
            self.refused_by_owner = True

    @property
    def status(self) -> int:
        if self.accepted:
            return 202
        return 403 if self.refused_by_owner else 422

    def body(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejected": self.rejected}
