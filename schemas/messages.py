"""Messages that travel between stages on the internal JetStream subjects.

`IngestMessage` is an MQTT message as the bridge received it (subject `ingest.…`),
`Reading` a validated reading (`valid.…`, then `unique.…`), `Persisted` the key of a raw row
that was inserted or changed (`persisted.…`) and `Reject` a refused input (`dlq.{reason}`).
Each carries `ingest_seq`, the JetStream sequence of the MQTT message it came from: with the
content hash it forms the internal `Nats-Msg-Id`, so a redelivery is recognised as the same
message while a later identical reading is not.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

QUARTER_HOUR = timedelta(minutes=15)


class RejectReason(StrEnum):
    """Why an input was refused; the last token of its `dlq.{reason}` subject."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_NUMBER = "invalid_number"
    INVALID_TIMESTAMP = "invalid_timestamp"
    NEGATIVE_VALUE = "negative_value"
    OUT_OF_RANGE = "out_of_range"
    INVALID_TOPIC = "invalid_topic"
    UNKNOWN_UNIT = "unknown_unit"
    ORGANIZATION_MISMATCH = "organization_mismatch"
    UNDECODABLE = "undecodable"
    PERSIST_FAILED = "persist_failed"
    #: A stage raised on this message with an error that is not transient (poison).
    STAGE_FAILED = "stage_failed"
    #: Delivered `max_deliver` times without being acknowledged: it keeps killing its worker.
    MAX_DELIVERIES = "max_deliveries"
    #: A BESS payload's `site` or `device` differs from its topic's (design §13).
    TOPIC_MISMATCH = "topic_mismatch"
    #: A BESS device not registered in `bess_device`.
    UNKNOWN_DEVICE = "unknown_device"
    #: Older than PIPELINE_RAW_RETENTION_DAYS: its interval's raw rows may be pruned already,
    #: and a re-sum would overwrite the full sum with a partial one.
    TOO_OLD = "too_old"


class IngestMessage(BaseModel):
    """An MQTT message, untouched, with its topic and the time the bridge received it."""

    model_config = ConfigDict(frozen=True)

    topic: str
    payload: bytes
    received_at: datetime
    ingest_seq: int = Field(default=0, description="JetStream sequence in the INGEST stream")
    payload_size: int | None = Field(
        default=None, description="original size when the payload was cut for being too large"
    )
    quelle: str = Field(
        default="MQTT", description="source: 'MQTT', 'CSV' for imports, 'API' over HTTP"
    )
    organization_id: UUID | None = Field(
        default=None, description="over HTTP: the organization of the token it came with"
    )
    redelivered: bool = Field(
        default=False, description="delivered before: may arrive after newer messages"
    )


def internal_msg_id(source: int | str, timestamp: datetime, content_hash: str, seq: int) -> str:
    """`Nats-Msg-Id` on internal subjects: key (the unit, or a BESS device), content hash and
    the originating ingest message."""
    return f"{source}:{_epoch_us(timestamp)}:{content_hash}:{seq}"


class Reading(BaseModel):
    """A validated smart-meter reading for one unit (einheit) at one timestamp."""

    model_config = ConfigDict(frozen=True)

    organization_id: UUID
    einheit_id: int
    timestamp: datetime
    verbrauch: Decimal
    einspeisung: Decimal
    zaehlerstand_verbrauch: Decimal | None = None
    zaehlerstand_einspeisung: Decimal | None = None
    received_at: datetime
    ingest_seq: int = 0
    quelle: str = "MQTT"
    #: Came through a JetStream redelivery somewhere upstream, so it may be older than
    #: readings already seen: it must not move the state of `dedupe` (see there).
    redelivered: bool = False

    @property
    def topic(self) -> str:
        """The MQTT topic a reading of this unit arrives on."""
        return f"zev/{self.organization_id}/{self.einheit_id}/messwert"

    @property
    def key(self) -> tuple[int, datetime]:
        """The row key in `zaehler_rohdaten`: one reading per unit and instant."""
        return (self.einheit_id, self.timestamp)

    @property
    def order(self) -> tuple[datetime, int]:
        """Broker order: when the bridge received it, then its INGEST sequence.

        Redeliveries after a crash come later than newer messages; comparing this decides
        which reading of a key is the last one written (the receive time first, so that a
        recreated INGEST stream, whose sequence starts again at 1, still orders correctly).
        """
        return (self.received_at, self.ingest_seq)

    @cached_property
    def content_hash(self) -> str:
        """Hash of what makes two readings of a key equal (values compared as numbers).

        A Decimal's own hash is its value modulo the prime 2**61 - 1, the same for 0.5 and
        0.50 and the same in every process (unlike a str's): for the values a reading can
        hold (0 to 10**8 with 4 places, from validate) it is one-to-one, so packing the key
        and those hashes loses nothing, at a third of formatting each value as text."""
        a, b, c, d = self.values
        packed = _CONTENT.pack(
            self.einheit_id,
            _epoch_us(self.timestamp),
            hash(a),
            hash(b),
            _NONE if c is None else hash(c),
            _NONE if d is None else hash(d),
        )
        return hashlib.blake2b(packed, digest_size=8).hexdigest()

    @property
    def msg_id(self) -> str:
        return internal_msg_id(self.einheit_id, self.timestamp, self.content_hash, self.ingest_seq)

    @property
    def values(self) -> tuple[Decimal | None, ...]:
        return (
            self.verbrauch,
            self.einspeisung,
            self.zaehlerstand_verbrauch,
            self.zaehlerstand_einspeisung,
        )


class Persisted(BaseModel):
    """A raw row that persist inserted or changed, so its interval may need aggregating."""

    model_config = ConfigDict(frozen=True)

    organization_id: UUID
    einheit_id: int
    timestamp: datetime
    content_hash: str
    ingest_seq: int = 0

    @property
    def topic(self) -> str:
        return f"zev/{self.organization_id}/{self.einheit_id}/messwert"

    @property
    def msg_id(self) -> str:
        return internal_msg_id(self.einheit_id, self.timestamp, self.content_hash, self.ingest_seq)


class Reject(BaseModel):
    """An input refused by a stage, with the original topic and payload and a readable reason."""

    model_config = ConfigDict(frozen=True)

    reason: RejectReason = Field(description="the last token of `dlq.{reason}`")
    detail: str = Field(description="human-readable reason")
    topic: str
    payload: str = Field(description="original payload: text if UTF-8, else base64")
    payload_encoding: str = Field(default="utf-8", description="`utf-8` or `base64`")
    received_at: datetime
    stage: str
    ingest_seq: int = 0

    @classmethod
    def of(cls, msg: IngestMessage, reason: RejectReason, detail: str, stage: str) -> Reject:
        try:
            text, encoding = msg.payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(msg.payload).decode("ascii"), "base64"
        return cls(
            reason=reason,
            detail=detail,
            topic=msg.topic,
            payload=text,
            payload_encoding=encoding,
            received_at=msg.received_at,
            stage=stage,
            ingest_seq=msg.ingest_seq,
        )

    @property
    def msg_id(self) -> str:
        """The same refused message twice (a redelivery) is one DLQ entry; two different ones
        are two, even where they carry no INGEST sequence."""
        content = hashlib.blake2b(
            f"{self.topic}\n{self.payload}".encode(errors="surrogatepass"), digest_size=8
        ).hexdigest()
        return f"dlq:{self.stage}:{self.ingest_seq}:{self.reason}:{content}"


def interval_end(ts: datetime) -> datetime:
    """End of the 15-minute interval (end - 15 min, end] that holds `ts` (design §5).

    Rounds up to the quarter hour in UTC; quarter hours coincide in UTC and Europe/Zurich,
    so the result is DST-safe. A reading exactly on a quarter hour closes that interval.
    """
    end_us = -(-_epoch_us(ts) // _QUARTER_US) * _QUARTER_US
    return _EPOCH + timedelta(microseconds=end_us)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_QUARTER_US = 15 * 60 * 1_000_000


def _epoch_us(ts: datetime) -> int:
    # Exact integer arithmetic in C (aware datetimes subtract across offsets); per reading.
    return (ts - _EPOCH) // _MICROSECOND


#: Key and values of a reading, packed for its content hash; a Decimal never hashes to -1.
_CONTENT = struct.Struct("<6q")
_NONE = -1
