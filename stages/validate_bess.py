"""validate, for BESS telemetry: an ingest message becomes a `BessSample`, or a `Reject`.

The same JSON rules as meter readings (`stages.validate.parse_json_object`), then the ranges of
design §13 (`schemas.bess`), the topic (`bess/{site}/{device}/telemetry`, whose site and device
a payload may repeat but not contradict: `topic_mismatch`) and the registered owner of the device
(`bess_device`; else `unknown_device`). A sample in the future, or whose `p_ch` and `p_dis`
do not add up to `p`, is stored anyway with a warning: it fails a plausibility check, not a rule.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import structlog

from schemas.bess import NAME_PATTERN, BessPayload, BessSample
from schemas.messages import IngestMessage, Reject, RejectReason
from stages.validate import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FUTURE_TOLERANCE,
    Refused,
    parse_json_object,
    refuse_too_old,
    validate_model,
)

log = structlog.get_logger("stages.validate_bess")

STAGE = "validate"
REQUIRED = frozenset({"ts", "soc", "p"})
#: |p − (p_dis − p_ch)| may be this much, or this share of |p| where that is more.
BALANCE_TOLERANCE_KW = 1.0
BALANCE_TOLERANCE_SHARE = 0.05


class DeviceDirectory(Protocol):
    async def organization_of(self, site: str, device: str) -> UUID | None: ...


def parse_topic(topic: str) -> tuple[str, str]:
    """`bess/{site}/{device}/telemetry` -> (site, device)."""
    parts = topic.split("/")
    if (
        len(parts) != 4
        or parts[0] != "bess"
        or parts[3] != "telemetry"
        or not NAME_PATTERN.fullmatch(parts[1])
        or not NAME_PATTERN.fullmatch(parts[2])
    ):
        raise Refused(
            RejectReason.INVALID_TOPIC,
            f"topic {topic[:200]!r} is not bess/{{site}}/{{device}}/telemetry "
            "(site and device: 1 to 64 characters of A-Z a-z 0-9 _ -)",
        )
    return parts[1], parts[2]


def plausibility(payload: BessPayload, now: datetime) -> tuple[str, ...]:
    """The checks a valid sample fails: stored anyway, counted and logged (design §13)."""
    warnings = []
    if payload.ts - now > FUTURE_TOLERANCE:
        warnings.append("future_timestamp")
    if payload.p_ch is not None and payload.p_dis is not None:
        allowed = max(BALANCE_TOLERANCE_KW, BALANCE_TOLERANCE_SHARE * abs(payload.p))
        if abs(payload.p - (payload.p_dis - payload.p_ch)) > allowed:
            warnings.append("power_balance")
    return tuple(warnings)


class ValidateBess:
    """Stage `validate` for BESS: ingest message -> `BessSample` on `bess.valid.…`, or `Reject`."""

    def __init__(
        self,
        devices: DeviceDirectory,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retention: timedelta | None = None,
    ) -> None:
        self._devices = devices
        self._clock = clock
        self._retention = retention
        self._max_payload_bytes = max_payload_bytes

    async def __call__(self, msg: IngestMessage) -> list[BessSample | Reject]:
        try:
            return [await self._validate(msg)]
        except Refused as refused:
            fields = {"reason": str(refused.reason), "detail": refused.detail, "topic": msg.topic}
            if refused.reason is RejectReason.ORGANIZATION_MISMATCH:
                log.error("security: device posted under another organization", **fields)
            else:
                log.warning("message rejected", **fields)
            return [Reject.of(msg, refused.reason, refused.detail, STAGE)]

    async def _validate(self, msg: IngestMessage) -> BessSample:
        site, device = parse_topic(msg.topic)
        size = msg.payload_size or len(msg.payload)
        if size > self._max_payload_bytes:
            raise Refused(
                RejectReason.PAYLOAD_TOO_LARGE,
                f"payload of {size} bytes exceeds {self._max_payload_bytes}",
            )
        data = parse_json_object(msg.payload, self._max_payload_bytes, exact=False)
        payload = validate_model(BessPayload, data, REQUIRED)
        named = (("site", payload.site, site), ("device", payload.device, device))
        for name, value, expected in named:
            if value is not None and value != expected:
                raise Refused(
                    RejectReason.TOPIC_MISMATCH,
                    f"payload {name} {str(value)[:80]!r} is not the topic's {expected!r}",
                )
        org = await self._devices.organization_of(site, device)
        if org is None:
            raise Refused(
                RejectReason.UNKNOWN_DEVICE, f"device {site}/{device} is not in bess_device"
            )
        if msg.organization_id is not None and msg.organization_id != org:
            raise Refused(
                RejectReason.ORGANIZATION_MISMATCH,
                f"device {site}/{device} does not belong to organization {msg.organization_id}",
            )
        now = self._clock()
        refuse_too_old(payload.ts, now, self._retention)
        warnings = plausibility(payload, now)
        if warnings:
            log.warning(
                "implausible sample, stored anyway",
                site=site,
                device=device,
                ts=payload.ts.isoformat(),
                checks=list(warnings),
            )
        return BessSample(
            organization_id=org,
            site=site,
            device=device,
            ts=payload.ts.astimezone(UTC),
            soc=payload.soc,
            p=payload.p,
            p_ch=payload.p_ch,
            p_dis=payload.p_dis,
            v_dc=payload.v_dc,
            i_dc=payload.i_dc,
            t_cell_max=payload.t_cell_max,
            soh=payload.soh,
            alarms=payload.alarms,
            received_at=msg.received_at,
            ingest_seq=msg.ingest_seq,
            quelle=msg.quelle,
            redelivered=msg.redelivered,
            warnings=warnings,
        )
