"""The JSON object a smart meter publishes on `zev/{organizationId}/{einheitId}/messwert`.

Validation is strict on purpose (design §2/§3): numbers must be JSON numbers (no strings, no
booleans, no NaN/Infinity), timestamps ISO 8601 with an offset, values >= 0 and within
NUMERIC(12,4). Each rule raises an error whose type is the reject reason that ends up in the
`dlq.{reason}` subject, so a reason is decided here once, not re-derived elsewhere.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas.messages import interval_end

#: NUMERIC(12,4): 8 digits before the point, 4 after.
NUMERIC_SCALE = Decimal("0.0001")
NUMERIC_LIMIT = Decimal("100000000")

# ISO 8601 extended format with seconds optional, fraction optional, offset required.
# `datetime.fromisoformat` alone would also take week dates, ordinal dates and bare dates,
# which no meter sends and which we would rather reject with a clear reason.
_ISO_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:?\d{2})"
)


def _parse_timestamp(value: Any) -> datetime:
    if value is None:
        raise PydanticCustomError("null_field", "required field is null")
    if not isinstance(value, str):
        raise PydanticCustomError(
            "invalid_timestamp",
            "timestamp must be an ISO 8601 string, got {kind}",
            {"kind": type(value).__name__},
        )
    text = value.strip()
    match = _ISO_TIMESTAMP.fullmatch(text)
    if match is None:
        raise PydanticCustomError(
            "invalid_timestamp",
            "timestamp {value} is not ISO 8601 with a UTC offset",
            {"value": repr(value[:64])},
        )
    text = text.replace(",", ".")
    if "." in text:
        # Python parses at most 6 fractional digits; PostgreSQL keeps microseconds too.
        head, _, tail = text.partition(".")
        digits = re.match(r"\d+", tail)
        assert digits is not None
        text = f"{head}.{digits.group()[:6].ljust(6, '0')}{tail[digits.end() :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PydanticCustomError(
            "invalid_timestamp",
            "timestamp {value} is not a valid date: {error}",
            {"value": repr(value[:64]), "error": str(exc)},
        ) from None
    if parsed.tzinfo is None:  # pragma: no cover - the regex requires an offset
        raise PydanticCustomError("invalid_timestamp", "timestamp has no UTC offset")
    try:
        # In UTC, and with its quarter hour, still a representable date? Only a date within
        # a day of year 1 or 9999 can fail, and asking costs a microsecond, a sixth of
        # validating a payload.
        if not 1 < parsed.year < 9999:
            interval_end(parsed)
    except OverflowError:
        raise PydanticCustomError(
            "invalid_timestamp", "timestamp {value} is out of range", {"value": repr(value[:64])}
        ) from None
    return parsed


def _kwh(value: Decimal) -> Decimal:
    if value.is_nan() or value.is_infinite():
        raise PydanticCustomError("invalid_number", "value must be a finite number")
    if value < 0:
        raise PydanticCustomError(
            "negative_value", "value {value} is negative", {"value": str(value)}
        )
    # PostgreSQL rounds a NUMERIC(12,4) value half away from zero; do the same so that what we
    # compare for duplicates is exactly what the database will hold.
    rounded = (
        value.quantize(NUMERIC_SCALE, rounding=ROUND_HALF_UP) if value.adjusted() < 9 else value
    )
    if rounded >= NUMERIC_LIMIT:
        raise PydanticCustomError(
            "out_of_range", "value {value} does not fit NUMERIC(12,4)", {"value": str(value)[:40]}
        )
    return rounded + 0  # normalises -0 to 0


Kwh = Annotated[
    Decimal,
    Field(strict=True),
    AfterValidator(_kwh),
    # A JSON number only (strict), which pydantic's own schema of a Decimal does not say.
    WithJsonSchema({"type": "number", "minimum": 0, "exclusiveMaximum": 100_000_000}),
]
Timestamp = Annotated[datetime, BeforeValidator(_parse_timestamp)]


class MesswertPayload(BaseModel):
    """A smart meter reading as published over MQTT (design §2). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    timestamp: Timestamp = Field(description="time of the reading, ISO 8601 with offset")
    verbrauch: Kwh = Field(description="consumption since the previous reading, kWh")
    einspeisung: Kwh = Field(description="feed-in since the previous reading, kWh")
    zaehlerstand_verbrauch: Kwh | None = Field(
        default=None, alias="zaehlerstandVerbrauch", description="absolute meter count, kWh"
    )
    zaehlerstand_einspeisung: Kwh | None = Field(
        default=None, alias="zaehlerstandEinspeisung", description="absolute meter count, kWh"
    )
