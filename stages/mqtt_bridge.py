"""The pure half of the MQTT bridge: an MQTT message becomes an ingest envelope and a subject.

The payload is carried untouched; the topic and receive time travel with it. The subject
`ingest.{organizationId}.{einheitId}` uses the topic's tokens only where they are safe NATS
subject tokens; anything else (a `.`, `*`, `>` or space in a token, a token that is too long)
goes to `ingest.unroutable`, where validate rejects it with its reason.
"""

from __future__ import annotations

import re
from datetime import datetime

from schemas.messages import IngestMessage

#: What the bridge subscribes to (QoS 1, persistent session).
SUBSCRIPTION = "zev/+/+/messwert"

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
UNROUTABLE_SUBJECT = "ingest.unroutable"


#: What of an oversized payload travels on, for the DLQ entry that explains the reject.
OVERSIZE_KEPT_BYTES = 1024


def to_ingest(
    topic: str, payload: bytes, received_at: datetime, max_payload_bytes: int, ingest_seq: int = 0
) -> IngestMessage:
    """Wrap one MQTT message; the payload is not inspected here.

    A payload over the size limit is cut to its first KiB with its real size noted: it will be
    rejected anyway, and carried whole it could exceed what NATS accepts and stall the bridge.
    """
    if len(payload) > max_payload_bytes:
        return IngestMessage(
            topic=topic,
            payload=payload[:OVERSIZE_KEPT_BYTES],
            received_at=received_at,
            payload_size=len(payload),
            ingest_seq=ingest_seq,
        )
    return IngestMessage(
        topic=topic, payload=payload, received_at=received_at, ingest_seq=ingest_seq
    )


def ingest_subject(topic: str) -> str:
    """The JetStream subject for an MQTT topic (`zev/{org}/{einheit}/messwert`)."""
    parts = topic.split("/")
    if (
        len(parts) == 4
        and parts[0] == "zev"
        and parts[3] == "messwert"
        and _SAFE_TOKEN.fullmatch(parts[1])
        and _SAFE_TOKEN.fullmatch(parts[2])
    ):
        return f"ingest.{parts[1]}.{parts[2]}"
    return UNROUTABLE_SUBJECT
