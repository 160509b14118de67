"""Battery storage (BESS) telemetry (design §13): the payload a device sends, the validated
sample that travels between stages, the key of a stored sample, and the 15-minute interval
published on `intervals.bess.{organizationId}.{site}.{device}`.

Range rules live in the payload model, each raising an error whose type is the reject reason
(`out_of_range` for a value outside its rule), as `schemas.payload` does for meter readings.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from schemas.messages import internal_msg_id
from schemas.output import UtcTime, iso_utc
from schemas.payload import Timestamp

#: What `site` and `device` may be: safe as MQTT topic levels and NATS subject tokens.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ALARMS = 64
MAX_ALARM_CHARS = 64
POWER_LIMIT_KW = 1_000_000.0


def _number(low: float | None, high: float | None) -> Callable[[Any], float]:
    """A check: a finite JSON number within [low, high] (either end open when None)."""

    def check(value: Any) -> float:
        if value is None:
            raise PydanticCustomError("null_field", "required field is null")
        if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
            raise PydanticCustomError(
                "invalid_number", "must be a JSON number, got {kind} {value}",
                {"kind": type(value).__name__, "value": repr(value)[:40]},
            )  # fmt: skip
        try:
            as_float = float(value)
        except OverflowError:  # an integer beyond any double
            as_float = math.inf
        if not math.isfinite(as_float):
            raise PydanticCustomError(
                "out_of_range", "value {value} is not a finite double", {"value": str(value)[:40]}
            )
        if (low is not None and as_float < low) or (high is not None and as_float > high):
            bounds = (
                f"{'-∞' if low is None else f'{low:g}'} … {'∞' if high is None else f'{high:g}'}"
            )
            raise PydanticCustomError(
                "out_of_range",
                "value {value} is outside {bounds}",
                {"value": str(value)[:40], "bounds": bounds},
            )
        return as_float + 0.0  # -0.0 is stored and compared as 0

    return check


def _schema(low: float | None, high: float | None) -> WithJsonSchema:
    """What the JSON Schema says of a ranged number (the check runs before pydantic's own,
    which would also take strings, so pydantic's own schema would be wrong)."""
    schema: dict[str, Any] = {"type": "number"}
    if low is not None:
        schema["minimum"] = low
    if high is not None:
        schema["maximum"] = high
    return WithJsonSchema(schema)


_P = POWER_LIMIT_KW
Percent = Annotated[float, BeforeValidator(_number(0, 100)), _schema(0, 100)]
Power = Annotated[float, BeforeValidator(_number(-_P, _P)), _schema(-_P, _P)]
NonNegative = Annotated[float, BeforeValidator(_number(0, None)), _schema(0, None)]
Finite = Annotated[float, BeforeValidator(_number(None, None)), _schema(None, None)]
CellTemperature = Annotated[float, BeforeValidator(_number(-60, 150)), _schema(-60, 150)]


def _alarms(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PydanticCustomError(
            "out_of_range", "alarms must be an array of strings, got {kind}",
            {"kind": type(value).__name__},
        )  # fmt: skip
    if len(value) > MAX_ALARMS:
        raise PydanticCustomError(
            "out_of_range", "{n} alarms, at most {limit} allowed",
            {"n": len(value), "limit": MAX_ALARMS},
        )  # fmt: skip
    for alarm in value:
        if not isinstance(alarm, str) or not 1 <= len(alarm) <= MAX_ALARM_CHARS:
            raise PydanticCustomError(
                "out_of_range",
                "each alarm must be a string of 1 to {limit} characters, got {alarm}",
                {"limit": MAX_ALARM_CHARS, "alarm": repr(alarm)[:80]},
            )
    return tuple(value)


def _name(field: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value is None:
            raise PydanticCustomError("null_field", "required field is null")
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise PydanticCustomError(
                "out_of_range",
                "{field} must be 1 to 64 characters of A-Z a-z 0-9 _ -, got {value}",
                {"field": field, "value": repr(value)[:80]},
            )
        return value

    return check


class BessPayload(BaseModel):
    """A BESS telemetry sample as a device sends it (design §13). Unknown fields are ignored;
    `site` and `device` are checked against the topic (MQTT) or required (HTTP) by validate."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ts: Timestamp = Field(description="time of the sample, ISO 8601 with offset")
    site: Any = Field(default=None, description="must equal the topic's site where given")
    device: Any = Field(default=None, description="must equal the topic's device where given")
    soc: Percent = Field(description="state of charge, %, 0 … 100")
    p: Power = Field(description="total power, kW, negative = charging, |p| ≤ 1,000,000")
    p_ch: NonNegative | None = Field(default=None, description="charging power, kW, ≥ 0")
    p_dis: NonNegative | None = Field(default=None, description="discharging power, kW, ≥ 0")
    v_dc: NonNegative | None = Field(default=None, description="DC voltage, V, ≥ 0")
    i_dc: Finite | None = Field(default=None, description="DC current, A")
    t_cell_max: CellTemperature | None = Field(
        default=None, description="highest cell temperature, °C, −60 … 150"
    )
    soh: Percent | None = Field(default=None, description="state of health, %, 0 … 100")
    alarms: Annotated[tuple[str, ...], BeforeValidator(_alarms)] = Field(
        default=(), description="active alarms, at most 64, each 1 to 64 characters"
    )


_NAME_SCHEMA = WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"})
SiteName = Annotated[str, BeforeValidator(_name("site")), _NAME_SCHEMA]
DeviceName = Annotated[str, BeforeValidator(_name("device")), _NAME_SCHEMA]


class BessItem(BessPayload):
    """An item of `POST /api/ingest`: a payload that names its site and device itself."""

    site: SiteName = Field(description="1 to 64 characters of A-Z a-z 0-9 _ -")
    device: DeviceName = Field(description="1 to 64 characters of A-Z a-z 0-9 _ -")


#: The measured values of a sample, in the order of `bess_telemetry`'s columns.
VALUE_FIELDS = ("soc", "p", "p_ch", "p_dis", "v_dc", "i_dc", "t_cell_max", "soh")


class BessSample(BaseModel):
    """A validated sample of one device; travels on `bess.valid.…` and `bess.unique.…`."""

    model_config = ConfigDict(frozen=True)

    organization_id: UUID
    site: str
    device: str
    ts: datetime
    soc: float
    p: float
    p_ch: float | None = None
    p_dis: float | None = None
    v_dc: float | None = None
    i_dc: float | None = None
    t_cell_max: float | None = None
    soh: float | None = None
    alarms: tuple[str, ...] = ()
    received_at: datetime
    ingest_seq: int = 0
    quelle: str = "MQTT"
    redelivered: bool = False
    #: Plausibility checks it failed (`future_timestamp`, `power_balance`); stored anyway.
    warnings: tuple[str, ...] = ()

    @property
    def topic(self) -> str:
        """The MQTT topic a sample of this device arrives on."""
        return f"bess/{self.site}/{self.device}/telemetry"

    @property
    def key(self) -> tuple[str, str, datetime]:
        return (self.site, self.device, self.ts)

    @property
    def order(self) -> tuple[datetime, int]:
        """Broker order, as for meter readings (`Reading.order`)."""
        return (self.received_at, self.ingest_seq)

    @property
    def values(self) -> tuple[Any, ...]:
        return (*(getattr(self, name) for name in VALUE_FIELDS), self.alarms)

    @cached_property
    def content_hash(self) -> str:
        parts = (self.site, self.device, self.ts.astimezone(UTC).isoformat(), repr(self.values))
        return hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()

    @property
    def msg_id(self) -> str:
        return internal_msg_id(
            f"bess:{self.site}:{self.device}", self.ts, self.content_hash, self.ingest_seq
        )


class BessPersisted(BaseModel):
    """A sample that persist inserted or changed, so the intervals around it may change."""

    model_config = ConfigDict(frozen=True)

    organization_id: UUID
    site: str
    device: str
    ts: datetime
    content_hash: str
    ingest_seq: int = 0

    @property
    def topic(self) -> str:
        return f"bess/{self.site}/{self.device}/telemetry"

    @property
    def msg_id(self) -> str:
        return internal_msg_id(
            f"bess:{self.site}:{self.device}", self.ts, self.content_hash, self.ingest_seq
        )


class BessIntervalMessage(BaseModel):
    """One 15-minute interval of one device; re-published with a higher revision on a change."""

    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        json_schema_extra={
            "$id": "https://messwerte.invalid/schemas/bessintervalmessage.schema.json"
        },
    )

    organization_id: UUID = Field(alias="organizationId")
    site: str
    device: str
    interval_start: UtcTime = Field(alias="intervalStart", description="ISO 8601 UTC")
    interval_end: UtcTime = Field(alias="intervalEnd", description="ISO 8601 UTC")
    energy_charged_kwh: float = Field(
        alias="energyChargedKwh", ge=0, description="∫ max(−p, 0) dt over the interval, kWh"
    )
    energy_discharged_kwh: float = Field(
        alias="energyDischargedKwh", ge=0, description="∫ max(p, 0) dt over the interval, kWh"
    )
    covered_seconds: int = Field(
        alias="coveredSeconds", ge=0, le=900, description="seconds covered by stretches"
    )
    samples: int = Field(ge=0, description="samples with ts in the interval")
    soc_min: float | None = Field(alias="socMin")
    soc_max: float | None = Field(alias="socMax")
    soc_last: float | None = Field(alias="socLast", description="soc of the latest sample")
    t_cell_max: float | None = Field(alias="tCellMax", description="largest cell temperature")
    soh_last: float | None = Field(alias="sohLast", description="of the latest sample with one")
    alarms: list[str] = Field(description="sorted, distinct union of the samples' alarms")
    revision: int = Field(ge=1)

    @property
    def subject(self) -> str:
        return f"intervals.bess.{self.organization_id}.{self.site}.{self.device}"

    @property
    def msg_id(self) -> str:
        return f"bess:{self.site}:{self.device}:{iso_utc(self.interval_end)}:{self.revision}"

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()
