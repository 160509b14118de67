"""`pipeline asyncapi`: the AsyncAPI document of every subject and the JSON Schema of every
message, generated from the pydantic models (the document by FastStream).

Committed copies live in `schemas/` (`asyncapi.json`, `*.schema.json`) for consumers who read
them without running anything; `make test` fails when they drift from the code. Regenerate them
with `pipeline asyncapi --out schemas`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from schemas.bess import BessIntervalMessage, BessPayload, BessPersisted, BessSample
from schemas.messages import Persisted, Reading, Reject
from schemas.output import MesswertMessage
from schemas.output import json_schema as messwert_json_schema
from schemas.payload import MesswertPayload

SERVER = "nats://nats:4222"


@dataclass(frozen=True)
class Channel:
    subject: str
    model: type[BaseModel]
    title: str
    description: str


CHANNELS: tuple[Channel, ...] = (
    Channel(
        "ingest.{organizationId}.{einheitId}", MesswertPayload, "ingest",
        "An MQTT message from zev/{organizationId}/{einheitId}/messwert, its payload untouched "
        "(the schema is what a valid one holds); headers Mqtt-Topic and Received-At, and "
        "Quelle: CSV from import-csv. Internal (stream INGEST, work queue).",
    ),
    Channel(
        "valid.{organizationId}.{einheitId}", Reading, "valid",
        "A validated reading. Internal (stream VALID, work queue); Nats-Msg-Id: unit, "
        "timestamp, content hash, ingest sequence.",
    ),
    Channel(
        "unique.{organizationId}.{einheitId}", Reading, "unique",
        "A reading that is not an exact repeat. Internal (stream UNIQUE, work queue).",
    ),
    Channel(
        "persisted.{organizationId}.{einheitId}", Persisted, "persisted",
        "A raw row inserted or changed in zaehler_rohdaten. Internal (stream PERSISTED).",
    ),
    Channel(
        "dlq.{reason}", Reject, "dlq",
        "A rejected message with its reason, topic and payload (stream DLQ, kept 14 days).",
    ),
    Channel(
        "messwerte.{organizationId}.{einheitId}", MesswertMessage, "messwerte",
        "Every new or changed 15-minute interval of a unit (stream MESSWERTE, kept 400 days); "
        "header Nats-Msg-Id: {einheitId}:{zeit}:{revision}. The output for consumers.",
    ),
    Channel(
        "bess.ingest.{site}.{device}", BessPayload, "bess-ingest",
        "An MQTT message from bess/{site}/{device}/telemetry, its payload untouched (the schema "
        "is what a valid one holds); headers as on ingest. Internal (stream INGEST).",
    ),
    Channel(
        "bess.valid.{organizationId}.{site}.{device}", BessSample, "bess-valid",
        "A validated BESS sample. Internal (stream VALID, work queue).",
    ),
    Channel(
        "bess.unique.{organizationId}.{site}.{device}", BessSample, "bess-unique",
        "A BESS sample that is not an exact repeat. Internal (stream UNIQUE, work queue).",
    ),
    Channel(
        "bess.persisted.{organizationId}.{site}.{device}", BessPersisted, "bess-persisted",
        "A sample inserted or changed in bess_telemetry. Internal (stream PERSISTED).",
    ),
    Channel(
        "intervals.bess.{organizationId}.{site}.{device}", BessIntervalMessage, "bess-intervals",
        "Every new or changed 15-minute interval of a BESS device: energy charged and "
        "discharged, coverage, SoC, temperature, health, alarms (stream BESS_INTERVALS, kept "
        "400 days); header Nats-Msg-Id: bess:{site}:{device}:{intervalEnd}:{revision}. "
        "The output for consumers.",
    ),
)  # fmt: skip


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every subject the pipeline publishes."""
    broker = NatsBroker(SERVER, description="the pipeline's NATS JetStream")
    for channel in CHANNELS:
        broker.publisher(
            channel.subject,
            schema=channel.model,
            title=channel.title,
            description=channel.description,
        )
    spec = AsyncAPI(
        broker,
        title="messwerte pipeline",
        version=version("messwerte-pipeline"),
        description="Smart-meter readings and battery-storage telemetry from MQTT through "
        "JetStream stages into PostgreSQL, and 15-minute messwerte and BESS intervals out "
        "(design §1, §6, §13).",
        schema_version="3.0.0",
    ).to_specification()
    return json.loads(spec.to_json())  # type: ignore[no-any-return]


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every message model."""
    schemas = {"messwert.schema.json": messwert_json_schema()}
    for model in (
        MesswertPayload, Reading, Persisted, Reject,
        BessPayload, BessSample, BessPersisted, BessIntervalMessage,
    ):  # fmt: skip
        schema = model.model_json_schema(by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[f"{model.__name__.lower()}.schema.json"] = schema
    return schemas


def files() -> dict[str, str]:
    from pipeline import openapi

    out = {"asyncapi.json": _dump(document()), "openapi.json": _dump(openapi.document())}
    out.update({name: _dump(schema) for name, schema in json_schemas().items()})
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
