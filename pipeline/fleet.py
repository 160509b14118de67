"""A simulated smart-meter fleet for the demo: backfills the last hours, then publishes live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import aiomqtt

from pipeline.config import MqttTarget


@dataclass(frozen=True)
class Unit:
    organization_id: UUID
    einheit_id: int

    @property
    def topic(self) -> str:
        return f"zev/{self.organization_id}/{self.einheit_id}/messwert"


def reading(at: datetime, step: timedelta, rng: random.Random) -> bytes:
    """A plausible reading for `step` of time: daytime solar feed-in, household consumption."""
    hours = step.total_seconds() / 3600
    hour = at.astimezone(UTC).hour + 1  # roughly Central European daytime
    sun = max(0.0, 1 - abs(hour - 13) / 6)
    return json.dumps(
        {
            "timestamp": at.isoformat(),
            "verbrauch": round(rng.uniform(0.2, 1.5) * hours, 4),
            "einspeisung": round(sun * rng.uniform(0.5, 4.0) * hours, 4),
        }
    ).encode()


def client(target: MqttTarget, name: str) -> aiomqtt.Client:
    """An MQTT client of a simulated device group, with an id of its own."""
    return aiomqtt.Client(
        target.host,
        target.port,
        username=target.username,
        password=target.password,
        identifier=f"messwerte-demo-{name}-{random.randrange(1 << 30)}",
    )


Send = Callable[[datetime, timedelta], Awaitable[None]]


async def backfill_then_live(
    send: Send, backfill: timedelta, step: timedelta, every: timedelta, stop: asyncio.Event
) -> None:
    """`send(moment, step)` every `step` over the `backfill` before now, then every `every`
    for the moment it is, until `stop` is set."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    moment = now - backfill
    while moment < now and not stop.is_set():
        await send(moment, step)
        moment += step
    while not stop.is_set():
        await send(datetime.now(UTC).replace(microsecond=0), every)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every.total_seconds())


class Fleet:
    def __init__(self, mqtt_url: str, units: Sequence[Unit], *, seed: int = 7) -> None:
        self._target = MqttTarget(mqtt_url)
        self.units = list(units)
        self._rng = random.Random(seed)
        self.published = 0

    async def backfill(self, span: timedelta, step: timedelta, now: datetime) -> None:
        """Publish one reading per unit every `step` over the `span` before `now`."""
        async with client(self._target, "fleet") as mqtt:
            moment = now - span
            while moment < now:
                for unit in self.units:
                    await mqtt.publish(unit.topic, reading(moment, step, self._rng), qos=1)
                    self.published += 1
                moment += step

    async def live(self, every: timedelta, stop: asyncio.Event) -> None:
        """Each unit publishes a reading for the last `every`, until `stop` is set."""
        async with client(self._target, "fleet") as mqtt:
            while not stop.is_set():
                now = datetime.now(UTC).replace(microsecond=0)
                for unit in self.units:
                    await mqtt.publish(unit.topic, reading(now, every, self._rng), qos=1)
                    self.published += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=every.total_seconds())
