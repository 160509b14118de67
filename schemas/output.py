"""The message downstream consumers read on `messwerte.{organizationId}.{einheitId}` (design §6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

SCHEMA_FILE = Path(__file__).with_name("messwert.schema.json")

# Sums go out as JSON numbers (design §6). NUMERIC(12,4) has at most 12 significant digits,
# which a float's shortest repr reproduces exactly.
JsonNumber = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, the form used in the JSON body and in `Nats-Msg-Id`."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcTime = Annotated[datetime, PlainSerializer(iso_utc, return_type=str, when_used="json")]


class MesswertMessage(BaseModel):
    """One 15-minute aggregate of one unit; re-published with a higher revision on every change."""

    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://messwerte.invalid/schemas/messwert.schema.json"},
    )

    organization_id: UUID = Field(alias="organizationId")
    einheit_id: int = Field(alias="einheitId", gt=0)
    zeit: UtcTime = Field(description="end of the 15-minute interval, ISO 8601 UTC")
    interval_start: UtcTime = Field(alias="intervalStart", description="start of the interval")
    verbrauch: JsonNumber = Field(description="sum of consumption over the interval, kWh")
    einspeisung: JsonNumber = Field(description="sum of feed-in over the interval, kWh")
    anzahl_rohwerte: int = Field(alias="anzahlRohwerte", ge=1, description="raw readings summed")
    quelle: str = Field(
        description="source all the raw readings share: 'MQTT', 'CSV' or 'API' ('MQTT' if mixed)"
    )
    revision: int = Field(ge=1, description="1 for the first publication, +1 on every change")

    @property
    def subject(self) -> str:
        return f"messwerte.{self.organization_id}.{self.einheit_id}"

    @property
    def msg_id(self) -> str:
        return f"{self.einheit_id}:{iso_utc(self.zeit)}:{self.revision}"

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def json_schema() -> dict[str, Any]:
    """JSON Schema of the output message, as shipped in `schemas/messwert.schema.json`."""
    schema = MesswertMessage.model_json_schema(by_alias=True, mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_json_schema(path: Path = SCHEMA_FILE) -> None:
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
