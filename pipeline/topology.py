"""The whole topology on one screen: JetStream streams, and which stage reads what and writes where.

Internal streams use work-queue retention (a message is gone once its stage acked it) and
`discard: new`, so a full stream refuses new input instead of silently dropping old unprocessed
messages: the refusal travels back to the bridge, which then withholds PUBACKs from the broker.
`DLQ`, `MESSWERTE` and `BESS_INTERVALS` keep limits-based history for inspection and replay.

Each device kind (ZEV meters, BESS telemetry) has its own rows: the same stage names, its own
consumers, subjects and stage functions; `pipeline run --stage validate` runs both kinds' rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas.bess import BessIntervalMessage, BessPersisted, BessSample
from schemas.messages import IngestMessage, Persisted, Reading, Reject
from schemas.output import MesswertMessage
from stages.http_ingest import BESS_PATH, METER_PATH
from stages.mqtt_bridge import SUBSCRIPTIONS, ingest_subject

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

    def config(self, policy: StreamPolicy | None = None) -> StreamConfig:
        policy = policy or StreamPolicy()
        return StreamConfig(
            num_replicas=policy.replicas,
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.WORK_QUEUE if self.work_queue else RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW if self.work_queue else DiscardPolicy.OLD,
            storage=StorageType.FILE,
            max_age=policy.max_age_s.get(self.name, self.max_age_s),
            max_msgs=self.max_msgs,
            duplicate_window=DUPLICATE_WINDOW_S,
        )


@dataclass(frozen=True)
class StreamPolicy:
    """What an operator sets about every stream: its copies (PIPELINE_STREAM_REPLICAS) and, for
    the streams that keep history, how long (PIPELINE_*_RETENTION_DAYS), by stream name."""

    replicas: int = 1
    max_age_s: Mapping[str, float] = field(default_factory=dict)


STREAMS: tuple[Stream, ...] = (
    # Internal streams carry both device kinds, each under its own subject root.
    Stream("INGEST", ("ingest.>", "bess.ingest.>")),
    Stream("VALID", ("valid.>", "bess.valid.>")),
    Stream("UNIQUE", ("unique.>", "bess.unique.>")),
    Stream("PERSISTED", ("persisted.>", "bess.persisted.>")),
    Stream("DLQ", ("dlq.>",), work_queue=False, max_age_s=14 * DAY_S, max_msgs=1_000_000),
    Stream("MESSWERTE", ("messwerte.>",), work_queue=False, max_age_s=400 * DAY_S),
    Stream("BESS_INTERVALS", ("intervals.bess.>",), work_queue=False, max_age_s=400 * DAY_S),
)


def _dlq(m: Reject) -> str:
    return f"dlq.{m.reason}"


def _bess(root: str) -> Route:
    return lambda m: f"bess.{root}.{m.organization_id}.{m.site}.{m.device}"


Route = Callable[[Any], str]


@dataclass(frozen=True)
class Stage:
    """One stage of one device kind: what it consumes (a subject of a stream, or another
    source) and where each kind of output it returns goes. Outputs of a kind with no route are
    effects (DB) only. Every consumer stage may reject: undecodable or poison input goes to
    `dlq.{reason}`. `--stage NAME` runs a stage for every kind.

    `one`: at most one replica runs it at a time, holding the claim named `consumer` (design
    §14); the others stand by. The MQTT session has one client id; validate and dedupe must see
    a unit's readings in broker order, or dedupe could take the third of X, Y, X for a repeat
    of the first; the publisher keeps an interval's revisions in order. The other stages are
    shared by every replica: persist applies a reading only if it is newer in broker order, and
    the aggregator takes each due interval under a row lock."""

    name: str
    reads: str
    stream: str | None
    consumes: type
    writes: Mapping[type, Route] = field(default_factory=dict)
    kind: str = "zev"
    one: bool = False

    @property
    def consumer(self) -> str:
        """Its durable consumer's name, also its `stage` label in the metrics."""
        return self.name if self.kind == "zev" else f"{self.name}_{self.kind}"


# Fused with validate in one process, the bridge hands its batches to validate in memory
# instead of publishing them to `ingest.…` (pipeline/app.py). One bridge serves both kinds, and
# so does the HTTP ingest API, which always publishes: its 202 is JetStream's acknowledgement.
# fmt: off
STAGES: tuple[Stage, ...] = (
    #     name                reads                     stream       consumes        writes
    Stage("mqtt_bridge",      f"mqtt:{','.join(SUBSCRIPTIONS)}", None, IngestMessage,
          {IngestMessage: lambda m: ingest_subject(m.topic)}, one=True),
    Stage("http_ingest",      f"http:{METER_PATH},{BESS_PATH}", None, IngestMessage,  # 202 after
          {IngestMessage: lambda m: ingest_subject(m.topic), Reject: _dlq}),  # stored
    # ZEV meters
    Stage("validate",         "ingest.>",               "INGEST",    IngestMessage,
          {Reading: lambda m: f"valid.{m.organization_id}.{m.einheit_id}", Reject: _dlq}, one=True),
    Stage("dedupe",           "valid.>",                "VALID",     Reading,
          {Reading: lambda m: f"unique.{m.organization_id}.{m.einheit_id}", Reject: _dlq},
          one=True),
    Stage("persist",          "unique.>",               "UNIQUE",    Reading,
          {Persisted: lambda m: f"persisted.{m.organization_id}.{m.einheit_id}", Reject: _dlq}),
    Stage("window_aggregate", "persisted.>",            "PERSISTED", Persisted,   # -> DB outbox
          {Reject: _dlq}),
    Stage("publish",          "db:messwerte_outbox",    None,        MesswertMessage,
          {MesswertMessage: lambda m: m.subject}, one=True),
    # BESS telemetry
    Stage("validate",         "bess.ingest.>",          "INGEST",    IngestMessage,
          {BessSample: _bess("valid"), Reject: _dlq}, kind="bess", one=True),
    Stage("dedupe",           "bess.valid.>",           "VALID",     BessSample,
          {BessSample: _bess("unique"), Reject: _dlq}, kind="bess", one=True),
    Stage("persist",          "bess.unique.>",          "UNIQUE",    BessSample,
          {BessPersisted: _bess("persisted"), Reject: _dlq}, kind="bess"),
    Stage("window_aggregate", "bess.persisted.>",       "PERSISTED", BessPersisted,  # -> outbox
          {Reject: _dlq}, kind="bess"),
    Stage("publish",          "db:bess_interval_outbox", None,       BessIntervalMessage,
          {BessIntervalMessage: lambda m: m.subject}, kind="bess", one=True),
)
# fmt: on

KINDS: tuple[str, ...] = ("zev", "bess")
STAGE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.name for s in STAGES))
#: Stages fed by a JetStream consumer, in pipeline order; the rest have their own sources.
CONSUMER_STAGES: tuple[str, ...] = tuple(
    dict.fromkeys(s.name for s in STAGES if s.stream is not None)
)


def rows(kind: str) -> tuple[Stage, ...]:
    """The consumer stages of one device kind, in pipeline order."""
    return tuple(s for s in STAGES if s.kind == kind and s.stream is not None)


#: The meters' rows by stage name (tests and tools that need one consumer stage).
BY_NAME: Mapping[str, Stage] = {s.name: s for s in STAGES if s.kind == "zev"}
