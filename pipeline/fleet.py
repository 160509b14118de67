"""A simulated smart-meter fleet for the demo: backfills the last hours, then publishes live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Sequence
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


class Fleet:
    def __init__(self, mqtt_url: str, units: Sequence[Unit], *, seed: int = 7) -> None:
        self._target = MqttTarget(mqtt_url)
        self.units = list(units)
        self._rng = random.Random(seed)
        self.published = 0

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._target.host,
            self._target.port,
            username=self._target.username,
            password=self._target.password,
            identifier=f"messwerte-demo-fleet-{self._rng.randrange(1 << 30)}",
        )

    async def backfill(self, span: timedelta, step: timedelta, now: datetime) -> None:
        """Publish one reading per unit every `step` over the `span` before `now`."""
        async with self._client() as client:
            moment = now - span
            while moment < now:
                for unit in self.units:
                    await client.publish(unit.topic, reading(moment, step, self._rng), qos=1)
                    self.published += 1
                moment += step

    async def live(self, every: timedelta, stop: asyncio.Event) -> None:
        """Each unit publishes a reading for the last `every`, until `stop` is set."""
        async with self._client() as client:
            while not stop.is_set():
                now = datetime.now(UTC).replace(microsecond=0)
                for unit in self.units:
                    await client.publish(unit.topic, reading(now, every, self._rng), qos=1)
                    self.published += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=every.total_seconds())
