"""validate: topic and payload of an ingest message become a `Reading`, or a `Reject` with a reason.

Covers design §3: malformed JSON, wrong types, bad timestamps, negative or oversized values,
bad topics, unknown units and units of another organization (a security event, logged as
an error). A reading in the future is stored anyway, with a warning; one older than the raw
retention (PIPELINE_RAW_RETENTION_DAYS, when set) is refused `too_old`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, TypeVar
from uuid import UUID

import structlog
from pydantic import BaseModel, ValidationError

from schemas.messages import IngestMessage, Reading, Reject, RejectReason
from schemas.payload import MesswertPayload
from stages.directory import EinheitCache

__all__ = ["EinheitCache", "Refused", "Validate", "parse_json_object", "parse_payload"]

log = structlog.get_logger("stages.validate")

STAGE = "validate"
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
#: A reading further ahead than this (clock skew allowance) is logged as being in the future.
FUTURE_TOLERANCE = timedelta(seconds=60)
TOPIC_CACHE_SIZE = 100_000

_REASON_BY_ERROR = {
    "missing": RejectReason.MISSING_FIELD,
    "null_field": RejectReason.MISSING_FIELD,
    "invalid_timestamp": RejectReason.INVALID_TIMESTAMP,
    "negative_value": RejectReason.NEGATIVE_VALUE,
    "out_of_range": RejectReason.OUT_OF_RANGE,
    "invalid_number": RejectReason.INVALID_NUMBER,
}


class Refused(Exception):
    """The input is refused for `reason`; `detail` says why, for the DLQ entry and the log."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class UnitDirectory(Protocol):
    """Where validate learns which organization a unit belongs to."""

    async def organization_of(self, einheit_id: int) -> UUID | None: ...


def parse_topic(topic: str) -> tuple[UUID, int]:
    """`zev/{organizationId}/{einheitId}/messwert` -> (organization UUID, positive unit id)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "zev" or parts[3] != "messwert":
        raise Refused(
            RejectReason.INVALID_TOPIC,
            f"topic {topic[:200]!r} is not zev/{{org}}/{{einheit}}/messwert",
        )
    org_text, unit_text = parts[1], parts[2]
    try:
        if len(org_text) not in (32, 36):
            raise ValueError
        org = UUID(org_text)
    except ValueError:
        raise Refused(
            RejectReason.INVALID_TOPIC, f"organizationId {org_text[:80]!r} is not a UUID"
        ) from None
    if not (unit_text.isascii() and unit_text.isdigit() and len(unit_text) <= 18):
        raise Refused(
            RejectReason.INVALID_TOPIC, f"einheitId {unit_text[:80]!r} is not a positive integer"
        )
    einheit_id = int(unit_text)
    if einheit_id <= 0:
        raise Refused(RejectReason.INVALID_TOPIC, f"einheitId {unit_text!r} is not positive")
    return org, einheit_id


def _no_constants(name: str) -> Any:
    raise Refused(RejectReason.INVALID_NUMBER, f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        dupes = sorted({key for key in keys if keys.count(key) > 1})
        raise Refused(RejectReason.INVALID_JSON, f"duplicate keys {dupes[:5]}")
    return result


def _decoder(exact: bool) -> json.JSONDecoder:
    # Numbers parse straight to Decimal (no float rounding); NaN/Infinity and duplicate keys,
    # which json accepts by default, are refused. One decoder per kind, made once: json.loads
    # with these arguments builds a new one per call, which took half of its 3.5 µs.
    return json.JSONDecoder(
        parse_float=Decimal if exact else float,
        parse_int=Decimal if exact else int,
        parse_constant=_no_constants,
        object_pairs_hook=_unique_keys,
    )


_EXACT, _INEXACT = _decoder(exact=True), _decoder(exact=False)


def _is_unicode(data: Any) -> bool:
    """False when a string escape left a lone surrogate, which no UTF-8 text can hold."""
    try:
        json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(
    payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, *, exact: bool = True
) -> Any:
    """Decode a payload as JSON under the rules of design §3 (size, UTF-8, no NaN/Infinity, no
    duplicate keys, bounded nesting); numbers come back as exact `Decimal`s, or with
    `exact=False` as ints and floats (BESS values are stored as DOUBLE PRECISION anyway, and
    parsing them so costs a fraction)."""
    if len(payload) > max_bytes:
        raise Refused(
            RejectReason.PAYLOAD_TOO_LARGE, f"payload of {len(payload)} bytes exceeds {max_bytes}"
        )
    if not payload.strip():
        raise Refused(RejectReason.INVALID_JSON, "payload is empty")
    try:
        text = payload.decode("utf-8")
        data = (_EXACT if exact else _INEXACT).decode(text)
    except UnicodeDecodeError as exc:
        raise Refused(RejectReason.INVALID_JSON, f"payload is not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise Refused(
            RejectReason.INVALID_JSON, f"payload is not JSON: {exc.msg} at {exc.pos}"
        ) from None
    except RecursionError:
        raise Refused(RejectReason.INVALID_JSON, "payload is nested too deeply") from None
    if "\\u" in text.lower() and not _is_unicode(data):
        raise Refused(RejectReason.INVALID_JSON, "payload has a lone surrogate escape (\\ud800…)")
    return data


def parse_json_object(
    payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, *, exact: bool = True
) -> dict[str, Any]:
    """A payload that must be one JSON object (see `parse_json`)."""
    data = parse_json(payload, max_bytes, exact=exact)
    if not isinstance(data, dict):
        raise Refused(
            RejectReason.NOT_AN_OBJECT, f"payload is a JSON {type(data).__name__}, not an object"
        )
    return data


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: dict[str, Any], required: Collection[str]) -> M:
    """`data` as `model`, or `Refused` with the reason of its first problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise refusal_of(exc, required) from None


def parse_payload(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> MesswertPayload:
    """Decode and validate a payload; raises `Refused` with the reason of the first problem."""
    return validate_model(MesswertPayload, parse_json_object(payload, max_bytes), _REQUIRED)


def refusal_of(exc: ValidationError, required: Collection[str]) -> Refused:
    """The reject a pydantic error stands for: its type is the reason where it is one."""
    errors = exc.errors(include_url=False, include_input=True)
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "payload"
    kind = first["type"]
    reason = _REASON_BY_ERROR.get(kind)
    if reason is None:
        if first.get("input", ...) is None and field in required:
            reason = RejectReason.MISSING_FIELD
        else:
            reason = RejectReason.INVALID_NUMBER
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {_message(e)}" for e in errors[:5])
    return Refused(reason, detail)


_REQUIRED = {"timestamp", "verbrauch", "einspeisung"}


def _message(error: Any) -> str:
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "is_instance_of":
        value = error.get("input")
        if value is None:
            return "must not be null"
        return f"must be a JSON number, got {type(value).__name__} {str(value)[:40]!r}"
    return str(error["msg"])


def refuse_too_old(ts: datetime, now: datetime, retention: timedelta | None) -> None:
    """Design §3: a reading older than the raw retention is refused (`too_old`)."""
    if retention is not None and ts < now - retention:
        raise Refused(
            RejectReason.TOO_OLD,
            f"timestamp {ts.isoformat()} is older than the raw retention of "
            f"{retention.total_seconds() / 86_400:g} days (PIPELINE_RAW_RETENTION_DAYS): "
            "its interval's raw rows may be pruned, and a re-sum would be partial",
        )


class Validate:
    """Stage `validate`: ingest message -> `Reading` on `valid.…`, or `Reject` on `dlq.…`."""

    def __init__(
        self,
        units: UnitDirectory,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retention: timedelta | None = None,
    ) -> None:
        self._units = units
        self._clock = clock
        self._retention = retention
        self._max_payload_bytes = max_payload_bytes
        self._topics: dict[str, tuple[UUID, int]] = {}

    async def __call__(self, msg: IngestMessage) -> list[Reading | Reject]:
        try:
            return [await self._validate(msg)]
        except Refused as refused:
            self._log_reject(msg, refused)
            return [Reject.of(msg, refused.reason, refused.detail, STAGE)]

    def _parse(self, msg: IngestMessage) -> tuple[UUID, int, MesswertPayload]:
        # A fleet publishes on a few thousand topics over and over: parse each once.
        parsed = self._topics.get(msg.topic)
        if parsed is None:
            parsed = parse_topic(msg.topic)
            if len(self._topics) >= TOPIC_CACHE_SIZE:  # made-up topics must not grow memory
                self._topics.clear()
            self._topics[msg.topic] = parsed
        org, einheit_id = parsed
        size = msg.payload_size or len(msg.payload)
        if size > self._max_payload_bytes:
            raise Refused(
                RejectReason.PAYLOAD_TOO_LARGE,
                f"payload of {size} bytes exceeds {self._max_payload_bytes}",
            )
        return org, einheit_id, parse_payload(msg.payload, self._max_payload_bytes)

    async def _validate(self, msg: IngestMessage) -> Reading:
        try:
            org, einheit_id, payload = self._parse(msg)
        except Refused:
            raise
        except Exception as exc:
            # Parsing is deterministic: whatever it raises, the message would raise again on
            # every retry. Reject it rather than hold up every message behind it.
            log.error("unexpected error parsing a message", error=repr(exc), topic=msg.topic[:200])
            raise Refused(
                RejectReason.UNDECODABLE, f"message could not be parsed: {exc!r}"
            ) from None
        owner = await self._units.organization_of(einheit_id)
        if owner is None:
            raise Refused(RejectReason.UNKNOWN_UNIT, f"einheit {einheit_id} is unknown")
        if owner != org:
            raise Refused(
                RejectReason.ORGANIZATION_MISMATCH,
                f"einheit {einheit_id} does not belong to organization {org}",
            )
        now = self._clock()
        refuse_too_old(payload.timestamp, now, self._retention)
        if payload.timestamp - now > FUTURE_TOLERANCE:
            log.warning(
                "reading in the future, stored anyway",
                einheit_id=einheit_id,
                timestamp=payload.timestamp.isoformat(),
            )
        return Reading(
            organization_id=org,
            einheit_id=einheit_id,
            timestamp=payload.timestamp.astimezone(UTC),
            verbrauch=payload.verbrauch,
            einspeisung=payload.einspeisung,
            zaehlerstand_verbrauch=payload.zaehlerstand_verbrauch,
            zaehlerstand_einspeisung=payload.zaehlerstand_einspeisung,
            received_at=msg.received_at,
            ingest_seq=msg.ingest_seq,
            quelle=msg.quelle,
            redelivered=msg.redelivered,
        )

    @staticmethod
    def _log_reject(msg: IngestMessage, refused: Refused) -> None:
        fields = {"reason": str(refused.reason), "detail": refused.detail, "topic": msg.topic[:200]}
        if refused.reason is RejectReason.ORGANIZATION_MISMATCH:
            log.error("security: unit published under another organization", **fields)
        else:
            log.warning("message rejected", **fields)
