"""The whole topology on one screen: JetStream streams, and which stage reads what and writes where.

Internal streams use work-queue retention (a message is gone once its stage acked it) and
`discard: new`, so a full stream refuses new input instead of silently dropping old unprocessed
messages: the refusal travels back to the bridge, which then withholds PUBACKs from the broker.
`DLQ` and `MESSWERTE` keep limits-based history for inspection and replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas.messages import IngestMessage, Persisted, Reading, Reject
from schemas.output import MesswertMessage
from stages.mqtt_bridge import SUBSCRIPTION, ingest_subject

DAY_S = 86_400.0
DUPLICATE_WINDOW_S = 120.0


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    work_queue: bool = True
    max_age_s: float = 7 * DAY_S
    # Bounded by count, not bytes: JetStream reserves a byte limit against the disk up front,
    # which fails on small disks even while the stream is empty.
    max_msgs: int = 20_000_000

    def config(self, replicas: int = 1) -> StreamConfig:
        return StreamConfig(
            num_replicas=replicas,
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.WORK_QUEUE if self.work_queue else RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW if self.work_queue else DiscardPolicy.OLD,
            storage=StorageType.FILE,
            max_age=self.max_age_s,
            max_msgs=self.max_msgs,
            duplicate_window=DUPLICATE_WINDOW_S,
        )


STREAMS: tuple[Stream, ...] = (
    Stream("INGEST", ("ingest.>",)),
    Stream("VALID", ("valid.>",)),
    Stream("UNIQUE", ("unique.>",)),
    Stream("PERSISTED", ("persisted.>",)),
    Stream("DLQ", ("dlq.>",), work_queue=False, max_age_s=14 * DAY_S, max_msgs=1_000_000),
    Stream("MESSWERTE", ("messwerte.>",), work_queue=False, max_age_s=400 * DAY_S),
)


def _dlq(m: Reject) -> str:
    return f"dlq.{m.reason}"


Route = Callable[[Any], str]


@dataclass(frozen=True)
class Stage:
    """One stage: what it consumes (a subject of a stream, or another source) and where each
    kind of output it returns goes. Outputs of a kind with no route are effects (DB) only.
    Every consumer stage may reject: undecodable or poison input goes to `dlq.{reason}`."""

    name: str
    reads: str
    stream: str | None
    consumes: type
    writes: Mapping[type, Route] = field(default_factory=dict)


# Fused with validate in one process, the bridge hands its batches to validate in memory
# instead of publishing them to `ingest.…` (pipeline/app.py).
# fmt: off
STAGES: tuple[Stage, ...] = (
    #     name                reads                     stream       consumes        writes
    Stage("mqtt_bridge",      f"mqtt:{SUBSCRIPTION}",   None,        IngestMessage,
          {IngestMessage: lambda m: ingest_subject(m.topic)}),
    Stage("validate",         "ingest.>",               "INGEST",    IngestMessage,
          {Reading: lambda m: f"valid.{m.organization_id}.{m.einheit_id}", Reject: _dlq}),
    Stage("dedupe",           "valid.>",                "VALID",     Reading,
          {Reading: lambda m: f"unique.{m.organization_id}.{m.einheit_id}", Reject: _dlq}),
    Stage("persist",          "unique.>",               "UNIQUE",    Reading,
          {Persisted: lambda m: f"persisted.{m.organization_id}.{m.einheit_id}", Reject: _dlq}),
    Stage("window_aggregate", "persisted.>",            "PERSISTED", Persisted,   # -> DB outbox
          {Reject: _dlq}),
    Stage("publish",          "db:messwerte_outbox",    None,        MesswertMessage,
          {MesswertMessage: lambda m: m.subject}),
)
# fmt: on

BY_NAME: Mapping[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(BY_NAME)
#: Stages fed by a JetStream consumer, in pipeline order; the rest have their own sources.
CONSUMER_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.stream is not None)
