"""The bodies of the HTTP ingest API (design §12), for its OpenAPI document.

Requests are judged by the validate stage functions, not by these models: they describe what
a valid item holds (`MesswertPayload` and `BessItem` carry the rules) and what each answer is.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.bess import VALUE_FIELDS, BessItem
from schemas.payload import MesswertPayload

#: The columns of `bess_telemetry` that `GET /api/last` returns, by their payload names.
LAST_COLUMNS = ("site", "device", "ts", *VALUE_FIELDS, "alarms", "quelle")


class MeterItem(MesswertPayload):
    """A meter reading posted over HTTP: the MQTT payload of design §2 and the unit it is of,
    which must belong to the token's organization."""

    einheit_id: int = Field(alias="einheitId", gt=0, description="the unit (einheit.id)")


class BessIngestItem(BessItem):
    """A BESS telemetry sample posted over HTTP (design §13); `site` and `device` name a device
    registered for the token's organization."""


class RejectedItem(BaseModel):
    index: int = Field(ge=0, description="position of the item in the request, from 0")
    reason: str = Field(description="the reject reason, as in dlq.{reason}")
    detail: str = Field(description="what is wrong with it")


class IngestAnswer(BaseModel):
    """202: at least one item accepted and stored; 422/403: none accepted."""

    accepted: int = Field(ge=0, description="items accepted and stored in JetStream")
    rejected: list[RejectedItem]


class ApiError(BaseModel):
    error: str = Field(description="what is wrong with the request")


class LastSample(BaseModel):
    """A stored BESS sample, newest first; fields the sample lacked are null."""

    model_config = ConfigDict(extra="forbid")

    site: str
    device: str
    ts: str = Field(description="ISO 8601 UTC")
    soc: float
    p: float
    p_ch: float | None
    p_dis: float | None
    v_dc: float | None
    i_dc: float | None
    t_cell_max: float | None
    soh: float | None
    alarms: list[str]
    quelle: str = Field(description="'MQTT' or 'API'")


class Health(BaseModel):
    """The body of `/health` (design §9)."""

    model_config = ConfigDict(extra="allow")

    status: str = Field(description="UP or DOWN")
    components: dict[str, Any]
