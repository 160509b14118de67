"""The pure half of the MQTT bridge: an MQTT message becomes an ingest envelope and a subject.

The payload is carried untouched; the topic and receive time travel with it. Each device kind
has one subscription and one subject root (`ROUTES`): `zev/{org}/{einheit}/messwert` goes to
`ingest.{org}.{einheit}`, `bess/{site}/{device}/telemetry` to `bess.ingest.{site}.{device}`.
A subject uses the topic's tokens only where they are safe NATS subject tokens; anything else
(a `.`, `*`, `>` or space in a token, a token that is too long) goes to the kind's
`….unroutable`, where validate rejects it with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from schemas.messages import IngestMessage

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Route:
    """One device kind's way in over MQTT: `{root}/+/+/{leaf}` onto `{prefix}.{a}.{b}`."""

    kind: str
    root: str
    leaf: str
    prefix: str

    @property
    def subscription(self) -> str:
        return f"{self.root}/+/+/{self.leaf}"

    @property
    def unroutable(self) -> str:
        return f"{self.prefix}.unroutable"

    def subject(self, parts: list[str]) -> str:
        if (
            len(parts) == 4
            and parts[0] == self.root
            and parts[3] == self.leaf
            and _SAFE_TOKEN.fullmatch(parts[1])
            and _SAFE_TOKEN.fullmatch(parts[2])
        ):
            return f"{self.prefix}.{parts[1]}.{parts[2]}"
        return self.unroutable


ZEV = Route("zev", "zev", "messwert", "ingest")
BESS = Route("bess", "bess", "telemetry", "bess.ingest")
ROUTES: tuple[Route, ...] = (ZEV, BESS)
_BY_ROOT = {route.root: route for route in ROUTES}

#: What the bridge subscribes to (QoS 1, persistent session), one filter per kind.
SUBSCRIPTIONS: tuple[str, ...] = tuple(route.subscription for route in ROUTES)
SUBSCRIPTION = ZEV.subscription
UNROUTABLE_SUBJECT = ZEV.unroutable


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


def route_of(topic: str) -> Route:
    """The kind a topic belongs to, by its first level (meters where it names none)."""
    return _BY_ROOT.get(topic.split("/", 1)[0], ZEV)


def ingest_subject(topic: str) -> str:
    """The JetStream subject for an MQTT topic of any kind."""
    parts = topic.split("/")
    return _BY_ROOT.get(parts[0], ZEV).subject(parts)
