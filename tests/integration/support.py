"""Helpers for integration tests: run a pipeline in-process, publish over MQTT, read streams,
and compute the expected result independently of the pipeline's SQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiomqtt
import nats

from pipeline.app import Pipeline
from pipeline.config import Settings


@contextlib.asynccontextmanager
async def running(
    settings: Settings, mode: str = "fused", stages: Sequence[str] | None = None
) -> AsyncIterator[Pipeline]:
    kwargs: dict[str, Any] = {"mode": mode}
    if stages is not None:
        kwargs["stages"] = stages
    pipeline = Pipeline(settings, **kwargs)
    task = asyncio.create_task(pipeline.run())
    ready = asyncio.create_task(pipeline.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    assert ready in done, "pipeline did not become ready"
    try:
        yield pipeline
    finally:
        pipeline.stop.set()
        await asyncio.wait_for(task, 20)


async def metric(pipeline: Pipeline, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the pipeline's metrics, 0 when absent; async so `eventually` can poll it."""
    return pipeline.metrics.registry.get_sample_value(name, labels) or 0.0


async def publish(
    broker_url: str, messages: Iterable[tuple[str, bytes | str]], qos: int = 1
) -> int:
    port = int(broker_url.rsplit(":", 1)[1])
    count = 0
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"test-publisher-{id(messages)}"
    ) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=qos)
            count += 1
    return count


def topic(org: Any, unit: int) -> str:
    return f"zev/{org}/{unit}/messwert"


def body(at: datetime, verbrauch: float | str, einspeisung: float | str = 0, **extra: Any) -> bytes:
    """A payload; a `str` value is written as the JSON number it spells, exactly."""
    numbers = {"verbrauch": verbrauch, "einspeisung": einspeisung}
    fields = [f'"timestamp": {json.dumps(at.isoformat())}']
    fields += [f'"{k}": {v if isinstance(v, str) else json.dumps(v)}' for k, v in numbers.items()]
    fields += [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()]
    return ("{" + ", ".join(fields) + "}").encode()


async def stream_messages(nats_url: str, stream: str) -> list[Any]:
    """Every message currently stored in `stream`, in order (direct get by sequence); none
    while the stream does not exist (yet, or again: workers create it when they need it)."""
    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        out: list[Any] = []
        if info.state.messages == 0:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                out.append(await js.get_msg(stream, seq))
        return out
    finally:
        await nc.close()


async def messwerte_published(nats_url: str) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await stream_messages(nats_url, "MESSWERTE")]


def latest_by_key(published: Iterable[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for message in published:
        key = (message["einheitId"], message["zeit"])
        if key not in latest or message["revision"] > latest[key]["revision"]:
            latest[key] = message
    return latest


@dataclass
class Reference:
    """The expected outcome, computed in plain Python from what was published (last write wins)."""

    raw: dict[tuple[int, datetime], tuple[Decimal, Decimal]]

    @classmethod
    def of(cls, readings: Iterable[tuple[int, datetime, str, str]]) -> Reference:
        raw: dict[tuple[int, datetime], tuple[Decimal, Decimal]] = {}
        for unit, at, verbrauch, einspeisung in readings:
            raw[(unit, at.astimezone(UTC))] = (_q(verbrauch), _q(einspeisung))
        return cls(raw)

    def messwerte(self) -> dict[tuple[int, datetime], tuple[Decimal, Decimal, int]]:
        sums: dict[tuple[int, datetime], list[Any]] = defaultdict(
            lambda: [Decimal(0), Decimal(0), 0]
        )
        for (unit, at), (v, e) in self.raw.items():
            end = _ceil_quarter(at)
            entry = sums[(unit, end)]
            entry[0] += v
            entry[1] += e
            entry[2] += 1
        return {k: (v[0], v[1], v[2]) for k, v in sums.items()}


def _q(value: str) -> Decimal:
    return Decimal(value).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def _ceil_quarter(at: datetime) -> datetime:
    floor = at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)
    return floor if floor == at else floor + timedelta(minutes=15)
