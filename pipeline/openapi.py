"""The OpenAPI 3.1 document of the HTTP ingest API (design §12), generated from its routes and
the pydantic models of `schemas.api`; committed as `schemas/openapi.json` and drift-checked
with the AsyncAPI document (`pipeline asyncapi --out schemas` writes both)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.api import ApiError, BessIngestItem, Health, IngestAnswer, LastSample, MeterItem
from stages.http_ingest import BESS_PATH, MAX_ITEMS, METER_PATH

_REF = "#/components/schemas/{model}"
LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, **headers: str) -> dict[str, Any]:
    response = _json(_ref(ApiError), description)
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


UNAUTHORIZED = _error(
    "missing, unknown or revoked token", **{"WWW-Authenticate": 'Bearer realm="messwerte"'}
)
UNAVAILABLE = _error(
    "JetStream or the database cannot store or answer now; retry (nothing is doubled)",
    **{"Retry-After": "seconds to wait"},
)


def _ingest(item: type[BaseModel], summary: str) -> dict[str, Any]:
    body = {
        "oneOf": [
            _ref(item),
            {"type": "array", "items": _ref(item), "minItems": 1, "maxItems": MAX_ITEMS},
        ]
    }
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "202": _json(_ref(IngestAnswer), "at least one item accepted, all of it stored"),
                "400": _error("not JSON, not an object or array, or an empty or over-long array"),
                "401": UNAUTHORIZED,
                "403": _json(
                    _ref(IngestAnswer),
                    "none accepted, and an item's unit or device is another organization's",
                ),
                "413": _error("body larger than PIPELINE_API_MAX_BODY_BYTES"),
                "415": _error("content type other than JSON"),
                "422": _json(_ref(IngestAnswer), "no item accepted"),
                "503": UNAVAILABLE,
            },
        }
    }


def document() -> dict[str, Any]:
    models = (MeterItem, BessIngestItem, IngestAnswer, ApiError, LastSample, Health)
    _, definitions = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    name = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "messwerte ingest API",
            "version": version("messwerte-pipeline"),
            "description": "Meter readings and BESS telemetry over HTTP, into the same stages "
            "as MQTT (design §12). Each item is judged alone; 202 once JetStream stored them.",
        },
        "paths": {
            METER_PATH: _ingest(MeterItem, "post meter readings (quelle API)"),
            BESS_PATH: _ingest(BessIngestItem, "post BESS telemetry"),
            "/api/last": {
                "get": {
                    "summary": "the newest BESS samples of the token's organization",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": LIMIT},
                        {"name": "site", "in": "query", "schema": name},
                        {"name": "device", "in": "query", "schema": name},
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": _ref(LastSample)}, "newest first, by ts"
                        ),
                        "400": _error("limit, site or device out of range"),
                        "401": UNAUTHORIZED,
                        "503": UNAVAILABLE,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "the status and body of /health; no token needed",
                    "responses": {
                        "200": _json(_ref(Health), "every component of this process is up"),
                        "503": _json(_ref(Health), "a component is down"),
                    },
                }
            },
        },
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from `pipeline token create`",
                }
            },
        },
    }
