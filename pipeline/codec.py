"""How each message type travels on JetStream: body, headers and `Nats-Msg-Id`.

An ingest message keeps the MQTT payload as its body, untouched, with the topic and receive
time in headers; every other message is its model's JSON. Decoding takes the JetStream stream
sequence of an ingest message as its `ingest_seq`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from schemas.messages import IngestMessage

TOPIC_HEADER = "Mqtt-Topic"
RECEIVED_HEADER = "Received-At"
MSG_ID_HEADER = "Nats-Msg-Id"
SIZE_HEADER = "Payload-Size"
SOURCE_HEADER = "Quelle"
ORGANIZATION_HEADER = "Organization-Id"

M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> tuple[bytes, dict[str, str]]:
    """Body and headers for a message; headers carry the idempotency key where it has one."""
    headers: dict[str, str]
    if isinstance(message, IngestMessage):
        headers = {TOPIC_HEADER: message.topic, RECEIVED_HEADER: message.received_at.isoformat()}
        if message.payload_size is not None:
            headers[SIZE_HEADER] = str(message.payload_size)
        if message.quelle != "MQTT":
            headers[SOURCE_HEADER] = message.quelle
        if message.organization_id is not None:
            headers[ORGANIZATION_HEADER] = str(message.organization_id)
        return message.payload, headers
    headers = {}
    msg_id = getattr(message, "msg_id", None)
    if msg_id:
        headers[MSG_ID_HEADER] = msg_id
    to_json = getattr(message, "to_json", None)
    body = to_json() if to_json is not None else message.model_dump_json().encode()
    return body, headers


def decode(kind: type[M], msg: Any) -> M:
    """A received JetStream message as `kind`; raises ValueError if it is not one."""
    if kind is IngestMessage:
        headers = msg.headers or {}
        size = headers.get(SIZE_HEADER)
        return IngestMessage(  # type: ignore[return-value]
            topic=headers.get(TOPIC_HEADER, ""),
            payload=msg.data,
            received_at=datetime.fromisoformat(headers[RECEIVED_HEADER]),
            ingest_seq=msg.metadata.sequence.stream,
            payload_size=int(size) if size is not None else None,
            quelle=headers.get(SOURCE_HEADER, "MQTT"),
            organization_id=headers.get(ORGANIZATION_HEADER),
        )
    return kind.model_validate_json(msg.data)
